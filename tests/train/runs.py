"""What the trainer tests share: a tiny config with a test's own defaults, a quiet training run, and
a copy of a run folder as it stood right after the checkpoint of a given step (an interrupted run)."""

import shutil

from moevlm.config import load_config
from moevlm.train import trainer as trainer_module
from moevlm.train.run import run_training


def tiny(defaults: dict, **overrides):
    values = {**defaults, **overrides}
    return load_config("tiny", overrides=[f"{k}={v}" for k, v in values.items()])


def train(config, data, out, **kw):
    return run_training(config, data, out, tracking=False, progress=False, **kw)


def keep_copy_at(monkeypatch, step: int, copy_to, whole=lambda folder: folder):
    """While patched, each save of ``step`` copies ``whole(run folder)`` to ``copy_to``."""
    saved = trainer_module.Trainer.save

    def save_and_copy(self):
        saved(self)
        if self.step == step:
            shutil.copytree(whole(self.out_dir), copy_to)

    monkeypatch.setattr(trainer_module.Trainer, "save", save_and_copy)
