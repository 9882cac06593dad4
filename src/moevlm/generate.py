"""Autoregressive generation conditioned on images: greedy, temperature, top-k, top-p.

Batched over images with prompts of different lengths (left-padded text, see models/vlm.py),
with a KV cache; ``use_cache=False`` recomputes the whole sequence every step and is the plain
reference the cached path is tested against.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch

from moevlm.checkpoint import load_model
from moevlm.compiled import compiled_decoder
from moevlm.data.images import image_preparer, normalize, open_image
from moevlm.data.tokenizer_factory import TextTokenizer
from moevlm.device import autocast_dtype, resolve_device
from moevlm.errors import ConfigError, DataError
from moevlm.models.protocol import VisionLanguageModel


def left_pad(prompts: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((len(prompts), width), dtype=torch.bool, device=device)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
        mask[row, width - len(prompt):] = True
    return ids, mask


def new_token_room(model: VisionLanguageModel, prompt_length: int) -> int:
    """How many tokens a prompt of ``prompt_length`` ids leaves before ``decoder.max_text_len``, which
    counts text tokens only (a model with ``images_in_text`` has its image ids among the prompt's)."""
    return model.cfg.decoder.max_text_len + (model.num_image_tokens if model.images_in_text else 0) - prompt_length


# Below this temperature sampling is greedy: dividing logits by a smaller one only sharpens a
# distribution that is already all on its top token, and by 1e-40 it overflows to inf/nan.
GREEDY_BELOW = 1e-5


def sample_next(logits: torch.Tensor, temperature: float = 0.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """logits (B, V) -> token ids (B,). temperature below ``GREEDY_BELOW`` is greedy; top_p keeps the
    smallest set of most likely tokens holding that much probability, always the top one (top_p 0:
    the top token only, as greedy)."""
    if temperature < GREEDY_BELOW:
        return logits.argmax(dim=-1)
    # Shifted so the largest logit is 0: exp() never overflows, and the top token's term is 1, so
    # the softmax's sum is at least 1 and every probability is finite.
    logits = logits.float()
    logits = (logits - logits.max(dim=-1, keepdim=True).values) / temperature
    if top_k is not None and top_k > 0:
        kth = logits.topk(min(top_k, logits.size(-1)), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # Drop a token once the tokens before it already hold top_p of the mass; never the first.
        drop_sorted = (probs.cumsum(dim=-1) - probs) >= top_p
        drop_sorted[:, 0] = False
        logits = logits.masked_fill(drop_sorted.scatter(1, order, drop_sorted), float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


@torch.no_grad()
def generate_stream(model: VisionLanguageModel, images: torch.Tensor, prompts: list[list[int]], *, eos_id: int,
                    pad_id: int,
                    max_new_tokens: int = 32, temperature: float = 0.0, top_k: int | None = None,
                    top_p: float | None = None, seed: int | None = None,
                    use_cache: bool = True, compile: bool = False) -> Iterator[torch.Tensor]:
    """Yields the next token of every sequence (B,) each step until all reached <eos>.

    images: normalized (B, C, S, S); prompts: token ids per image (``tokenizer.prompt_ids``;
    a model with ``images_in_text`` finds its image ids among them). A finished sequence keeps
    yielding ``pad_id``. ``compile``: decode with the compiled step over a static cache
    (moevlm.compiled; greedy tokens equal the eager path's; greedy decoding runs several steps per
    call of the compiled graph); ``use_cache=False`` overrides it.
    """
    model.eval()
    device = images.device
    # max_text_len counts text tokens; prompts of a model that takes its image tokens in the
    # text hold num_image_tokens more ids than that.
    in_text = model.images_in_text
    max_new_tokens = max(0, min(max_new_tokens, new_token_room(model, max(len(p) for p in prompts))))
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    ids, text_mask = left_pad(prompts, pad_id, device)
    prepended = 0 if in_text else model.num_image_tokens
    done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    length = prepended + ids.size(1) + max_new_tokens
    if use_cache and compile and temperature < GREEDY_BELOW:  # several steps per call, argmax in the graph
        for token in compiled_decoder(model).greedy(images, ids, text_mask, length, max_new_tokens):
            token = torch.where(done, torch.full_like(token, pad_id), token)
            yield token
            done |= token == eos_id
            if bool(done.all()):
                return
        return
    if not use_cache:
        logits, _ = model.prefill(images, ids, text_mask)

        def advance(token: torch.Tensor) -> torch.Tensor:  # the whole sequence again: the reference
            nonlocal ids, text_mask
            ids = torch.cat([ids, token[:, None]], dim=1)
            text_mask = torch.cat([text_mask, torch.ones_like(text_mask[:, :1])], dim=1)
            return model.prefill(images, ids, text_mask)[0]
    elif compile:
        logits, advance = compiled_decoder(model).start(images, ids, text_mask, length)
    else:
        cache = model.new_cache(len(prompts), length)
        logits, key_mask = model.prefill(images, ids, text_mask, cache)

        def advance(token: torch.Tensor) -> torch.Tensor:
            nonlocal key_mask
            key_mask = torch.cat([key_mask, torch.ones_like(key_mask[:, :1])], dim=1)
            return model.step(token, key_mask, cache)
    for _ in range(max_new_tokens):
        token = sample_next(logits, temperature, top_k, top_p, generator)
        token = torch.where(done, torch.full_like(token, pad_id), token)
        yield token
        done |= token == eos_id
        if bool(done.all()):
            return
        logits = advance(token)


def generate(model: VisionLanguageModel, images: torch.Tensor, prompts: list[list[int]], *, eos_id: int, pad_id: int,
             compile: bool = False, **options) -> list[list[int]]:
    """The generated token ids of each sequence, without the prompt and without <eos>. ``compile``:
    the compiled decoding step (moevlm.compiled), as in ``generate_stream``."""
    out: list[list[int]] = [[] for _ in prompts]
    finished = [False] * len(prompts)
    for token in generate_stream(model, images, prompts, eos_id=eos_id, pad_id=pad_id, compile=compile,
                                 **options):
        for row, value in enumerate(token.tolist()):
            if finished[row]:
                continue
            if value == eos_id:
                finished[row] = True
            else:
                out[row].append(value)
    return out


def generate_texts(model: VisionLanguageModel, tokenizer: TextTokenizer, images_uint8: torch.Tensor, prompts: list[str],
                   compile: bool = False, **options) -> list[str]:
    """Decoded text for a batch of uint8 (B, C, S, S) images, one prompt per image."""
    device = next(model.parameters()).device
    outputs = generate(model, normalize(images_uint8).to(device), [tokenizer.prompt_ids(p) for p in prompts],
                       eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id, compile=compile, **options)
    return [tokenizer.decode(ids) for ids in outputs]


def caption(model: VisionLanguageModel, tokenizer: TextTokenizer, images: list, prompt: str = "", batch_size: int = 32,
            prepare_image=None, compile: bool = False, **options) -> list[str]:
    """Captions PIL images (any size or mode), prepared like the training data.

    ``prepare_image``: PIL -> uint8 (C, S, S), as ``images.image_preparer`` gives for the
    model (pass the checkpoint folder there, so a pretrained tower's processor comes from it);
    None: ``image_preparer(model.cfg)``.
    """
    prepare_image = prepare_image or image_preparer(model.cfg)
    texts = []
    for start in range(0, len(images), batch_size):
        chunk = images[start:start + batch_size]
        pixels = torch.stack([prepare_image(img) for img in chunk])
        texts += generate_texts(model, tokenizer, pixels, [prompt] * len(chunk), compile=compile, **options)
    return texts


def caption_files(model_dir: str | Path, paths: list[Path], *, prompt: str = "", device: str = "auto",
                  batch_size: int = 32, quantize: str | None = None, compile: bool = False,
                  **options) -> Iterator[tuple[Path, str]]:
    """``moevlm caption``: (path, caption) of each image file with the checkpoint in ``model_dir``, on
    ``device`` (``--device``: auto, cpu, cuda, mps; bf16 where it has it), ``batch_size`` at a time,
    decoder weights quantized to ``quantize`` (``--quantize``) if given, decoding with the
    compiled step if ``compile`` (``--compile``).
    Every path is checked before the first caption, so a typo does not end a long job halfway."""
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, not {batch_size}")
    where = resolve_device(device, key="--device")
    amp_dtype = autocast_dtype("auto", where)
    model, tokenizer, config = load_model(model_dir, device=where, quantize=quantize)
    for path in paths:
        if not Path(path).is_file():
            raise DataError(path, None, "a folder, not an image file" if Path(path).is_dir() else "no such image file")
    prepare_image = image_preparer(config.model, model_dir)
    for start in range(0, len(paths), batch_size):
        chunk = paths[start:start + batch_size]
        images = []
        for path in chunk:
            try:
                images.append(open_image(str(path)))
            except ValueError as err:
                raise DataError(path, None, str(err)) from None
            except OSError as err:  # there, but not readable: nothing to caption it from
                raise DataError(path, None, f"cannot read image file: {err.strerror or err}") from None
        with torch.autocast(where.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            texts = caption(model, tokenizer, images, prompt=prompt, batch_size=batch_size,
                            prepare_image=prepare_image, compile=compile, **options)
        yield from zip(chunk, texts)
