"""The seed notebook's task: three photos in its base64 CSV format, trained with --preset seed.

Photos: the two JPEG photos scikit-learn ships (china.jpg, flower.jpg) and a crop of the
first, each with a caption of the seed's style. Trains `moevlm train --preset seed` with no
other flags, then checks that greedy `moevlm caption` reproduces each caption exactly.

    python benchmarks/seed_three_photos.py [--out DIR]
"""

from __future__ import annotations

import argparse
import base64
import csv
import io
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image
from sklearn.datasets import load_sample_images

# At most 32 characters, as the seed's captions (its text context was 40 tokens).
CAPTIONS = [
    "A temple among green trees.",
    "A pink flower in close-up.",
    "Leaves over a tiled roof.",
]


def write_seed_csv(folder: Path) -> tuple[Path, list[Path]]:
    china, flower = (Image.fromarray(array) for array in load_sample_images().images)
    photos = [china, flower, china.crop((0, 0, 320, 214))]
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    with open(folder / "seed.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["b64string_images", "caption"])
        for i, (photo, caption) in enumerate(zip(photos, CAPTIONS)):
            buf = io.BytesIO()
            photo.save(buf, format="JPEG")
            writer.writerow([base64.b64encode(buf.getvalue()).decode(), caption])
            paths.append(folder / f"photo{i}.jpg")
            paths[-1].write_bytes(buf.getvalue())
    return folder / "seed.csv", paths


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    root = args.out or Path(tempfile.mkdtemp(prefix="moevlm-seed-"))
    data, photos = write_seed_csv(root / "data")
    moevlm = [sys.executable, "-m", "moevlm"]
    start = time.perf_counter()
    subprocess.run(moevlm + ["train", "--preset", "seed", "--data", str(data), "--out", str(root / "model")],
                   check=True)
    seconds = time.perf_counter() - start
    result = subprocess.run(moevlm + ["caption", "--model", str(root / "model"), "--json", *map(str, photos)],
                            check=True, capture_output=True, text=True)
    texts = [json.loads(line)["text"] for line in result.stdout.splitlines()]
    correct = sum(text == caption for text, caption in zip(texts, CAPTIONS))
    for text, caption in zip(texts, CAPTIONS):
        print(f"{'ok  ' if text == caption else 'MISS'} true: {caption!r}\n     got:  {text!r}")
    print(json.dumps({"train_seconds": round(seconds, 1), "exact": f"{correct}/{len(CAPTIONS)}"}))
    return 0 if correct == len(CAPTIONS) else 1


if __name__ == "__main__":
    sys.exit(main())
