"""What ``--quantize int8`` costs a trained model: ``moevlm eval`` of one checkpoint on held-out data,
float32 and int8, and the share of greedy captions that stay equal.

    moevlm demo --out runs/demo          # trains the demo model and writes its held-out scenes
    OMP_NUM_THREADS=1 python benchmarks/quantize_quality.py runs/demo/model runs/demo/data/val.csv
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from moevlm.checkpoint import resolve_checkpoint
from moevlm.evaluate import evaluate_file


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="a checkpoint or run folder (its best checkpoint is used)")
    parser.add_argument("data", help="held-out data with reference captions")
    args = parser.parse_args()
    chosen, _ = resolve_checkpoint(Path(args.model), "best")
    results = {kind: evaluate_file(chosen, args.data, device="cpu", quantize=kind) for kind in (None, "int8")}
    fp32, int8 = results[None], results["int8"]
    equal = sum(a[1] == b[1] for a, b in zip(fp32["predictions"], int8["predictions"]))
    print(json.dumps({
        "rows": len(fp32["predictions"]),
        "exact_match": {"fp32": fp32["exact_match"], "int8": int8["exact_match"],
                        "change": int8["exact_match"] - fp32["exact_match"]},
        "bleu4": {"fp32": fp32["bleu4"], "int8": int8["bleu4"], "change": int8["bleu4"] - fp32["bleu4"]},
        "loss": {"fp32": fp32["loss"], "int8": int8["loss"], "change": int8["loss"] - fp32["loss"]},
        "equal_captions": equal / len(fp32["predictions"]),
    }, indent=1))


if __name__ == "__main__":
    main()
