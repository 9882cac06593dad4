"""The three stages on random stand-ins for pretrained parts, sized like a small LM: what each
stage trains and what its checkpoint weighs.

A random Llama (width 512, 8 layers, 26M parameters, byte tokenizer with a chat template) and a
random CLIP tower (width 256, 6 layers, 32 px) are saved to a folder and used as
``model.lm=hf:`` / ``model.vision=hf:`` sources, offline. On 64 rows of the tests' shape data it
runs pretrain (and again with train.save_frozen=true), instruct (full and LoRA rank 16) and moe
(4 experts top-2 on every other layer), 10 steps each, and prints parameters, trainable
parameters, the size of model.safetensors and the wall time of each run (loading, the steps and
the checkpoint). The models are random, so the losses mean nothing.

    python benchmarks/stage_checkpoints.py [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

# The tiny-model builders and the data writer are the tests' own.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
os.environ["HF_HUB_OFFLINE"] = "1"

from moevlm.config import load_config  # noqa: E402
from moevlm.train.run import run_training  # noqa: E402
from pretrained_fixtures import tiny_clip_vision, tiny_llama  # noqa: E402
from shapes import write_llava_data  # noqa: E402

COMMON = ["train.batch_size=8", "train.warmup_steps=1", "train.eval_every=1000", "train.val_generate=1",
          "decoder.max_text_len=128", "data.val_fraction=0", "train.max_steps=10", "train.checkpoint_every=10"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="working folder (default: a temporary one)")
    args = parser.parse_args()
    root = args.out or Path(tempfile.mkdtemp(prefix="moevlm-stages-"))
    root.mkdir(parents=True, exist_ok=True)
    lm = tiny_llama(root / "llama", hidden_size=512, intermediate_size=1376, num_hidden_layers=8,
                    num_attention_heads=8, num_key_value_heads=8)
    vision = tiny_clip_vision(root / "clip", hidden_size=256, intermediate_size=1024, num_hidden_layers=6,
                              num_attention_heads=4)
    data = write_llava_data(root, rows=64)
    sources = [f"model.vision=hf:{vision}", f"model.lm=hf:{lm}"]

    def stage(name: str, out: str, data_file: Path, extra=(), start: str | None = None) -> None:
        model = json.loads((root / start / "config.json").read_text())["model"] if start else None
        config = load_config("tiny", overrides=[f"train.stage={name}", *COMMON, *(sources if start is None else []),
                                                *extra], model=model)
        began = time.perf_counter()
        trainer, _ = run_training(config, data_file, root / out, tracking=False, progress=False,
                                  from_dir=root / start if start else None)
        seconds = time.perf_counter() - began
        params = trainer.model.parameters
        total = sum(p.numel() for p in params()) / 1e6
        learning = sum(p.numel() for p in params() if p.requires_grad) / 1e6
        size = (root / out / "model.safetensors").stat().st_size / 2**20
        print(f"| {name} | {out} | {total:.1f}M | {learning:.2f}M | {size:.2f} MiB | {seconds:.1f} s |", flush=True)

    print("| stage | run | parameters | trainable | model.safetensors | wall time |\n|---|---|---|---|---|---|")
    stage("pretrain", "pretrain", data["captions"])
    stage("pretrain", "pretrain-save-frozen", data["captions"], ["train.save_frozen=true"])
    stage("instruct", "instruct", data["conversations"], start="pretrain")
    stage("instruct", "instruct-lora16", data["conversations"], ["decoder.lora_rank=16"], start="pretrain")
    stage("moe", "moe", data["conversations"], ["moe.num_experts=4", "moe.top_k=2", "moe.layers=every-other"],
          start="instruct")


if __name__ == "__main__":
    main()
