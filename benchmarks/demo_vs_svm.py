"""What an RBF SVM scores on `moevlm demo --seed S`'s validation scenes when it reads each digit alone.
The SVM gets every scene cut into its digits for free and is fitted on the scans the demo's training
scenes are drawn from; a scene counts as read when all its digits are, as exact match counts it.
It shows how hard a seed's held-out handwriting is: its demo figure is best read beside this one.
    python benchmarks/demo_vs_svm.py [--seeds 0,1,2]
"""

from __future__ import annotations

import argparse
import json

from sklearn.datasets import load_digits
from sklearn.svm import SVC

from moevlm.data.digits import digit_pools, digit_scenes
from moevlm.demo import SCENE_SIZE, SCENE_SNAP, VAL_SCENES


def score(seed: int) -> dict:
    digits = load_digits()
    features, labels = digits.data / 16.0, digits.target
    train_pool, val_pool = digit_pools(len(labels), seed)
    read = SVC().fit(features[train_pool], labels[train_pool]).predict(features) == labels
    scenes = digit_scenes("val", VAL_SCENES, seed, size=SCENE_SIZE, snap=SCENE_SNAP, packed=True)
    scene_hits = [bool(read[picks].all()) for _, _, picks in scenes]
    return {"seed": seed, "svm_digit_accuracy": round(float(read[val_pool].mean()), 4),
            "misread_scans": int((~read[val_pool]).sum()), "of_scans": len(val_pool),
            "svm_scene_exact_match": round(sum(scene_hits) / len(scene_hits), 4), "scenes": len(scene_hits)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2", help="the demo's --seed values, comma-separated")
    args = parser.parse_args()
    for seed in (int(s) for s in args.seeds.split(",")):
        print(json.dumps(score(seed)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
