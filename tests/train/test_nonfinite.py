"""NaN / inf in the loss or the gradients: the update is skipped, and too many in a row stop the run."""

import json
import logging
import math
import shutil

import pytest
import runs
import torch
from runs import train
from safetensors.torch import load_file

from moevlm.checkpoint import load_model
from moevlm.cli import main
from moevlm.errors import TrainingError
from moevlm.models.vlm import VLM
from moevlm.train import trainer as trainer_module

SETTINGS = {"train.max_steps": 6, "train.checkpoint_every": 3, "train.eval_every": 100, "train.log_every": 1,
            "data.val_fraction": 0.25}


def tiny(**overrides):
    return runs.tiny(SETTINGS, **overrides)


@pytest.fixture
def poison(monkeypatch):
    """poison(steps, "loss" | "grad"): the given (1-based) training steps get a NaN loss or an inf gradient."""
    current = {"step": 0}
    train_step = trainer_module.Trainer.train_step

    def counting_train_step(self, batches):
        current["step"] = self.step + 1
        return train_step(self, batches)

    monkeypatch.setattr(trainer_module.Trainer, "train_step", counting_train_step)

    def arm(steps, where="loss"):
        forward = VLM.forward

        def poisoned_forward(self, *args, **kwargs):
            out = forward(self, *args, **kwargs)
            if self.training and current["step"] in steps:
                if where == "loss":
                    out.loss = out.loss * math.nan
                else:  # a finite loss, and an infinite gradient for one weight
                    weight = next(self.parameters())
                    zero = weight.sum() - weight.sum().detach()
                    zero.register_hook(lambda grad: torch.full_like(grad, math.inf))
                    out.loss = out.loss + zero
            return out

        monkeypatch.setattr(VLM, "forward", poisoned_forward)

    return arm


def _weights_and_adam_state(trainer) -> dict[str, torch.Tensor]:
    out = {f"weight {name}": p.detach().clone() for name, p in trainer.model.named_parameters()}
    names = {id(p): name for name, p in trainer.model.named_parameters()}
    for p, state in trainer.optimizer.state.items():
        out.update({f"adam {key} {names[id(p)]}": value.clone() for key, value in state.items()})
    return out


@pytest.mark.parametrize("where,problem", [("loss", "loss is nan"), ("grad", "gradient norm is inf")])
def test_a_non_finite_step_is_skipped_and_training_goes_on(shapes_csv, tmp_path, poison, caplog, monkeypatch,
                                                          where, problem):
    poison({3}, where)
    before_and_after = {}  # step -> (weights and Adam state before the step, after it)
    train_step = trainer_module.Trainer.train_step

    def recording_train_step(self, batches):
        before = _weights_and_adam_state(self)
        result = train_step(self, batches)
        before_and_after[self.step] = (before, _weights_and_adam_state(self))
        return result

    monkeypatch.setattr(trainer_module.Trainer, "train_step", recording_train_step)
    with caplog.at_level(logging.WARNING, logger="moevlm.train.step"):
        trainer, _ = train(tiny(), shapes_csv, tmp_path / "run")
    assert trainer.step == 6 and trainer.skipped_steps == [3] and trainer.bad_in_a_row == 0
    assert [m for m in caplog.messages if "skipped" in m] == [
        f"step 3: {problem}; update skipped (1 in a row, train.max_bad_steps=10)"]
    assert [step for step, _ in trainer.history["train/loss"]] == [1, 2, 4, 5, 6]  # nothing logged for step 3
    assert sorted(before_and_after) == [1, 2, 3, 4, 5, 6]
    for step, (before, after) in before_and_after.items():
        changed = {key for key in before if not torch.equal(before[key], after[key])}
        if step == 3:  # the skipped step: every weight and every Adam moment bit for bit as before
            assert before.keys() == after.keys() and len(before) > 40 and changed == set(), changed
        else:
            assert any(key.startswith("weight ") for key in changed), step
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


def test_resume_after_a_skipped_step_stays_exact(shapes_csv, tmp_path, poison, monkeypatch):
    """With the weight average, whose warm-up goes on counting the updates made (not the steps)."""
    poison({2, 5})
    config = tiny(**{"train.ema_decay": 0.5})
    straight, _ = train(config, shapes_csv, tmp_path / "straight")
    saved = trainer_module.Trainer.save

    def save_and_keep_step_3(self):
        saved(self)
        if self.step == 3:
            shutil.copytree(self.out_dir, tmp_path / "interrupted")

    monkeypatch.setattr(trainer_module.Trainer, "save", save_and_keep_step_3)
    train(config, shapes_csv, tmp_path / "other")
    monkeypatch.setattr(trainer_module.Trainer, "save", saved)
    resumed, _ = train(config, shapes_csv, tmp_path / "interrupted", resume=True)
    assert resumed.skipped_steps == straight.skipped_steps == [2, 5]
    assert resumed.history["train/loss"] == straight.history["train/loss"]
    a = load_file(str(tmp_path / "straight" / "model.safetensors"))
    b = load_file(str(tmp_path / "interrupted" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_weight_average_counts_only_the_updates_made(shapes_csv, tmp_path, poison, monkeypatch):
    """Steps 1 and 3 are skipped: the average starts at step 2's weights, and steps 4 and 5 are
    updates 2 and 3 for the decay's warm-up (decays 1/4 and 4/13), not 4 and 5."""
    poison({1, 3})
    weights = {}
    train_step = trainer_module.Trainer.train_step

    def recording_train_step(self, batches):
        result = train_step(self, batches)
        weights[self.step] = {name: p.detach().clone() for name, p in self.model.named_parameters()}
        return result

    monkeypatch.setattr(trainer_module.Trainer, "train_step", recording_train_step)
    trainer, _ = train(tiny(**{"train.max_steps": 5, "train.lr": 0.02, "train.ema_decay": 0.5}), shapes_csv,
                       tmp_path / "run")
    assert trainer.skipped_steps == [1, 3]
    saved = load_file(str(tmp_path / "run" / "model.safetensors"))
    for name, at_5 in weights[5].items():
        expected = 4 / 13 * (0.25 * weights[2][name] + 0.75 * weights[4][name]) + 9 / 13 * at_5
        torch.testing.assert_close(saved[name], expected, rtol=0, atol=1e-6)


def test_max_bad_steps_in_a_row_are_skipped_and_a_finite_step_starts_the_count_again(shapes_csv, tmp_path, poison,
                                                                                     caplog):
    poison({2, 3, 5, 6})
    with caplog.at_level(logging.WARNING, logger="moevlm.train.step"):
        trainer, _ = train(tiny(**{"train.max_steps": 7, "train.max_bad_steps": 2}), shapes_csv, tmp_path / "run")
    assert trainer.step == 7 and trainer.skipped_steps == [2, 3, 5, 6]
    assert [m.split("(")[1] for m in caplog.messages if "skipped" in m] == ["1 in a row, train.max_bad_steps=2)",
                                                                           "2 in a row, train.max_bad_steps=2)"] * 2


def test_too_many_in_a_row_stop_the_run_and_keep_the_last_good_checkpoint(shapes_csv, tmp_path, poison):
    poison(set(range(4, 100)))
    with pytest.raises(TrainingError) as info:
        train(tiny(**{"train.max_steps": 20, "train.max_bad_steps": 2}), shapes_csv, tmp_path / "run")
    # Steps 4 and 5 are skipped; step 6 is the third in a row and stops the run before its checkpoint.
    assert str(info.value) == (f"step 6: loss is nan, 3 non-finite steps in a row (train.max_bad_steps=2): "
                               f"training stopped; the checkpoint of step 3 in {tmp_path / 'run'} is kept")
    assert json.loads((tmp_path / "run" / "trainer_state.json").read_text())["step"] == 3
    model, _, _ = load_model(tmp_path / "run")
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_the_cli_stops_with_one_line_naming_the_step(shapes_csv, tmp_path, poison, capsys):
    poison(set(range(1, 100)))
    code = main(["train", "--data", str(shapes_csv), "--preset", "tiny", "--out", str(tmp_path / "run"),
                 "--no-tracking", "--set", "train.max_bad_steps=0"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert err.splitlines()[-1] == ("moevlm: error: step 1: loss is nan, 1 non-finite steps in a row "
                                    "(train.max_bad_steps=0): training stopped; no checkpoint was written")
