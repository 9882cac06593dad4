"""``moevlm demo``: a real-image captioning task built on the spot, trained in a few minutes.

Scenes of two or three handwritten digits side by side at random heights (scikit-learn's
bundled UCI scans, no download), captioned by naming the digits from left to right. Training
scenes are drawn afresh for every epoch and row from 80 % of the scans (``SceneStream``), so the
model cannot memorise them; the 500 validation scenes, written to disk, use only the other 20 %,
so the held-out exact match measures reading unseen handwriting.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from moevlm.checkpoint import resolve_checkpoint
from moevlm.config import Config, load_config
from moevlm.data.augment import Augmentation
from moevlm.data.digits import SceneStream, write_digit_scenes
from moevlm.data.images import image_preparer
from moevlm.data.records import Sample
from moevlm.data.sources import read_data
from moevlm.data.training_data import TrainingData, dataset_for, new_tokenizer
from moevlm.errors import MoevlmError
from moevlm.evaluate import evaluate_file
from moevlm.train.run import run_training

# Digits are 8 px scans snapped to an 8 px grid on a 32 px canvas, so with 8 px patches each
# image token holds one whole digit or blank paper; word-sized BPE tokens keep captions at
# 2-3 tokens. Both keep a step cheap enough to learn the task in a few CPU minutes.
SCENE_SIZE, SCENE_SNAP = 32, 8
SCENES_PER_EPOCH, VAL_SCENES = 6000, 500
DEMO_OVERRIDES = [
    "tokenizer.kind=bpe",
    "tokenizer.vocab_size=300",
    f"vision.image_size={SCENE_SIZE}",
    f"vision.patch_size={SCENE_SNAP}",
    "vision.image_tokens=patches",
    # Reading a digit means attending to the one cell of its column that holds ink: at 1.5e-3 that
    # takes 400 to 1,500+ steps to begin, depending on the seed; at 5e-4 it begins within 200-400.
    "train.max_steps=1500",
    "train.batch_size=32",
    "train.lr=5e-4",
    "train.checkpoint_every=500",
    "train.val_generate=100",  # the progress lines; the final figure captions all 500
    "train.ema_decay=0.995",
    # Warping an 8 px digit blurs it: with shifts, turns and zooms it learned far slower (docs/training.md).
    # Grain leaves each digit where it is and still keeps the reader from fitting the scans' exact
    # pixels: validation loss 0.078 -> 0.053 on seed 0.
    "data.augment=true",
    "data.aug_translate=0",
    "data.aug_rotate=0",
    "data.aug_scale=0",
    "data.aug_noise=0.1",
]


@dataclass(frozen=True)
class FreshScenes:
    """The demo's training data (``GeneratedData``): ``SceneStream`` scenes, validation from a file."""

    seed: int
    per_epoch: int = SCENES_PER_EPOCH

    def __str__(self) -> str:  # what MLflow records as the training data
        return f"digit scenes drawn afresh (seed {self.seed}, {self.per_epoch} per epoch)"

    def load(self, config: Config, val_data: Path | None, tokenizer, folder: Path | None) -> TrainingData:
        stream = SceneStream(None, image_preparer(config.model, folder), config.model.decoder.max_text_len,
                             seed=self.seed, length=self.per_epoch, size=SCENE_SIZE, snap=SCENE_SNAP, packed=True,
                             augment=Augmentation.from_config(config.data))
        if tokenizer is None:
            rows = [Sample(None, [("", text)], str(self), row + 1) for row, text in enumerate(stream.captions())]
            tokenizer = new_tokenizer(config, rows)
        stream.tokenizer = tokenizer
        val_samples, skipped = read_data(val_data, config.data)
        return TrainingData(stream, dataset_for(val_samples, tokenizer, config, None, folder), tokenizer, skipped)


def run_demo(out: Path, max_steps: int | None = None, tracking: bool = True, progress: bool = True, seed: int = 0,
             resume: bool = False, overrides: list[str] = ()) -> dict:
    """Train the demo in ``out`` (``resume``: go on with an interrupted one; ``overrides``: KEY=VALUE
    over DEMO_OVERRIDES) and return the held-out scores of the checkpoint that
    ``moevlm eval --model out/model`` reads (the best by val loss)."""
    out = Path(out)
    if (out / "model" / "config.json").exists() and not resume:
        raise MoevlmError(f"{out} already holds a demo run; remove it, pass another --out, or --resume it")
    print(f"building {VAL_SCENES} validation scenes in {out / 'data'} ...")
    _, val_csv = write_digit_scenes(out / "data", num_train=0, num_val=VAL_SCENES, seed=seed,
                                    size=SCENE_SIZE, snap=SCENE_SNAP, packed=True)
    config = load_config("default", overrides=[*DEMO_OVERRIDES, f"train.seed={seed}", *overrides])
    scenes = FreshScenes(seed)
    print("training a Mixture-of-Experts VLM "
          f"({config.model.decoder.depth} layers, {config.model.decoder.moe.num_experts} experts, "
          f"top-{config.model.decoder.moe.top_k}) on {scenes} ...")
    trainer, _ = run_training(config, scenes, out / "model", val_data=val_csv, max_steps=max_steps,
                              resume=resume, tracking=tracking, progress=progress)
    chosen, note = resolve_checkpoint(out / "model", "best")
    if note:
        print(note)
    result = evaluate_file(chosen, val_csv, device=config.train.device)
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
