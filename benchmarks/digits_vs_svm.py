"""Default preset on the 1,797 UCI digits (one word per image) against an RBF SVM, same split.

Splits the digits once (10 % held out, by the default train.seed), then for each seed trains
`moevlm train --data train_rows.csv --val-data val_rows.csv --set train.seed=S` with default
settings and scores every held-out row with `moevlm eval --checkpoint last` (the best checkpoint is
chosen on these same rows, so the last one keeps the figure honest). scikit-learn's SVC is fitted
on the same training rows (8x8 pixels scaled to [0, 1]).

    python benchmarks/digits_vs_svm.py [--out DIR] [--seeds 0,1,2] [--model DIR] [--set KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from sklearn.datasets import load_digits
from sklearn.svm import SVC

from moevlm.config import load_config
from moevlm.data.dataset import split_samples
from moevlm.data.digits import write_digit_captions
from moevlm.data.records import read_samples


def scan_index(image_path: str) -> int:
    return int(Path(image_path).stem)  # write_digit_captions names each PNG by its scan index


def write_rows(path: Path, samples) -> Path:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "caption"])
        writer.writerows((sample.image, sample.turns[0][1]) for sample in samples)
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="work folder (default: a temporary one)")
    parser.add_argument("--seeds", default="0,1,2", help="train.seed of each run, comma-separated")
    parser.add_argument("--model", type=Path, default=None, help="score this run (trained on train_rows.csv) "
                                                                   "instead of training")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config override for the training runs (repeatable), e.g. train.ema_decay=0")
    args = parser.parse_args()
    root = args.out or Path(tempfile.mkdtemp(prefix="moevlm-digits-"))
    samples, _ = read_samples(write_digit_captions(root / "data"))
    train, val = split_samples(samples, load_config("default").data.val_fraction, seed=0)
    train_csv = write_rows(root / "data" / "train_rows.csv", train)
    val_csv = write_rows(root / "data" / "val_rows.csv", val)

    digits = load_digits()
    features, labels = digits.data / 16.0, digits.target
    train_idx, val_idx = [scan_index(s.image) for s in train], [scan_index(s.image) for s in val]
    svm = SVC().fit(features[train_idx], labels[train_idx]).score(features[val_idx], labels[val_idx])

    runs = []
    for seed in ([None] if args.model else [int(s) for s in args.seeds.split(",")]):
        model, seconds = args.model, None
        if model is None:
            model = root / f"model-seed{seed}"
            overrides = [arg for value in [*args.overrides, f"train.seed={seed}"] for arg in ("--set", value)]
            start = time.perf_counter()
            subprocess.run([sys.executable, "-m", "moevlm", "train", "--data", str(train_csv), "--val-data",
                            str(val_csv), "--out", str(model), "--no-tracking", *overrides], check=True)
            seconds = round(time.perf_counter() - start, 1)
        result = json.loads(subprocess.run([sys.executable, "-m", "moevlm", "eval", "--model", str(model),
                                            "--checkpoint", "last", "--data", str(val_csv), "--json"],
                                           check=True, capture_output=True, text=True).stdout)
        runs.append({"seed": seed, "exact_match": round(result["exact_match"], 4), "train_seconds": seconds})
        print(json.dumps(runs[-1]), flush=True)
    scores = [run["exact_match"] for run in runs]
    print(json.dumps({"val_rows": len(val), "svm_accuracy": round(svm, 4),
                      "moevlm_exact_match_mean": round(statistics.mean(scores), 4),
                      "moevlm_exact_match_min": min(scores), "runs": runs}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
