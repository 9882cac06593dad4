"""The padded share of sequence slots with random and with length-grouped batches (data.group_by_length)
on a LLaVA-like length mix: captions of 20-40 text tokens, conversations of 100-1,500, some of them
text-only; image rows add --image-tokens (576: CLIP ViT-L/14 at 336 px, as LLaVA-1.5).

    python benchmarks/padding_share.py [--rows 20000 --batch-size 32 --image-tokens 576]

Each batch is a whole batch over all ranks, split as training splits it; a part pads to its longest row.
"""

from __future__ import annotations

import argparse
import random

from moevlm.data.dataset import EpochBatchSampler
from moevlm.data.length_groups import LengthGroupedBatchSampler, padded_share


def llava_like(rows: int, image_tokens: int, seed: int) -> tuple[list[int], list[bool]]:
    """30 % captions with an image, 60 % conversations with an image, 10 % text-only conversations."""
    rng = random.Random(seed)
    lengths, has_image = [], []
    for _ in range(rows):
        kind = rng.random()
        if kind < 0.3:
            lengths.append(rng.randint(20, 40) + image_tokens)
            has_image.append(True)
        else:
            image = kind < 0.9
            lengths.append(rng.randint(100, 1500) + image_tokens * image)
            has_image.append(image)
    return lengths, has_image


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=20000)
    parser.add_argument("--batch-size", type=int, default=32, help="rows per batch over all ranks")
    parser.add_argument("--image-tokens", type=int, nargs="+", default=[576, 0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 8])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print("| image tokens | ranks | random batches | grouped by length | ratio |")
    print("|---|---|---|---|---|")
    for image_tokens in args.image_tokens:
        lengths, has_image = llava_like(args.rows, image_tokens, args.seed)
        random_batches = list(EpochBatchSampler(len(lengths), args.batch_size, seed=args.seed))
        grouped = list(LengthGroupedBatchSampler(lengths, has_image, args.batch_size, seed=args.seed))
        for ranks in args.ranks:
            before, after = padded_share(random_batches, lengths, ranks), padded_share(grouped, lengths, ranks)
            print(f"| {image_tokens} | {ranks} | {before:.1%} | {after:.1%} | {before / after:.1f}x |")


if __name__ == "__main__":
    main()
