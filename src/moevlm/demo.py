"""``moevlm demo``: a real-image captioning task built on the spot, trained in a few minutes.

Scenes of two or three handwritten digits side by side at random heights (scikit-learn's
bundled UCI scans, no download), captioned by naming the digits from left to right. Validation
scenes are built from scans that no training scene uses, so the held-out exact match measures
generalization.
"""

from __future__ import annotations

from pathlib import Path

from moevlm.config import load_config
from moevlm.data.digits import write_digit_scenes
from moevlm.errors import MoevlmError
from moevlm.train.run import run_training

# Digits are 8 px scans snapped to an 8 px grid on a 32 px canvas, so with 8 px patches each
# image token holds one whole digit or blank paper; word-sized BPE tokens keep captions at
# 2-3 tokens. Both keep a step cheap enough to learn the task in a few CPU minutes.
SCENE_SIZE, SCENE_SNAP = 32, 8
DEMO_OVERRIDES = [
    "tokenizer.kind=bpe",
    "tokenizer.vocab_size=300",
    f"vision.image_size={SCENE_SIZE}",
    f"vision.patch_size={SCENE_SNAP}",
    "vision.image_tokens=patches",
    "train.max_steps=2000",
    "train.batch_size=32",
    "train.lr=1.5e-3",
    "train.eval_every=1000",
    "train.checkpoint_every=1000",
    "train.val_generate=500",
    "data.augment=false",  # shifts would move digits off the patch grid
]


def run_demo(out: Path, max_steps: int | None = None, tracking: bool = True, progress: bool = True) -> dict:
    out = Path(out)
    if (out / "model" / "config.json").exists():
        raise MoevlmError(f"{out} already holds a demo run; remove it or pass another --out")
    print(f"building digit scenes in {out / 'data'} ...")
    train_csv, val_csv = write_digit_scenes(out / "data", num_train=6000, num_val=500, seed=0,
                                          size=SCENE_SIZE, snap=SCENE_SNAP, packed=True)
    config = load_config("default", overrides=DEMO_OVERRIDES)
    print("training a Mixture-of-Experts VLM "
          f"({config.model.decoder.depth} layers, {config.model.decoder.moe.num_experts} experts, "
          f"top-{config.model.decoder.moe.top_k}) on {train_csv} ...")
    trainer, result = run_training(config, train_csv, out / "model", val_data=val_csv, max_steps=max_steps,
                                   tracking=tracking, progress=progress)
    print(f"\nheld-out exact match: {result['exact_match']:.3f} on {len(result['predictions'])} unseen scenes "
          f"(BLEU-4 {result['bleu4']:.3f}, loss {result['loss']:.3f})")
    for reference, prediction in result["predictions"][:8]:
        mark = "ok " if reference == prediction else "MISS"
        print(f"  {mark} true: {reference:<22} generated: {prediction}")
    print(f"\ncheckpoint:      {out / 'model'}")
    print(f"plots:           {out / 'model' / 'loss.png'}, {out / 'model' / 'expert_load.png'}")
    print(f"caption a scene: moevlm caption --model {out / 'model'} {out / 'data' / 'val' / '000000.png'}")
    if trainer.tracker.enabled:
        print(f"MLflow:          {trainer.tracker.ui_command()}")
    return result
