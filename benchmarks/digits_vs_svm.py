"""Default preset on the 1,797 UCI digits (one word per image) against an RBF SVM, same split.

Trains `moevlm train --data digits.csv` with default settings (unless --model names a run
made that way), then scores every held-out row with `moevlm eval` and fits scikit-learn's
SVC on the same training rows (8x8 pixels scaled to [0, 1]).

    python benchmarks/digits_vs_svm.py [--out DIR] [--model DIR] [--set KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import csv
import json
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="work folder (default: a temporary one)")
    parser.add_argument("--model", type=Path, default=None, help="a run already trained on digits.csv")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config override for the training run (repeatable), e.g. decoder.arch=gpt")
    args = parser.parse_args()
    root = args.out or Path(tempfile.mkdtemp(prefix="moevlm-digits-"))
    data = write_digit_captions(root / "data")
    model = args.model
    seconds = None
    if model is None:
        model = root / "model"
        start = time.perf_counter()
        overrides = [arg for value in args.overrides for arg in ("--set", value)]
        subprocess.run([sys.executable, "-m", "moevlm", "train", "--data", str(data), "--out", str(model), *overrides],
                       check=True)
        seconds = time.perf_counter() - start

    config = load_config("default")
    samples, _ = read_samples(data)
    train, val = split_samples(samples, config.data.val_fraction, config.train.seed)
    val_csv = root / "data" / "val_rows.csv"
    with open(val_csv, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "caption"])
        writer.writerows((sample.image, sample.turns[0][1]) for sample in val)
    result = json.loads(subprocess.run([sys.executable, "-m", "moevlm", "eval", "--model", str(model),
                                        "--data", str(val_csv), "--json"],
                                       check=True, capture_output=True, text=True).stdout)

    digits = load_digits()
    features, labels = digits.data / 16.0, digits.target
    train_idx, val_idx = [scan_index(s.image) for s in train], [scan_index(s.image) for s in val]
    svm = SVC().fit(features[train_idx], labels[train_idx]).score(features[val_idx], labels[val_idx])
    print(json.dumps({"val_rows": len(val), "moevlm_exact_match": round(result["exact_match"], 4),
                      "svm_accuracy": round(svm, 4),
                      "train_seconds": None if seconds is None else round(seconds, 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
