"""Greedy decoding speed of a checkpoint, eager against compiled (``generate(..., compile=True)``).

For each batch size: one prompt per image (the checkpoint's empty prompt, so <bos> only), 64 new tokens
with no early stop (eos never matches). Decoding tokens/s is the batch over the mean time of one
decoding step (the steps after the first token, which comes with the prefill; a mean, since compiled
greedy decoding of a small model hands over four tokens per call of its graph), so neither the prefill nor compiling
counts; end-to-end tokens/s is the batch x new tokens over the whole ``generate`` call (prefill
included, compiling not: the compiled side is warmed up first). Eager and compiled alternate, ``--repeats``
times each; the median and the range over the repeats are printed. The first compiled
call per batch bucket is timed separately: with an empty inductor cache (``--cache-dir`` a new folder)
it is the cold compile, in a second process with the same folder the warm one (graphs read back).

A model whose text limit is shorter than the prompt plus the new tokens has it raised for this run
(RoPE decoders have no position table; a learned one cannot be raised and the run says so).

    OMP_NUM_THREADS=1 python benchmarks/compiled_decode.py --model runs/demo [--batch 1 8] [--repeats 5]
        [--cache-dir /tmp/inductor-cold] [--compile-only]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="checkpoint folder")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cache-dir", help="TORCHINDUCTOR_CACHE_DIR for this run (a new folder: a cold compile)")
    parser.add_argument("--compile-only", action="store_true", help="time the first compiled calls only")
    return parser.parse_args()


def main() -> None:
    args = parse()
    if args.cache_dir:  # read by inductor when it is imported
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = args.cache_dir
    import torch

    from moevlm.checkpoint import load_model
    from moevlm.compiled import compiled_decoder
    from moevlm.generate import generate, generate_stream

    model, tokenizer, _ = load_model(args.model, device=torch.device("cpu"))
    model.eval()
    prompt = tokenizer.prompt_ids("")
    room = len(prompt) + args.new_tokens + (model.num_image_tokens if model.images_in_text else 0)
    decoder_cfg = model.cfg.decoder
    if decoder_cfg.max_text_len < room:
        if decoder_cfg.arch != "llama":
            sys.exit(f"{args.model}: text limit {decoder_cfg.max_text_len} < {room} and a learned position table")
        model.cfg = dataclasses.replace(model.cfg, decoder=dataclasses.replace(decoder_cfg, max_text_len=room))
    size = model.cfg.vision.image_size
    options = dict(eos_id=-1, pad_id=tokenizer.pad_id, max_new_tokens=args.new_tokens)
    result = {"threads": torch.get_num_threads(), "torch": torch.__version__, "new_tokens": args.new_tokens,
              "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 2)}

    def step_rate(batch, images, compile_):
        began = None
        for index, _ in enumerate(generate_stream(model, images, [prompt] * batch, compile=compile_, **options)):
            if not index:
                began = time.perf_counter()
        return batch * index / (time.perf_counter() - began)

    def whole_rate(batch, images, compile_):
        began = time.perf_counter()
        generate(model, images, [prompt] * batch, compile=compile_, **options)
        return batch * args.new_tokens / (time.perf_counter() - began)

    for batch in args.batch:
        images = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(batch))
        began = time.perf_counter()
        compiled_tokens = generate(model, images, [prompt] * batch, compile=True, **options)
        first_call = time.perf_counter() - began
        figures = {"first_compiled_call_s": round(first_call, 2),
                   "compile_s": {str(k): round(v, 2) for k, v in compiled_decoder(model).compile_seconds.items()}}
        if not args.compile_only:
            figures["compiled_equals_eager"] = compiled_tokens == generate(model, images, [prompt] * batch, **options)
            rates = {name: [] for name in ("eager_step", "compiled_step", "eager_whole", "compiled_whole")}
            for _ in range(args.repeats):
                for compile_, name in ((False, "eager"), (True, "compiled")):
                    rates[f"{name}_step"].append(step_rate(batch, images, compile_))
                    rates[f"{name}_whole"].append(whole_rate(batch, images, compile_))
            for name, values in rates.items():
                figures[f"{name}_tokens_per_s"] = {"median": round(statistics.median(values)),
                                                   "range": [round(min(values)), round(max(values))]}
            figures["step_speedup"] = round(figures["compiled_step_tokens_per_s"]["median"]
                                            / figures["eager_step_tokens_per_s"]["median"], 2)
            figures["whole_speedup"] = round(figures["compiled_whole_tokens_per_s"]["median"]
                                             / figures["eager_whole_tokens_per_s"]["median"], 2)
        result[f"batch{batch}"] = figures
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
