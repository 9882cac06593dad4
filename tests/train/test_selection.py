"""Best-checkpoint selection (train.select), early stopping (train.patience), --checkpoint and the
plot's best marker. Validation values are scripted per step (the real evaluate runs, its metric is
replaced), so the best step is known in advance."""

import json
import shutil

import pytest
import runs
import torch
from ranks import train_ranks
from runs import train
from safetensors.torch import load_file

from moevlm.checkpoint import resolve_checkpoint
from moevlm.cli import main
from moevlm.errors import CheckpointError, ConfigError
from moevlm.train import trainer as trainer_module
from moevlm.train.plots import loss_figure, plot_loss_curves
from moevlm.train.selection import Selection

# Validation loss by step: the best is step 4 (not a checkpoint step); step 8 ties it (the earlier stays).
LOSSES = {2: 3.0, 4: 1.0, 6: 2.0, 8: 1.0, 10: 2.5, 12: 2.6}


SETTINGS = {"train.max_steps": 12, "train.checkpoint_every": 6, "train.eval_every": 2, "train.keep_checkpoints": 1,
            "train.val_generate": 0, "data.val_fraction": 0.25}


def tiny(**overrides):
    return runs.tiny(SETTINGS, **overrides)


@pytest.fixture
def scripted(monkeypatch):
    """Replace each validation's ``metric`` with ``values[step]`` (set the dict's items per test)."""
    values, at = {}, {}
    real_validate, real_evaluate = trainer_module.Trainer.validate, trainer_module.evaluate

    def validate(self):
        at["step"] = self.step
        return real_validate(self)

    def evaluate(*args, **kwargs):
        result = real_evaluate(*args, **kwargs)
        if "step" in at:  # a validation (not finish()'s evaluation on the training set)
            result[values.get("metric", "loss")] = values[at.pop("step")]
        return result

    monkeypatch.setattr(trainer_module.Trainer, "validate", validate)
    monkeypatch.setattr(trainer_module, "evaluate", evaluate)
    return values


def state_of(folder):
    return json.loads((folder / "trainer_state.json").read_text())


def snapshot_steps(run):
    return sorted(int(p.name.split("-")[1]) for p in (run / "checkpoints").glob("step-*"))


def test_selection_compares_each_metric_the_right_way_and_ties_keep_the_earlier_step():
    loss = Selection("val_loss", None, {})
    assert [loss.update(s, {"loss": v}) for s, v in [(1, 2.0), (2, 1.5), (3, 1.5), (4, float("nan")), (5, 1.6)]] \
        == [True, True, False, False, False]
    assert loss.best == {"step": 2, "metric": "val_loss", "value": 1.5} and loss.since_best == 3
    match = Selection("exact_match", None, {})
    assert [match.update(s, {"exact_match": v}) for s, v in [(1, 0.2), (2, 0.1), (3, 0.5), (4, 0.5)]] \
        == [True, False, True, False]
    assert match.best_step == 3
    bleu = Selection("bleu4", 2, match.state() | {"best": {"step": 3, "metric": "bleu4", "value": 0.4}})
    assert bleu.since_best == 1 and bleu.stop_reason() is None
    bleu.update(5, {"bleu4": 0.3})
    assert "no new best bleu4 in 2 validations (train.patience=2); best: step 3" in bleu.stop_reason()
    assert Selection("val_loss", None, {}).state() == {}


def test_config_rejects_unknown_metric_and_zero_patience():
    with pytest.raises(ConfigError, match="train.select must be val_loss, exact_match, bleu4"):
        tiny(**{"train.select": "accuracy"})
    with pytest.raises(ConfigError, match="train.patience must be >= 1"):
        tiny(**{"train.patience": 0})
    with pytest.raises(ConfigError, match="train.select=bleu4 needs train.val_generate > 0"):
        tiny(**{"train.select": "bleu4"})  # tiny() sets val_generate=0


def test_best_step_is_saved_recorded_and_survives_rotation(shapes_csv, tmp_path, scripted):
    scripted.update(LOSSES)
    trainer, _ = train(tiny(), shapes_csv, tmp_path / "run")
    run = tmp_path / "run"
    assert state_of(run)["best"] == {"step": 4, "metric": "val_loss", "value": 1.0}
    assert state_of(run)["validations_since_best"] == 4
    # keep_checkpoints=1: the newest, and step 4 (saved although not a checkpoint step) kept as the best
    assert snapshot_steps(run) == [4, 12]
    assert state_of(run / "checkpoints" / "step-00000004")["step"] == 4
    assert [v for _, v in trainer.history["val/loss"]] == list(LOSSES.values())
    best = load_file(str(run / "checkpoints" / "step-00000004" / "model.safetensors"))
    last = load_file(str(run / "model.safetensors"))
    assert any(not torch.equal(best[k], last[k]) for k in best)


def test_exact_match_selects_the_highest(shapes_csv, tmp_path, scripted):
    scripted.update({2: 0.1, 4: 0.3, 6: 0.6, 8: 0.2, "metric": "exact_match"})
    train(tiny(**{"train.max_steps": 8, "train.select": "exact_match",
                  "train.val_generate": 1}), shapes_csv, tmp_path / "run")
    assert state_of(tmp_path / "run")["best"] == {"step": 6, "metric": "exact_match", "value": 0.6}


def test_no_validation_set_records_no_best(shapes_csv, tmp_path):
    train(tiny(**{"train.max_steps": 4, "data.val_fraction": 0.0}), shapes_csv, tmp_path / "run")
    assert "best" not in state_of(tmp_path / "run")
    assert resolve_checkpoint(tmp_path / "run", "best") == (tmp_path / "run", None)


def test_best_record_and_patience_count_survive_resume(shapes_csv, tmp_path, scripted, monkeypatch):
    scripted.update(LOSSES)
    config = tiny(**{"train.patience": 4})
    saved = trainer_module.Trainer.save

    def save_and_keep_step_6(self):  # what a kill right after step 6's checkpoint leaves
        saved(self)
        if self.step == 6:
            shutil.copytree(self.out_dir, tmp_path / "killed")

    monkeypatch.setattr(trainer_module.Trainer, "save", save_and_keep_step_6)
    straight, _ = train(config, shapes_csv, tmp_path / "straight")
    monkeypatch.setattr(trainer_module.Trainer, "save", saved)
    assert state_of(tmp_path / "killed")["best"]["step"] == 4
    resumed, _ = train(config, shapes_csv, tmp_path / "killed", resume=True, compare_config=True)
    timing = "train/tokens_per_s"
    assert {k: v for k, v in resumed.history.items() if k != timing} == \
        {k: v for k, v in straight.history.items() if k != timing}
    for key in ("best", "validations_since_best", "step"):
        assert state_of(tmp_path / "killed")[key] == state_of(tmp_path / "straight")[key]
    assert snapshot_steps(tmp_path / "killed") == [4, 12]

    # max_steps extension: counting goes on from the 2 validations (6, 8) since the best
    train(tiny(**{"train.patience": 4, "train.max_steps": 8}), shapes_csv, tmp_path / "run")
    assert state_of(tmp_path / "run")["validations_since_best"] == 2
    train(config, shapes_csv, tmp_path / "run", resume=True, compare_config=True)
    state = state_of(tmp_path / "run")
    assert state["best"]["step"] == 4 and state["validations_since_best"] == 4 and state["step"] == 12
    assert snapshot_steps(tmp_path / "run") == [4, 12]


def test_a_resume_that_saves_before_its_first_validation_keeps_the_best_snapshot(shapes_csv, tmp_path, scripted):
    """checkpoint_every=1: the resumed run saves step 7 before it validates again (step 8), so the
    rotation must know the best step from the trainer state, not from a validation of this run."""
    scripted.update(LOSSES)
    run = tmp_path / "run"
    train(tiny(**{"train.checkpoint_every": 1, "train.max_steps": 6}), shapes_csv, run)
    assert snapshot_steps(run) == [4, 6]
    best_weights = (run / "checkpoints" / "step-00000004" / "model.safetensors").read_bytes()
    train(tiny(**{"train.checkpoint_every": 1, "train.max_steps": 8}), shapes_csv, run, resume=True,
          compare_config=True)
    assert snapshot_steps(run) == [4, 8] and state_of(run)["best"]["step"] == 4
    best, note = resolve_checkpoint(run, "best")
    assert best == run / "checkpoints" / "step-00000004" and "step 4" in note
    assert (best / "model.safetensors").read_bytes() == best_weights


def test_early_stopping_stops_after_patience_validations_without_a_new_best(shapes_csv, tmp_path, scripted,
                                                                              capsys):
    scripted.update(LOSSES)
    trainer, _ = train(tiny(**{"train.patience": 2}), shapes_csv, tmp_path / "run")
    # New bests at 2 and 4; 6 is worse, 8 only ties: two in a row, stop at step 8 of 12.
    assert trainer.step == 8
    assert state_of(tmp_path / "run")["step"] == 8
    assert snapshot_steps(tmp_path / "run") == [4, 8]
    assert (tmp_path / "run" / "loss.png").is_file()  # finish() ran
    out = capsys.readouterr().out
    assert "step 8: stopped early: no new best val_loss in 2 validations (train.patience=2); best: step 4" in out


def test_resuming_an_early_stopped_run_with_more_patience_goes_on(shapes_csv, tmp_path, scripted):
    scripted.update(LOSSES)
    train(tiny(**{"train.patience": 2, "train.max_steps": 8}), shapes_csv, tmp_path / "run")
    stopped, result = train(tiny(**{"train.patience": 2}), shapes_csv, tmp_path / "run", resume=True,
                            compare_config=True)
    assert stopped.step == 8  # still out of patience: nothing more trained
    assert result["num_samples"] == 3  # what it reports is the validation set's (12 rows * 0.25), as ever
    more, _ = train(tiny(**{"train.patience": 3}), shapes_csv, tmp_path / "run", resume=True, compare_config=True)
    assert more.step == 10


@pytest.fixture
def selected_run(shapes_csv, tmp_path, scripted):
    scripted.update(LOSSES)
    train(tiny(), shapes_csv, tmp_path / "run")
    return tmp_path / "run"


def test_resolve_checkpoint_best_last_and_steps(selected_run, tmp_path):
    best, note = resolve_checkpoint(selected_run, "best")
    assert best == selected_run / "checkpoints" / "step-00000004"
    assert "step 4" in note and "the last is step 12" in note
    assert resolve_checkpoint(selected_run, "last") == (selected_run, None)
    assert resolve_checkpoint(selected_run, "step-12") == (selected_run, None)
    assert resolve_checkpoint(selected_run, "step-4")[0] == best
    # a copy of one checkpoint (no checkpoints/ beside it) is itself, whatever its state records
    assert resolve_checkpoint(best, "best") == (best, None)
    with pytest.raises(CheckpointError, match=r"no snapshot of step 6 .*\(snapshots of steps: 4, 12\)$"):
        resolve_checkpoint(selected_run, "step-6")
    with pytest.raises(CheckpointError, match="must be last, best or step-N"):
        resolve_checkpoint(selected_run, "newest")


def test_eval_reads_the_checkpoint_asked_for(selected_run, shapes_csv, capsys):
    def loss(*flags):
        assert main(["eval", "--model", str(selected_run), "--data", str(shapes_csv), "--json", "--no-generate",
                     "--device", "cpu", *flags]) == 0
        captured = capsys.readouterr()
        return json.loads(captured.out)["loss"], captured.err

    best, best_note = loss()
    step_4, _ = loss("--checkpoint", "step-4")
    last, last_note = loss("--checkpoint", "last")
    assert best == step_4 != last
    assert best_note.count("\n") == 1 and "step 4" in best_note and last_note == ""


@pytest.mark.parametrize("command", [["caption", "image.png"], ["eval", "--data", "x.csv"], ["export", "--out", "x"],
                                     ["serve"]])
def test_a_missing_step_is_one_line_and_exit_2(selected_run, capsys, command):
    assert main([command[0], "--model", str(selected_run), "--checkpoint", "step-6", *command[1:]]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no snapshot of step 6" in err and "4, 12" in err


def test_loss_plot_marks_validations_and_the_best_step(tmp_path):
    history = {"train/loss": [(s, 3.0 - 0.1 * s) for s in range(1, 13)], "val/loss": list(LOSSES.items()),
               "train/lr": [(s, 1e-3) for s in range(1, 13)]}
    figure = loss_figure(history, best_step=4)
    loss_ax = figure.axes[0]
    lines = {line.get_label(): line for line in loss_ax.get_lines()}
    assert lines["val/loss"].get_marker() == "o" and lines["train/loss"].get_marker() in ("None", None, "")
    assert list(lines["best (step 4)"].get_xdata()) == [4, 4]
    assert "best (step 4)" in [t.get_text() for t in loss_ax.get_legend().get_texts()]
    assert not any(line.get_label().startswith("best") for line in loss_figure(history).axes[0].get_lines())
    path = plot_loss_curves(history, tmp_path / "loss.png", best_step=4)
    assert path.is_file() and path.stat().st_size > 0


def test_two_ranks_select_save_the_best_snapshot_and_stop_together(shapes_csv, tmp_path, capsys):
    """Under torchrun every rank takes the same decisions; rank 0 writes the sharded snapshots."""
    out = tmp_path / "run"
    ranks = train_ranks(["--data", str(shapes_csv), "--out", str(out), "--preset", "tiny", "--no-tracking",
                         "--set", "dist.strategy=fsdp", "--set", "train.eval_every=1", "--set",
                         "train.checkpoint_every=5", "--set", "train.keep_checkpoints=1", "--set", "train.patience=2",
                         "--set", "train.max_steps=12", "--set", "train.lr=0.05", "--set", "train.val_generate=0",
                         "--set", "data.val_fraction=0.25"])
    state = state_of(out)
    best = state["best"]["step"]
    # one validation per step: the run ends two validations after its last best, or at max_steps
    assert state["step"] == min(12, best + 2) and state["validations_since_best"] == state["step"] - best
    assert best in snapshot_steps(out) and state["step"] in snapshot_steps(out)
    assert ("stopped early" in ranks[0].output) == (state["step"] < 12) and "stopped early" not in ranks[1].output
    assert main(["eval", "--model", str(out), "--data", str(shapes_csv), "--no-generate", "--device", "cpu"]) == 0
    assert (f"step {best}" in capsys.readouterr().err) == (best != state["step"])
