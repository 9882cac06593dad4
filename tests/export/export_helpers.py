"""Checkpoints to export, built without training: pretrained parts (tiny random models), upcycled,
with routers and experts perturbed so that routing decides the output; and the comparisons every
export test makes against transformers."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from moevlm.checkpoint import PreparedModel, write_checkpoint
from moevlm.config import Config, load_config
from moevlm.data.images import image_preparer, normalize
from moevlm.data.tokenizer_factory import load_tokenizer
from moevlm.models.factory import build_model
from moevlm.models.hf_config import resolve_pretrained
from moevlm.models.lora import apply_lora
from moevlm.models.upcycle import upcycle


def perturb_experts(model, seed: int = 0) -> None:
    """Routers far from uniform and experts that differ, so every routing choice shows in the output."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for moe in model.moe_layers:
            moe.gate.weight.copy_(torch.randn(moe.gate.weight.shape, generator=generator))
            for tensor in (moe.w1_EDF, moe.w2_EHD):
                tensor.add_(0.05 * torch.randn(tensor.shape, generator=generator))


def pretrained_checkpoint(folder: Path, vision: str, lm: str, experts: int = 4, top_k: int = 2,
                          layers="all", lora_rank: int = 0) -> Path:
    overrides = [f"model.vision=hf:{vision}", f"model.lm=hf:{lm}", "decoder.max_text_len=64"]
    if lora_rank:
        overrides.append(f"decoder.lora_rank={lora_rank}")
    config = load_config("tiny", overrides=overrides)
    config = Config(model=resolve_pretrained(config.model), data=config.data, train=config.train)
    model = build_model(config.model)
    tokenizer = load_tokenizer(None, config.model)
    if lora_rank:
        apply_lora(model.lm, config.model.decoder)
        with torch.no_grad():  # adapters that changed something, so merging them matters
            for name, param in model.lm.named_parameters():
                if "lora_B" in name:
                    param.normal_(std=0.05)
    if layers:
        model, config = upcycle(model, config, experts, top_k, layers)
        perturb_experts(model)
    write_checkpoint(folder, PreparedModel(model.eval(), tokenizer, config, set()),
                     images=image_preparer(config.model))
    return folder


def sample_images(size: int = 32) -> list[Image.Image]:
    """Two different pictures (gradients in other directions), at a size the processors resize."""
    ramp = torch.linspace(0, 255, size + 8).to(torch.uint8)
    first = torch.stack([ramp[None, :].expand(size + 8, -1), ramp[:, None].expand(-1, size + 8),
                         torch.full((size + 8, size + 8), 90, dtype=torch.uint8)], dim=-1)
    second = first.flip(0).roll(7, dims=1)
    return [Image.fromarray(first.numpy()), Image.fromarray(second.numpy())]


def moevlm_pixels(config, folder: Path, images: list[Image.Image]) -> torch.Tensor:
    prepare = image_preparer(config.model, folder)
    return normalize(torch.stack([prepare(img) for img in images]))


def hf_messages(prompt: str) -> list[dict]:
    content = [{"type": "image"}] + ([{"type": "text", "text": prompt}] if prompt else [])
    return [{"role": "user", "content": content}]


def assert_export_matches(checkpoint: Path, out: Path, prompts: tuple[str, str], atol: float = 1e-5) -> dict:
    """The exported folder against the moevlm checkpoint, in fp32: no missing or unexpected keys; the
    processor's input_ids and pixel_values; image features; logits; greedy generation on a
    left-padded batch of two images with prompts of different lengths. Returns what it compared."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from moevlm.checkpoint import load_model
    from moevlm.generate import generate

    model, tokenizer, config = load_model(checkpoint)
    hf, info = LlavaForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    hf.eval()
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    processor = AutoProcessor.from_pretrained(out, backend="pil")
    images = sample_images(config.model.vision.image_size + 8)
    n = config.model.vision.num_image_tokens
    ours_pixels = moevlm_pixels(config, checkpoint, images)
    texts = [processor.apply_chat_template(hf_messages(p), add_generation_prompt=True) for p in prompts]
    batch = processor(images=images, text=texts, return_tensors="pt", padding=True)
    image_id = hf.config.image_token_id

    # input_ids: moevlm's prompt, with the image tokens where LLaVA puts them
    for row, prompt in enumerate(prompts):
        ours = tokenizer.prompt_ids(prompt)
        if not model.images_in_text:
            ours = [image_id] * n + ours
        ours = [image_id if i == getattr(model, "image_token_id", None) else i for i in ours]
        theirs = batch["input_ids"][row][batch["attention_mask"][row].bool()].tolist()
        assert theirs == ours, (row, theirs, ours)

    # pixel values: moevlm's [-1, 1] images as the tower normalises them
    tower_mean = getattr(model.vision, "pixel_mean", torch.full((3,), 0.5)).view(1, -1, 1, 1)
    tower_std = getattr(model.vision, "pixel_std", torch.full((3,), 0.5)).view(1, -1, 1, 1)
    torch.testing.assert_close(batch["pixel_values"], ((ours_pixels + 1) / 2 - tower_mean) / tower_std,
                               atol=1e-5, rtol=0)

    with torch.no_grad():
        ours_features = model.encode_images(ours_pixels)
        theirs_features = hf.model.get_image_features(pixel_values=batch["pixel_values"])
        if not isinstance(theirs_features, torch.Tensor):
            theirs_features = getattr(theirs_features, "pooler_output", theirs_features)
        theirs_features = torch.stack(list(theirs_features)) if isinstance(theirs_features, (list, tuple)) \
            else theirs_features
        torch.testing.assert_close(theirs_features.reshape(ours_features.shape), ours_features, atol=atol, rtol=0)

        # logits of a right-padded batch with answers, every text position
        ours_ids = [tokenizer.encode_conversation([(p, "a b")], config.model.decoder.max_text_len)[0] for p in prompts]
        width = max(len(ids) for ids in ours_ids)
        pad = tokenizer.pad_id
        ids = torch.tensor([ids + [pad] * (width - len(ids)) for ids in ours_ids])
        mask = torch.tensor([[1] * len(ids_) + [0] * (width - len(ids_)) for ids_ in ours_ids])
        ours_logits = model(ours_pixels, ids, mask).logits
        if model.images_in_text:
            hf_ids = ids.masked_fill(ids == model.image_token_id, image_id)
            hf_mask = mask
        else:
            hf_ids = torch.cat([torch.full((2, n), image_id), ids], dim=1)
            hf_mask = torch.cat([torch.ones(2, n, dtype=mask.dtype), mask], dim=1)
        theirs_logits = hf(input_ids=hf_ids, attention_mask=hf_mask, pixel_values=batch["pixel_values"]).logits
        if not model.images_in_text:
            theirs_logits = theirs_logits[:, n:]
        real = mask.bool()
        vocab = ours_logits.size(-1)
        torch.testing.assert_close(theirs_logits[..., :vocab][real], ours_logits[real], atol=atol, rtol=0)

        # greedy generation, left-padded batch of two
        ours_tokens = generate(model, ours_pixels, [tokenizer.prompt_ids(p) for p in prompts],
                               eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id, max_new_tokens=8)
        out_ids = hf.generate(**batch, max_new_tokens=8, do_sample=False)[:, batch["input_ids"].size(1):]
    theirs_tokens = []
    for row in out_ids.tolist():
        tokens = []
        for token in row:
            if token == hf.generation_config.eos_token_id:
                break
            tokens.append(token)
        theirs_tokens.append(tokens)
    assert theirs_tokens == ours_tokens, (theirs_tokens, ours_tokens)
    return {"tokens": ours_tokens, "max_logit_diff": float((theirs_logits[..., :vocab][real] -
                                                             ours_logits[real]).abs().max()),
            "max_abs_logit": float(ours_logits[real].abs().max())}


SCRATCH_TEXTS = ["a red circle", "a blue square", "two green triangles", "What is it?", "Describe it."]


def scratch_checkpoint(folder: Path, overrides: list[str], kind: str = "char") -> Path:
    """A scratch llama + siglip model on a tokenizer trained on a few captions, experts perturbed."""
    from moevlm.data.tokenizer import Tokenizer
    from moevlm.models.vlm import VLM

    tokenizer = Tokenizer.train(SCRATCH_TEXTS, kind, vocab_size=300)
    config = load_config("tiny", overrides=["decoder.arch=llama", "vision.arch=siglip", "vision.image_tokens=patches",
                                            f"decoder.vocab_size={tokenizer.vocab_size}", "decoder.max_text_len=40",
                                            *overrides])
    model = VLM(config.model)
    perturb_experts(model)
    with torch.no_grad():  # norms away from 1, so a missed norm weight shows
        for name, param in model.named_parameters():
            if name.endswith(("ln1.weight", "ln2.weight", "ln_f.weight")):
                param.add_(0.1 * torch.randn_like(param))
    write_checkpoint(folder, PreparedModel(model.eval(), tokenizer, config, set()))
    return folder
