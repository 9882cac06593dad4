"""moevlm demo: fresh scenes as it trains, resumable exactly, reporting the checkpoint eval reads."""

import torch
from runs import keep_copy_at
from safetensors.torch import load_file

from moevlm import demo

QUICK = ["train.val_generate=4", "train.eval_every=2", "train.checkpoint_every=2", "train.log_every=1",
         "train.batch_size=8"]


def test_an_interrupted_demo_resumes_exactly(tmp_path, monkeypatch):
    monkeypatch.setattr(demo, "DEMO_OVERRIDES", demo.DEMO_OVERRIDES + QUICK)
    monkeypatch.setattr(demo, "VAL_SCENES", 8)
    straight = demo.run_demo(tmp_path / "straight", max_steps=4, tracking=False, progress=False, seed=1)
    with monkeypatch.context() as patch:
        keep_copy_at(patch, 2, tmp_path / "interrupted", whole=lambda model_dir: model_dir.parent)  # data too
        demo.run_demo(tmp_path / "other", max_steps=4, tracking=False, progress=False, seed=1)
    resumed = demo.run_demo(tmp_path / "interrupted", max_steps=4, tracking=False, progress=False, seed=1,
                            resume=True)
    assert resumed["loss"] == straight["loss"] and resumed["predictions"] == straight["predictions"]
    a, b = (load_file(tmp_path / run / "model" / "model.safetensors") for run in ("straight", "interrupted"))
    assert all(torch.equal(a[name], b[name]) for name in a)
    again = load_file(tmp_path / "other" / "model" / "model.safetensors")
    assert all(torch.equal(a[name], again[name]) for name in a)  # same seed, same scenes, same run
