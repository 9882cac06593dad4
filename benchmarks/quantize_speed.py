"""Batch-1 greedy decoding speed and loss, float32 against ``--quantize int8``, at real shapes.

Built from configs with random weights, offline (as benchmarks/real_shapes_chain.py): a vision tower
shaped like SigLIP-base-patch16-224 (196 image tokens) and an LM shaped like SmolLM2-135M (width
576, 30 layers, 9 heads with 3 KV heads, MLP 1536, vocabulary 49,152, tied embeddings). ``--moe``
upcycles every other MLP to 4 SwiGLU experts, top-2 (as the real-shapes chain's moe stage).

Speed: one image and an 8-token prompt, greedy, no early stop; tokens/s of the decoding steps alone
(steps over their total time in a repeat, so the prefill of 204 positions does not count; a mean, not a
median, since a greedy call that makes several tokens shows as one long wait and several instant ones),
decoded as ``--compile`` does (moevlm's compiled step over a
static cache: the headline) and eagerly. Both models are compiled first (minutes each at this shape
with an empty inductor cache; the first call's time is printed). In each of ``--repeats`` repeats the
two models decode side by side, alternating step by step, so a burst of other work on the machine
slows both; the median and the range over repeats are printed, and whether int8's compiled greedy
tokens equal its eager ones. Loss: the mean next-token loss of both models on one fixed batch of 4 rows
(random weights: the loss is ~ln(vocabulary); its change is what counts).

``--transformers`` also times both LMs (text only: a 16-token prompt, ``--tokens`` new tokens, no
early stop) in transformers' own ``generate``, eager and with a static cache + ``torch.compile``.

    OMP_NUM_THREADS=1 python benchmarks/quantize_speed.py [--moe] [--repeats 3] [--transformers]
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
os.environ["HF_HUB_OFFLINE"] = "1"

from moevlm.config import load_config  # noqa: E402
from moevlm.generate import generate_stream  # noqa: E402
from moevlm.models.factory import build_model  # noqa: E402
from moevlm.models.hf_config import resolve_pretrained  # noqa: E402
from moevlm.models.quantized import Int8Linear, Int8MoE, quantize_model  # noqa: E402
from pretrained_fixtures import SIGLIP_BASE_224, SMOLLM2_135M, tiny_llama, tiny_siglip_vision  # noqa: E402


def build(root: Path, moe: bool):
    vision = tiny_siglip_vision(root / "siglip", **SIGLIP_BASE_224)
    lm = tiny_llama(root / "lm", **SMOLLM2_135M)
    overrides = [f"model.vision=hf:{vision}", f"model.lm=hf:{lm}"]
    if moe:
        overrides += ["moe.num_experts=4", "moe.top_k=2", "moe.layers=every-other"]
    cfg = resolve_pretrained(load_config("llava", overrides=overrides).model)
    return build_model(cfg).eval(), cfg


def decode(models: dict, image: torch.Tensor, prompt: list[int], tokens: int,
           compile: bool) -> dict[str, tuple[list[float], list[int]]]:
    """Each model's wall time of each decoding step after the first token (which comes with the
    prefill), and its tokens; the models take turns, one step each."""
    streams = {name: generate_stream(model, image, [prompt], eos_id=-1, pad_id=0, max_new_tokens=tokens,
                                     compile=compile) for name, model in models.items()}
    out = {name: ([], [int(next(stream))]) for name, stream in streams.items()}  # the prefills
    for _ in range(tokens - 1):
        for name, stream in streams.items():
            began = time.perf_counter()
            token = next(stream)
            out[name][0].append(time.perf_counter() - began)
            out[name][1].append(int(token))
    return out


def fixed_batch_loss(model, cfg, generator: torch.Generator) -> float:
    n_img, vocab = cfg.vision.num_image_tokens, cfg.decoder.vocab_size
    images = torch.rand(4, 3, cfg.vision.image_size, cfg.vision.image_size, generator=generator) * 2 - 1
    text = torch.randint(0, vocab, (4, 64), generator=generator)
    ids = torch.cat([torch.full((4, n_img), cfg.decoder.image_token_id), text], dim=1)
    labels = torch.cat([torch.full((4, n_img), -100), text[:, 1:], torch.full((4, 1), -100)], dim=1)
    return float(model(images, ids, labels=labels).loss)


def lm_rates(models: dict, tokens: int, repeats: int, compiled: bool) -> dict[str, list[float]]:
    """tokens/s of each model's LM in transformers' generate (compiled: static cache + torch.compile)."""
    from transformers import CompileConfig

    ids = torch.randint(10, 1000, (1, 16), generator=torch.Generator().manual_seed(0))
    options = {}
    if compiled:
        config = CompileConfig()
        config._compile_all_devices = True  # transformers compiles on accelerators only otherwise
        options = {"cache_implementation": "static", "compile_config": config}
    rates = {name: [] for name in models}
    for repeat in range(repeats + 1):  # the first compiles, untimed
        for name, model in models.items():
            model.lm.generation_config.eos_token_id = None
            began = time.perf_counter()
            model.lm.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens, do_sample=False,
                              **options)
            if repeat:
                rates[name].append(tokens / (time.perf_counter() - began))
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--moe", action="store_true", help="every other MLP as 4 experts, top-2")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--transformers", action="store_true",
                        help="also transformers' generate, eager and with a static cache + torch.compile")
    parser.add_argument("--tokens", type=int, default=33, help="tokens generated per repeat (default 33)")
    args = parser.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory(prefix="moevlm-quantize-") as root:
        began = time.perf_counter()
        fp32, cfg = build(Path(root), args.moe)
    int8 = quantize_model(copy.deepcopy(fp32), "int8", torch.device("cpu"))
    layers = [type(m) for m in int8.modules()]
    print(f"built in {time.perf_counter() - began:.0f} s; {torch.get_num_threads()} thread(s), "
          f"torch {torch.__version__}; int8: {layers.count(Int8Linear)} linear layers, "
          f"{layers.count(Int8MoE)} MoE layers")
    size = cfg.vision.image_size
    image = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(1)) * 2 - 1
    prompt = [cfg.decoder.image_token_id] * cfg.vision.num_image_tokens + list(range(10, 18))
    models = {"fp32": fp32, "int8": int8}
    rates = {(path, name): [] for path in ("compiled", "eager") for name in models}
    tokens = {}
    with torch.inference_mode():
        for name, model in models.items():  # compiles the step, and warms up the eager path
            began = time.perf_counter()
            decode({name: model}, image, prompt, 3, compile=True)
            print(f"{name}: first compiled call {time.perf_counter() - began:.0f} s", flush=True)
            decode({name: model}, image, prompt, 3, compile=False)
        for _ in range(args.repeats):
            for path in ("compiled", "eager"):
                for name, (times, tokens[path, name]) in decode(models, image, prompt, args.tokens,
                                                                compile=path == "compiled").items():
                    rates[path, name].append(len(times) / sum(times))
        losses = {name: fixed_batch_loss(model, cfg, torch.Generator().manual_seed(2))
                  for name, model in models.items()}
    for path in ("compiled", "eager"):
        for name in models:
            values = rates[path, name]
            print(f"{path} {name}: {statistics.median(values):.1f} tokens/s "
                  f"(range {min(values):.1f}-{max(values):.1f})")
        ratios = [i / f for f, i in zip(rates[path, "fp32"], rates[path, "int8"])]
        print(f"{path} int8 / fp32: {statistics.median(ratios):.2f}x "
              f"(per repeat: {', '.join(f'{r:.2f}' for r in ratios)})", flush=True)
    print(f"int8 greedy tokens compiled == eager: {tokens['compiled', 'int8'] == tokens['eager', 'int8']}; "
          f"loss on the fixed batch fp32 {losses['fp32']:.5f}, int8 {losses['int8']:.5f} "
          f"(change {losses['int8'] - losses['fp32']:+.5f})")
    if args.transformers:
        with torch.inference_mode():
            for compiled in (False, True):
                lm = lm_rates({"fp32": fp32, "int8": int8}, args.tokens, args.repeats, compiled)
                f, i = (statistics.median(lm[name]) for name in ("fp32", "int8"))
                print(f"transformers generate, {'static cache + torch.compile' if compiled else 'eager'}: "
                      f"fp32 {f:.1f} tokens/s ({min(lm['fp32']):.1f}-{max(lm['fp32']):.1f}), int8 {i:.1f} "
                      f"({min(lm['int8']):.1f}-{max(lm['int8']):.1f}): {i / f:.2f}x", flush=True)


if __name__ == "__main__":
    main()
