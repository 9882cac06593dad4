"""Peak memory and time of one training step with ``train.activation_checkpointing`` none, full and
selective, at a real shape, on random weights: a SmolLM2-360M-shaped Llama (width 960, 32 layers,
15 heads with 5 KV heads, MLP 2,560, vocabulary 49,152, tied embeddings) behind a
SigLIP-base-patch16-224-shaped tower (196 image tokens), instruct stage (projector and LM learn,
the tower is frozen), rows of ``--tokens`` tokens (image tokens included), fp32 on the CPU.

Each mode runs in a fresh process, so its peak resident memory (``ru_maxrss``) is its own: the
weights, the step's activations, gradients and AdamW's state. The processes run with
``MALLOC_MMAP_THRESHOLD_=65536``: glibc then serves every tensor from its own mapping and returns it
when freed, so the high-water mark is that of live tensors rather than of a fragmented heap
(``--glibc-default`` leaves glibc's adaptive threshold on). The step is timed once, without a
warm-up step (a step takes minutes on a small CPU); so is its loss, which must be the same in
every mode.

    python benchmarks/activation_memory.py [--batch 4] [--tokens 1024] [--modes none,full,selective] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the tests' model builders
from pretrained_fixtures import SIGLIP_BASE_224, SMOLLM2_360M  # noqa: E402

os.environ["HF_HUB_OFFLINE"] = "1"



def one_step(mode: str, vision: str, lm: str, batch: int, tokens: int) -> dict:
    """Build the model, then one optimizer step under ``mode``: what it cost."""
    import torch

    from moevlm.config import load_config
    from moevlm.models.factory import build_model
    from moevlm.models.hf_config import resolve_pretrained
    from moevlm.train.checkpointing import apply_activation_checkpointing
    from moevlm.train.optimizer import build_optimizer
    from moevlm.train.stages import freeze_for_stage

    config = load_config("llava", overrides=[f"model.vision=hf:{vision}", f"model.lm=hf:{lm}",
                                             "train.stage=instruct", f"train.activation_checkpointing={mode}"])
    torch.manual_seed(0)
    model_config = resolve_pretrained(config.model)
    model = build_model(model_config).train()
    trainable = freeze_for_stage(model, config.train)
    checkpointed = apply_activation_checkpointing(model, mode)
    optimizer = build_optimizer(trainable, config.train)
    gen = torch.Generator().manual_seed(0)
    side = model_config.vision.image_size
    images = torch.rand(batch, 3, side, side, generator=gen) * 2 - 1
    text_len = tokens - 1 - model.num_image_tokens
    text = torch.randint(300, model_config.decoder.vocab_size, (batch, text_len), generator=gen)
    ids = torch.cat([torch.ones(batch, 1, dtype=torch.long),
                     torch.full((batch, model.num_image_tokens), model.image_token_id), text], 1)
    labels = torch.full_like(ids, -100)
    labels[:, -text.size(1):] = text  # the text is the answer
    began = time.perf_counter()
    loss = model(images, ids, torch.ones_like(ids), labels).loss
    after_forward = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for group in trainable.values() for p in group], 1.0)
    optimizer.step()
    seconds = time.perf_counter() - began
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"mode": mode, "checkpointed": checkpointed, "loss": loss.item(), "seconds": seconds,
            "peak_after_forward_mib": after_forward, "peak_mib": peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=1024, help="tokens per row, the 196 image tokens included")
    parser.add_argument("--modes", default="none,full,selective")
    parser.add_argument("--glibc-default", action="store_true", help="keep glibc's adaptive mmap threshold")
    parser.add_argument("--out", type=Path, help="where the random sources go (default: a temporary folder)")
    parser.add_argument("--child", nargs=2, metavar=("VISION", "LM"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(one_step(args.modes, *args.child, args.batch, args.tokens)))
        return
    from pretrained_fixtures import tiny_llama, tiny_siglip_vision

    root = args.out or Path(tempfile.mkdtemp(prefix="moevlm-ac-"))
    began = time.perf_counter()
    vision = root / "siglip"
    lm = root / "lm"
    if not (lm / "config.json").exists():
        tiny_siglip_vision(vision, **SIGLIP_BASE_224)
        tiny_llama(lm, **SMOLLM2_360M)
    print(f"random sources in {root} ({time.perf_counter() - began:.0f} s); batch {args.batch} x {args.tokens} "
          f"tokens, torch {__import__('torch').__version__}, {os.cpu_count()} CPUs", flush=True)
    print("| mode | modules wrapped | peak RSS of the step | peak RSS up to the loss | step time | loss |\n"
          "|---|---|---|---|---|---|")
    env = os.environ if args.glibc_default else {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    rows = []
    for mode in args.modes.split(","):
        done = subprocess.run([sys.executable, __file__, "--child", str(vision), str(lm), "--modes", mode,
                               "--batch", str(args.batch), "--tokens", str(args.tokens)],
                              capture_output=True, text=True, env=env)
        if done.returncode != 0:
            sys.exit(f"{mode} failed (exit {done.returncode}):\n{done.stderr.strip()[-3000:]}")
        row = json.loads(done.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(f"| {mode} | {row['checkpointed']} | {row['peak_mib'] / 1024:.2f} GiB | "
              f"{row['peak_after_forward_mib'] / 1024:.2f} GiB | {row['seconds']:.0f} s | "
              f"{row['loss']:.6f} |", flush=True)
    base = next((row for row in rows if row["mode"] == "none"), None)
    for row in rows:
        if base is not None and row is not base:
            print(f"{row['mode']}: peak {row['peak_mib'] / base['peak_mib']:.2f} x none's, "
                  f"step time {row['seconds'] / base['seconds']:.2f} x")


if __name__ == "__main__":
    main()
