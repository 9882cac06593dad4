"""Reading WebDataset shards: the header index, rows/s read and decoded, and peak memory.

Writes SHARDS shards of KEYS keys (a JPEG photo-like image of SIZE pixels and a caption each),
then times ``read_shards`` (the one header pass, per 1,000 members), reading the image bytes
alone, and reading + decoding + resizing to the model's size (what a ``data.preload=false``
DataLoader worker does per row), and measures the peak memory (VmHWM) of a process that
indexes the shards, builds the ``data.preload=false`` dataset and runs one epoch over it, for
a quarter of the shards and for all of them: the growth per row is what a larger data set adds.

    python benchmarks/webdataset_read.py [--shards 4] [--keys 2000] [--size 320] [--image-size 224]
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
import tarfile
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image
from torch.utils.data import DataLoader

from moevlm.data.dataset import EpochBatchSampler, ImageTextDataset, collate
from moevlm.data.images import ScratchImages, open_image
from moevlm.data.tokenizer import Tokenizer
from moevlm.data.webdataset import read_shards

WORDS = ["red", "green", "blue", "small", "large", "square", "circle", "dog", "cat", "tree", "on", "a", "the"]


def photo(rng: np.random.Generator, size: int) -> bytes:
    """A smooth gradient with noise: JPEG sizes near a real photo's (not a solid colour's few hundred bytes)."""
    y, x = np.mgrid[0:size, 0:size] / size
    base = np.stack([x, y, (x + y) / 2], axis=-1) * rng.uniform(80, 255, size=3)
    pixels = np.clip(base + rng.normal(0, 12, size=base.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=85)
    return buf.getvalue()


def write_shards(folder: Path, shards: int, keys: int, size: int) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    images = [photo(rng, size) for _ in range(64)]  # encoding is not what is measured: reuse 64
    for s in range(shards):
        with tarfile.open(folder / f"{s:05d}.tar", "w") as tar:
            for k in range(keys):
                caption = " ".join(rng.choice(WORDS, size=6)).encode()
                for ext, data in (("jpg", images[(s * keys + k) % len(images)]), ("txt", caption)):
                    info = tarfile.TarInfo(f"{s:05d}{k:06d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return str(folder / f"{{00000..{shards - 1:05d}}}.tar")


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def one_epoch(pattern: str, image_size: int, workers: int) -> dict:
    """Index, build the preload=false dataset (it checks each image once), run one epoch."""
    before = memory_mib("VmRSS")
    (samples, _), index_s = timed(lambda: read_shards(pattern))
    tokenizer = Tokenizer.train([s.turns[0][1] for s in samples], "char")
    dataset, build_s = timed(lambda: ImageTextDataset(samples, tokenizer, ScratchImages(image_size), 48,
                                                      preload=False))
    rows_mib = memory_mib("VmRSS") - before  # what the rows (index, tokens) hold, images excluded
    loader = DataLoader(dataset, batch_sampler=EpochBatchSampler(len(dataset), 32, seed=0), num_workers=workers,
                        collate_fn=partial(collate, pad_id=tokenizer.pad_id))
    rows, epoch_s = timed(lambda: sum(len(batch["index"]) for batch in loader))
    assert rows == len(samples)
    return {"rows": rows, "index_s": index_s, "build_s": build_s, "epoch_s": epoch_s,
            "rows_mib": rows_mib, "peak_rss_mib": memory_mib("VmHWM")}


def memory_mib(field: str) -> float:
    """This process's resident (VmRSS) or peak resident (VmHWM) memory, from Linux's /proc. Not
    getrusage's ru_maxrss: Linux carries that over exec from the parent, whose peak would hide the child's."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise OSError(f"no {field} in /proc/self/status (Linux only)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--keys", type=int, default=2000, help="keys (image + caption) per shard")
    parser.add_argument("--size", type=int, default=320, help="side of the stored JPEGs")
    parser.add_argument("--image-size", type=int, default=224, help="side the dataset resizes to")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers for the epoch")
    parser.add_argument("--epoch", help=argparse.SUPPRESS)  # a child process: one epoch over this pattern
    args = parser.parse_args()
    if args.epoch:
        print(json.dumps(one_epoch(args.epoch, args.image_size, args.workers)))
        return 0

    root = Path(tempfile.mkdtemp(prefix="moevlm-wds-"))
    pattern = write_shards(root / "all", args.shards, args.keys, args.size)
    quarter = write_shards(root / "quarter", args.shards, args.keys // 4, args.size)
    members = 2 * args.shards * args.keys
    shard_mib = sum(p.stat().st_size for p in (root / "all").glob("*.tar")) / 2**20
    print(f"{args.shards} shards x {args.keys} keys ({members} members, {shard_mib:.0f} MiB, JPEG {args.size}px), "
          f"page cache warm")

    (samples, _), index_s = timed(lambda: read_shards(pattern))
    print(f"header index: {index_s:.2f} s = {1000 * index_s / members * 1000:.1f} ms per 1,000 members")
    _, read_s = timed(lambda: [s.image.read_bytes() for s in samples])
    print(f"image bytes read: {len(samples) / read_s:.0f} rows/s")
    prepare = ScratchImages(args.image_size)
    subset = samples[:2000]
    _, decode_s = timed(lambda: [prepare(open_image(s.image)) for s in subset])
    print(f"read + decode + resize to {args.image_size}: {len(subset) / decode_s:.0f} rows/s (one process)")

    for name, shards in (("quarter", quarter), ("all", pattern)):
        out = subprocess.run([sys.executable, __file__, "--epoch", shards, "--image-size", str(args.image_size),
                              "--workers", str(args.workers)], check=True, capture_output=True, text=True)
        result = json.loads(out.stdout)
        per_row = result["rows_mib"] * 2**20 / result["rows"]
        print(f"preload=false, {name}: {result['rows']} rows, index {result['index_s']:.2f} s, dataset build "
              f"{result['build_s']:.2f} s, rows held in {result['rows_mib']:.1f} MiB ({per_row:.0f} B a row), "
              f"epoch {result['rows'] / result['epoch_s']:.0f} rows/s ({args.workers} workers), "
              f"peak RSS {result['peak_rss_mib']:.0f} MiB")
    preload_mib = len(samples) * 3 * args.image_size ** 2 / 2**20
    print(f"preload=true would hold {preload_mib:.0f} MiB of uint8 images for these {len(samples)} rows "
          f"({3 * args.image_size ** 2 / 1024:.0f} KiB a row)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
