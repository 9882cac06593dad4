"""What ``--quantize int8`` costs a trained model: held-out exact match, BLEU-4 and loss of one
checkpoint, float32 and int8, and the share of greedy captions that stay equal.

Each is scored as ``moevlm eval`` scores it (``evaluate``), on the CPU, ``--batch-size`` rows at a
time: up to 8 rows decode through the int8 CPU kernel (bf16 activations), more through the
dequantized matmul (float32 activations), so both sizes are worth a run. ``--compile`` decodes both
with the compiled step (``moevlm eval --compile``), whose int8 layers take the same kernel.

    moevlm demo --out runs/demo          # trains the demo model and writes its held-out scenes
    OMP_NUM_THREADS=1 python benchmarks/quantize_quality.py runs/demo/model runs/demo/data/val.csv \\
        [--batch-size 8] [--compile]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from moevlm.checkpoint import load_model, resolve_checkpoint
from moevlm.data.sources import read_data
from moevlm.data.training_data import dataset_for
from moevlm.evaluate import evaluate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="a checkpoint or run folder (its best checkpoint is used)")
    parser.add_argument("data", help="held-out data with reference captions")
    parser.add_argument("--batch-size", type=int, default=8, help="rows scored together (default 8)")
    parser.add_argument("--compile", action="store_true", help="decode with the compiled step (eval --compile)")
    args = parser.parse_args()
    chosen, _ = resolve_checkpoint(Path(args.model), "best")
    results = {}
    for kind in (None, "int8"):
        model, tokenizer, config = load_model(chosen, quantize=kind)
        samples, _ = read_data(args.data, config.data)
        dataset = dataset_for(samples, tokenizer, config, augment=None, folder=chosen)
        results[kind] = evaluate(model, dataset, tokenizer, batch_size=args.batch_size, compile=args.compile)
    fp32, int8 = results[None], results["int8"]
    equal = sum(a[1] == b[1] for a, b in zip(fp32["predictions"], int8["predictions"]))
    print(json.dumps({
        "rows": len(fp32["predictions"]), "batch_size": args.batch_size, "compile": args.compile,
        **{key: {"fp32": fp32[key], "int8": int8[key], "change": int8[key] - fp32[key]}
           for key in ("exact_match", "bleu4", "loss")},
        "equal_captions": equal / len(fp32["predictions"]),
    }))


if __name__ == "__main__":
    main()
