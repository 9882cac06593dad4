"""moevlm demo: fresh scenes as it trains, resumable exactly, reporting the checkpoint eval reads."""

import shutil

import torch
from safetensors.torch import load_file

from moevlm import demo
from moevlm.train import trainer as trainer_module

QUICK = ["train.val_generate=4", "train.eval_every=2", "train.checkpoint_every=2", "train.log_every=1",
         "train.batch_size=8"]


def test_an_interrupted_demo_resumes_exactly(tmp_path, monkeypatch):
    monkeypatch.setattr(demo, "DEMO_OVERRIDES", demo.DEMO_OVERRIDES + QUICK)
    monkeypatch.setattr(demo, "VAL_SCENES", 8)
    straight = demo.run_demo(tmp_path / "straight", max_steps=4, tracking=False, progress=False, seed=1)
    saved = trainer_module.Trainer.save

    def save_and_keep_step_2(self):
        saved(self)
        if self.step == 2:
            shutil.copytree(self.out_dir.parent, tmp_path / "interrupted")

    monkeypatch.setattr(trainer_module.Trainer, "save", save_and_keep_step_2)
    demo.run_demo(tmp_path / "other", max_steps=4, tracking=False, progress=False, seed=1)
    monkeypatch.setattr(trainer_module.Trainer, "save", saved)
    resumed = demo.run_demo(tmp_path / "interrupted", max_steps=4, tracking=False, progress=False, seed=1,
                            resume=True)
    assert resumed["loss"] == straight["loss"] and resumed["predictions"] == straight["predictions"]
    a, b = (load_file(tmp_path / run / "model" / "model.safetensors") for run in ("straight", "interrupted"))
    assert all(torch.equal(a[name], b[name]) for name in a)
    again = load_file(tmp_path / "other" / "model" / "model.safetensors")
    assert all(torch.equal(a[name], again[name]) for name in a)  # same seed, same scenes, same run
