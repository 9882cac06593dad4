"""Peak memory of the server's image path for N concurrent large-dimension PNGs (default 16 of
6300 x 6300 pixels, about 115 KB each): each thread loads one through serve/images.py's ImageLoader
and the model's preparation (a resize to --size), as a request's worker thread does.

    python benchmarks/serve_image_memory.py [--count 16] [--side 6300] [--max-pixels N] [--max-decodes N]

Prints the peak resident memory above the start (ru_maxrss), what stays resident after, and how many
images were refused (413). --max-decodes 16 --max-pixels 40000000 is the server before the pixel and
decode bounds.
"""

from __future__ import annotations

import argparse
import base64
import resource
import struct
import threading
import zlib

from moevlm.data.images import ScratchImages
from moevlm.serve.errors import ApiError
from moevlm.serve.images import DEFAULT_MAX_PIXELS, ImageLimits, ImageLoader


def big_png(side: int) -> bytes:
    """A black side x side RGB PNG, compressed row by row (never the whole image in memory)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    packer, row, parts = zlib.compressobj(9), b"\0" + bytes(3 * side), []
    for _ in range(side):
        parts.append(packer.compress(row))
    parts.append(packer.flush())
    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", b"".join(parts)) + chunk(b"IEND", b"")


def resident_mb() -> float:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS")) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=16)
    parser.add_argument("--side", type=int, default=6300)
    parser.add_argument("--size", type=int, default=384, help="the model's image size")
    parser.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS)
    parser.add_argument("--max-decodes", type=int, default=ImageLimits().max_decodes)
    args = parser.parse_args()
    png = big_png(args.side)
    url = "data:image/png;base64," + base64.b64encode(png).decode()
    loader = ImageLoader(ImageLimits(max_pixels=args.max_pixels, max_decodes=args.max_decodes))
    prepare = ScratchImages(args.size, 3)
    start_mb = resident_mb()
    refused, results = [], []

    def one():
        try:
            results.append(loader.load(url, prepare))
        except ApiError as err:
            refused.append(err.status)

    threads = [threading.Thread(target=one) for _ in range(args.count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"{args.count} PNGs of {args.side}x{args.side} ({len(png) / 1000:.0f} KB each), --max-image-pixels "
          f"{args.max_pixels}, --max-image-decodes {args.max_decodes}: {len(results)} prepared, "
          f"{len(refused)} refused; peak RSS {peak_mb - start_mb:.0f} MB above the start, "
          f"{resident_mb() - start_mb:.0f} MB still resident after")


if __name__ == "__main__":
    main()
