"""Rows/s read and decoded from a Parquet file, and peak memory when streaming it (data.preload=false).

Writes a Parquet file of --rows rows (an ``Image`` column of --size px JPEGs, 64 different
pictures repeated, and a caption column; row groups of 1,000 rows), then in a fresh process each:
- read: ``read_data`` as ``preload=true`` reads it (schema check, text read up front, images left
  in the file);
- stream: ``read_data`` with ``preload=false`` (which first converts the file to Arrow in a
  temporary ``datasets`` cache), the dataset (every image's header checked up front), then every
  row decoded and resized to --image-size through a shuffling DataLoader (--workers), as training
  reads it.
Peak memory is each process's peak resident set (with the pages of memory-mapped files it read),
``anon_mb_at_end`` its memory not backed by a file when done; "preload would hold" is what
``preload=true`` keeps of the decoded images alone (rows x 3 x image-size^2 bytes).

    python benchmarks/data_read.py [--rows 20000] [--size 256] [--image-size 224] [--workers 0]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def write_parquet(path: Path, rows: int, size: int) -> None:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    rng = np.random.default_rng(0)
    pictures = []
    for _ in range(64):
        # A smooth gradient plus noise: JPEG sizes near a photo's, not a flat colour's.
        base = np.linspace(0, 255, size)[None, :, None] * rng.random(3)[None, None, :]
        pixels = np.clip(base + rng.normal(0, 12, (size, size, 3)), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
        pictures.append(buf.getvalue())
    schema = pa.schema([("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
                        ("caption", pa.string())])
    # No dictionary encoding: it would store the 64 repeated pictures once, unlike real data.
    with pq.ParquetWriter(path, schema, use_dictionary=False) as writer:
        for start in range(0, rows, 1000):
            count = min(1000, rows - start)
            writer.write_table(pa.table({
                "image": [{"bytes": pictures[(start + i) % 64], "path": None} for i in range(count)],
                "caption": [f"picture number {start + i}" for i in range(count)]}, schema=schema))


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def anon_mb() -> float | None:
    """Resident memory not backed by a file (Linux): the peak above also counts the pages of the
    memory-mapped Arrow file that were read, which the kernel may drop at any time."""
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return None
    return next(int(line.split()[1]) / 1024 for line in status.splitlines() if line.startswith("RssAnon:"))


def measure(phase: str, path: str, image_size: int, workers: int) -> dict:
    from torch.utils.data import DataLoader

    from moevlm.config import load_config
    from moevlm.data.dataset import ImageTextDataset, collate
    from moevlm.data.images import ScratchImages
    from moevlm.data.sources import read_data
    from moevlm.data.tokenizer import Tokenizer

    baseline = peak_mb()
    start = time.perf_counter()
    samples, _ = read_data(path, load_config("tiny", overrides=[f"data.preload={phase == 'read'}"]).data)
    result = {"rows": len(samples), "read_rows_per_s": len(samples) / (time.perf_counter() - start)}
    if phase == "stream":
        tok = Tokenizer.train(["picture number 0123456789"], "char", 0)
        start = time.perf_counter()
        dataset = ImageTextDataset(samples, tok, ScratchImages(image_size), 64, preload=False)
        result["check_rows_per_s"] = len(samples) / (time.perf_counter() - start)
        loader = DataLoader(dataset, batch_size=64, shuffle=True, num_workers=workers,
                            collate_fn=lambda items: collate(items, tok.pad_id))
        start = time.perf_counter()
        decoded = sum(len(batch["images"]) for batch in loader)
        result["decode_rows_per_s"] = decoded / (time.perf_counter() - start)
    anon = anon_mb()
    result.update(baseline_mb=round(baseline), peak_mb=round(peak_mb()), anon_mb_at_end=anon and round(anon))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20000)
    parser.add_argument("--size", type=int, default=256, help="stored JPEG size in pixels")
    parser.add_argument("--image-size", type=int, default=224, help="the model's image size (decoded to this)")
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--phase", choices=["read", "stream"], help=argparse.SUPPRESS)
    parser.add_argument("--file", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase:
        print(json.dumps(measure(args.phase, args.file, args.image_size, args.workers)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "data.parquet"
        write_parquet(path, args.rows, args.size)
        report = {"rows": args.rows, "file_mb": round(path.stat().st_size / 2**20, 1),
                  "preload_would_hold_mb": round(args.rows * 3 * args.image_size ** 2 / 2**20)}
        for phase in ("read", "stream"):
            out = subprocess.run([sys.executable, __file__, "--phase", phase, "--file", str(path),
                                  "--image-size", str(args.image_size), "--workers", str(args.workers)],
                                 check=True, capture_output=True, text=True,
                                 env=os.environ | {"HF_DATASETS_CACHE": str(Path(tmp) / "cache")}).stdout
            report[phase] = json.loads(out.strip().splitlines()[-1])
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
