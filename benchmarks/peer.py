"""moevlm against transformers on the same weights: generation and one training step.

For each size a moevlm checkpoint with random weights is built from configs (offline) and exported
with ``moevlm export --to hf``; the checkpoint runs in moevlm, the export in transformers'
``LlavaForConditionalGeneration``, both in float32 on the CPU:

- ``demo``: the ``moevlm demo`` model's shape (``default`` preset + the demo's overrides: SigLIP-style
  tower on 32 px scenes, 16 image tokens, llama decoder 128 wide x 4 layers, 4 experts top-2, BPE
  300), with ``decoder.max_text_len=96`` so that 64 new tokens fit;
- ``real``: a SigLIP-base-patch16-224-shaped tower (196 image tokens) and a SmolLM2-135M-shaped
  Llama (576 wide, 30 layers, vocabulary 49,152, tied embeddings) from ``tests/pretrained_fixtures.py``,
  every MLP upcycled to 4 experts top-2 (exported as LLaVA-Mixtral).

Generation: greedy, one image and prompt repeated ``batch`` times, ``--tokens`` new tokens with no
early stop (moevlm: an end id no token has; transformers: no ``eos_token_id``), timed from the call
to its return (vision, prefill and decoding): tokens/s = batch x tokens / seconds. Four ways:
moevlm eager, moevlm ``compile=True`` (n/a where ``generate`` has no such option), transformers
eager (dynamic cache) and transformers with a static cache and ``torch.compile`` (its
``CompileConfig`` with ``_compile_all_devices=True``, which a CPU needs). Each way runs once to warm
up (the compiled ways compile there: that time is printed apart), then the ways alternate
``--repeats`` times; the median and the range over repeats are printed. A line per batch says
whether the greedy tokens of every way are equal.

Training: one forward + backward (no optimizer step) of a batch of ``--train-batch`` rows (image,
prompt and 32 answer tokens), moevlm's ``model(...).loss`` against transformers' with ``labels``.

    OMP_NUM_THREADS=1 python benchmarks/peer.py [--sizes demo,real] [--batches 1,8,32] [--repeats 3] [--no-compile]

The demo size takes a few minutes on 2 CPU cores (most of it compiling transformers' step); the real
size takes minutes per batch size (a 32-row batch and the compiled ways the longest).
"""

from __future__ import annotations

import argparse
import inspect
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

TESTS = Path(__file__).resolve().parents[1] / "tests"
sys.path.insert(0, str(TESTS))

from moevlm.checkpoint import PreparedModel, load_model, write_checkpoint  # noqa: E402
from moevlm.config import Config, load_config  # noqa: E402
from moevlm.data.images import image_preparer  # noqa: E402
from moevlm.data.tokenizer import Tokenizer  # noqa: E402
from moevlm.demo import DEMO_OVERRIDES  # noqa: E402
from moevlm.export.hf import export_hf  # noqa: E402
from moevlm.generate import generate, generate_stream  # noqa: E402
from moevlm.models.factory import build_model  # noqa: E402
from moevlm.models.hf_config import resolve_pretrained  # noqa: E402
from moevlm.models.upcycle import upcycle  # noqa: E402

SIZES = ("demo", "real")
WAYS = ("moevlm eager", "moevlm compile", "transformers eager", "transformers static+compile")
PROMPT = "What is in the image?"
DIGITS = "zero one two three four five six seven eight nine".split()
HAS_COMPILE = "compile" in inspect.signature(generate_stream).parameters


def demo_checkpoint(folder: Path, overrides: tuple[str, ...] = ()) -> Path:
    """The demo's model shape with random weights; its BPE tokenizer learned from digit captions."""
    generator = torch.Generator().manual_seed(0)
    texts = [" ".join(DIGITS[int(i)] for i in torch.randint(0, 10, (3,), generator=generator)) for _ in range(400)]
    config = load_config("default", overrides=[*DEMO_OVERRIDES, "decoder.max_text_len=96", *overrides])
    tokenizer = Tokenizer.train(texts + [PROMPT], "bpe", config.model.tokenizer.vocab_size)
    config = load_config("default", overrides=[*DEMO_OVERRIDES, "decoder.max_text_len=96", *overrides,
                                                f"decoder.vocab_size={tokenizer.vocab_size}"])
    torch.manual_seed(0)
    model = build_model(config.model).eval()
    with torch.no_grad():  # weights farther from zero than at initialisation: greedy tokens vary
        for param in model.parameters():
            if param.dim() > 1:
                param.normal_(std=0.15)
    write_checkpoint(folder, PreparedModel(model, tokenizer, config, set()))
    return folder


def real_checkpoint(folder: Path) -> Path:
    """SigLIP-base tower + SmolLM2-135M-shaped Llama, random weights, every MLP 4 experts top-2."""
    from moevlm.data.tokenizer_factory import load_tokenizer
    from pretrained_fixtures import SIGLIP_BASE_224, SMOLLM2_135M, tiny_llama, tiny_siglip_vision

    vision = tiny_siglip_vision(folder / "siglip", **SIGLIP_BASE_224)
    lm = tiny_llama(folder / "lm", **SMOLLM2_135M)
    config = load_config("llava", overrides=[f"model.vision=hf:{vision}", f"model.lm=hf:{lm}",
                                             "decoder.max_text_len=128"])
    config = Config(model=resolve_pretrained(config.model), data=config.data, train=config.train)
    torch.manual_seed(0)
    model, config = upcycle(build_model(config.model), config, 4, 2, "all")
    checkpoint = folder / "checkpoint"
    write_checkpoint(checkpoint, PreparedModel(model.eval(), load_tokenizer(None, config.model), config, set()),
                     images=image_preparer(config.model))
    return checkpoint


@dataclass
class Pair:
    """One set of weights in both stacks, and the same inputs for each."""

    ours: torch.nn.Module
    theirs: torch.nn.Module
    prompt: list[int]  # moevlm's prompt ids
    hf_prompt: list[int]  # the same prompt as transformers' LLaVA reads it
    pixels: torch.Tensor  # (1, C, S, S) in [-1, 1], moevlm's input
    hf_pixels: torch.Tensor  # the same image as the exported tower reads it
    pad_id: int


def load_pair(checkpoint: Path, export: Path) -> Pair:
    from transformers import LlavaForConditionalGeneration

    ours, tokenizer, config = load_model(checkpoint)
    theirs = LlavaForConditionalGeneration.from_pretrained(export, dtype=torch.float32).eval()
    theirs.generation_config.eos_token_id = None  # no early stop (and no end token held back)
    size = config.model.vision.image_size
    pixels = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(1)) * 2 - 1
    # As the exported image processor normalises (tests/export checks the processor against this).
    mean = getattr(ours.vision, "pixel_mean", torch.full((3,), 0.5)).view(1, -1, 1, 1)
    std = getattr(ours.vision, "pixel_std", torch.full((3,), 0.5)).view(1, -1, 1, 1)
    prompt = tokenizer.prompt_ids(PROMPT)
    image_id = theirs.config.image_token_id
    hf_prompt = prompt if ours.images_in_text else [image_id] * ours.num_image_tokens + prompt
    hf_prompt = [image_id if i == getattr(ours, "image_token_id", None) else i for i in hf_prompt]
    return Pair(ours, theirs, prompt, hf_prompt, pixels, ((pixels + 1) / 2 - mean) / std, tokenizer.pad_id)


def moevlm_generate(pair: Pair, batch: int, tokens: int, compiled: bool) -> torch.Tensor:
    options = {"compile": True} if compiled else {}
    out = generate(pair.ours, pair.pixels.expand(batch, -1, -1, -1), [pair.prompt] * batch, eos_id=-1,
                   pad_id=pair.pad_id, max_new_tokens=tokens, **options)
    assert all(len(row) == tokens for row in out), "moevlm stopped early: raise decoder.max_text_len"
    return torch.tensor(out)


def hf_generate(pair: Pair, batch: int, tokens: int, compiled: bool) -> torch.Tensor:
    from transformers import CompileConfig

    ids = torch.tensor([pair.hf_prompt] * batch)
    options = {}
    if compiled:
        compile_config = CompileConfig()
        compile_config._compile_all_devices = True  # transformers compiles on accelerators only otherwise
        options = {"cache_implementation": "static", "compile_config": compile_config}
    out = pair.theirs.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                               pixel_values=pair.hf_pixels.expand(batch, -1, -1, -1), do_sample=False,
                               max_new_tokens=tokens, min_new_tokens=tokens, **options)
    return out[:, ids.size(1):]


def run_way(pair: Pair, way: str, batch: int, tokens: int) -> tuple[float, torch.Tensor]:
    """(seconds, tokens (batch, tokens)) of one generation."""
    run = moevlm_generate if way.startswith("moevlm") else hf_generate
    began = time.perf_counter()
    with torch.inference_mode():
        out = run(pair, batch, tokens, way.endswith("compile"))
    return time.perf_counter() - began, out


def ways(compiled: bool = True) -> list[str]:
    return [way for way in WAYS if (HAS_COMPILE or way != "moevlm compile") and (compiled or "compile" not in way)]


def spread(values: list[float], fmt: str = "{:,.0f}") -> str:
    return f"{fmt.format(statistics.median(values))} ({fmt.format(min(values))}-{fmt.format(max(values))})"


def bench_generation(pair: Pair, batches: list[int], tokens: int, repeats: int, compiled: bool = True) -> None:
    header = " | ".join(WAYS)
    print(f"| batch | {header} | moevlm / transformers, eager | moevlm compile / transformers compile |")
    print("|---" * (len(WAYS) + 3) + "|")
    notes = []
    for batch in batches:
        rates: dict[str, list[float]] = {way: [] for way in ways(compiled)}
        outputs, warm = {}, {}
        for way in rates:
            warm[way], outputs[way] = run_way(pair, way, batch, tokens)
        for _ in range(repeats):
            for way in rates:
                seconds, _ = run_way(pair, way, batch, tokens)
                rates[way].append(batch * tokens / seconds)
        cells = [spread(rates[way]) if way in rates else "n/a" for way in WAYS]
        median = {way: statistics.median(values) for way, values in rates.items()}
        eager = median["moevlm eager"] / median["transformers eager"]
        both = "n/a" if not {"moevlm compile", "transformers static+compile"} <= median.keys() else \
            f"{median['moevlm compile'] / median['transformers static+compile']:.2f}x"
        print(f"| {batch} | {' | '.join(cells)} | {eager:.2f}x | {both} |", flush=True)
        reference = outputs["moevlm eager"]
        agree = {way: bool(out.equal(reference)) for way, out in outputs.items() if way != "moevlm eager"}
        notes.append(f"batch {batch}: greedy tokens equal to moevlm eager's: "
                     f"{', '.join(f'{way} {ok}' for way, ok in agree.items())}; first run (warm-up, compiles): "
                     f"{', '.join(f'{way} {warm[way]:.1f} s' for way in warm)}")
    print("\n".join(notes), flush=True)


def bench_training(pair: Pair, batch: int, repeats: int) -> None:
    """Milliseconds of one forward + backward in each stack, and both losses."""
    answer = torch.randint(5, 200, (batch, 32), generator=torch.Generator().manual_seed(3))
    ids = torch.cat([torch.tensor([pair.prompt] * batch), answer], dim=1)
    labels = torch.cat([ids[:, 1:], torch.full((batch, 1), -100)], dim=1)
    labels[:, :len(pair.prompt) - 1] = -100  # the answer only, as training scores it
    hf_ids = torch.cat([torch.tensor([pair.hf_prompt] * batch), answer], dim=1)
    hf_labels = hf_ids.clone()
    hf_labels[:, :len(pair.hf_prompt)] = -100
    pixels, hf_pixels = pair.pixels.expand(batch, -1, -1, -1), pair.hf_pixels.expand(batch, -1, -1, -1)

    def ours() -> float:
        out = pair.ours(pixels, ids, labels=labels)
        out.loss.backward()
        return float(out.lm_loss.detach())

    def theirs() -> float:
        loss = pair.theirs(input_ids=hf_ids, attention_mask=torch.ones_like(hf_ids), pixel_values=hf_pixels,
                           labels=hf_labels).loss
        loss.backward()
        return float(loss.detach())

    steps = {"moevlm": ours, "transformers": theirs}
    times: dict[str, list[float]] = {name: [] for name in steps}
    losses = {}
    for model in (pair.ours, pair.theirs):
        model.train()
    try:
        for name, step in steps.items():
            losses[name] = step()  # warm-up
        for _ in range(repeats):
            for name, step in steps.items():
                began = time.perf_counter()
                step()
                times[name].append(1e3 * (time.perf_counter() - began))
    finally:
        for model in (pair.ours, pair.theirs):
            model.eval()
            model.zero_grad(set_to_none=True)
    ratio = statistics.median(times["transformers"]) / statistics.median(times["moevlm"])
    print(f"training forward+backward, batch {batch}: moevlm {spread(times['moevlm'])} ms, transformers "
          f"{spread(times['transformers'])} ms (moevlm {ratio:.2f}x as fast); next-token loss moevlm "
          f"{losses['moevlm']:.4f} (train mode: its routers add noise; its auxiliary losses "
          f"also backpropagate), "
          f"transformers {losses['transformers']:.4f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="demo", help=f"comma-separated, of {', '.join(SIZES)} (default demo)")
    parser.add_argument("--batches", default="1,8,32", help="generation batch sizes (default 1,8,32)")
    parser.add_argument("--tokens", type=int, default=64, help="new tokens per row (default 64)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-compile", action="store_true", help="the eager ways only (no minutes of compiling)")
    parser.add_argument("--train-batch", type=int, default=8, help="rows of the training step (default 8)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    sizes = args.sizes.split(",")
    unknown = [size for size in sizes if size not in SIZES]
    if unknown:
        parser.exit(2, f"--sizes: unknown {', '.join(unknown)} (expected {', '.join(SIZES)})\n")
    import transformers

    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {torch.get_num_threads()} thread(s), "
          f"load average before: {os.getloadavg()[0]:.2f}; moevlm compile: "
          f"{'yes' if HAS_COMPILE else 'n/a (generate has no compile option)'}", flush=True)
    for size in sizes:
        with tempfile.TemporaryDirectory(prefix="moevlm-peer-") as tmp:
            root = Path(tmp)
            began = time.perf_counter()
            checkpoint = demo_checkpoint(root / "checkpoint") if size == "demo" else real_checkpoint(root)
            export_hf(checkpoint, root / "hf")
            pair = load_pair(checkpoint, root / "hf")
            params = sum(p.numel() for p in pair.ours.parameters())
            print(f"\n## {size}: {params / 1e6:.1f} M parameters; built and exported in "
                  f"{time.perf_counter() - began:.0f} s\n", flush=True)
            bench_generation(pair, [int(b) for b in args.batches.split(",")], args.tokens, args.repeats,
                             not args.no_compile)
            bench_training(pair, args.train_batch, args.repeats)
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
