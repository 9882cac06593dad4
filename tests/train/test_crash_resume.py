"""kill -9 at chosen moments of a training run, then --resume: the same weights as a run never killed.

The run is a real ``moevlm train`` in a child process. A small driver script patches one
function to SIGKILL its own process at the chosen moment, so the crash lands exactly there
(timing it from outside would be flaky) and the production code carries no test hooks.
"""

import json
import signal
import subprocess
import sys
import textwrap

import pytest
import runs
import torch
from safetensors.torch import load_file

from moevlm.checkpoint import load_model
from moevlm.config import load_config
from moevlm.errors import CheckpointError
from moevlm.train.run import run_training
from moevlm.train.snapshots import RunCheckpoints
from moevlm.train.trainer import Trainer

SETTINGS = {"train.max_steps": 18, "train.checkpoint_every": 6, "train.eval_every": 6, "data.val_fraction": 0.25,
            "train.keep_checkpoints": 1}

# Each driver ends its own process with SIGKILL at one moment of the run (steps 6 and 12 are checkpoints;
# with one snapshot kept, saving step 12 removes step 6's).
def die_publishing(name: str) -> str:
    """A killer for the moment snapshot 12's ``name`` is about to replace step 6's at the top level."""
    return f"""
        replace = os.replace
        seen = []
        def replace_then_die(src, dst):
            if str(dst).endswith(os.path.join("run", "{name}")):
                seen.append(dst)
                if len(seen) == 2:  # the first was step 6's
                    die()
            replace(src, dst)
        os.replace = replace_then_die
    """


KILLERS = {
    # Between checkpoints: as step 9 starts.
    "training": """
        from moevlm.train.trainer import Trainer
        step = Trainer.train_step
        def train_step(self, batches):
            if self.step == 8:
                die()
            return step(self, batches)
        Trainer.train_step = train_step
    """,
    # Writing snapshot 12: its weights file is half on disk.
    "writing the snapshot": """
        from moevlm.checkpoint import folder
        save_file = folder.save_file
        def half_save_file(tensors, path, metadata):
            save_file(tensors, path, metadata=metadata)
            if metadata["step"] == "12":
                with open(path, "r+b") as handle:
                    handle.truncate(os.path.getsize(path) // 2)
                die()
        folder.save_file = half_save_file
    """,
    # Writing snapshot 12: its weights are whole, its optimizer state is half on disk.
    "writing the optimizer state": """
        import torch
        save = torch.save
        def half_save(obj, path, *args, **kwargs):
            save(obj, path, *args, **kwargs)
            if ".step-00000012.tmp" in str(path):
                with open(path, "r+b") as handle:
                    handle.truncate(os.path.getsize(path) // 2)
                die()
        torch.save = half_save
    """,
    # Snapshot 12 is complete; publishing it to the top level, its weights are linked in as a
    # hidden temporary file but not yet renamed over step 6's.
    "publishing the weights": die_publishing("model.safetensors"),
    # Snapshot 12 is complete; the top level has its weights but still step 6's state and checksums.
    "updating the top level": die_publishing("trainer_state.json"),
    # Snapshot 12 is complete and published; step 6's, renamed to .step-00000006.old, is half deleted.
    "removing the old snapshot": """
        import shutil
        rmtree = shutil.rmtree
        def rmtree_then_die(path, *args, **kwargs):
            if os.path.basename(path) == ".step-00000006.old":
                os.unlink(os.path.join(path, "model.safetensors"))
                die()
            rmtree(path, *args, **kwargs)
        shutil.rmtree = rmtree_then_die
    """,
}

DRIVER = """
import os
import signal
import sys

def die():
    os.kill(os.getpid(), signal.SIGKILL)

{killer}

from moevlm.cli import main
sys.exit(main(sys.argv[1:]))
"""


def config():
    return load_config("tiny", overrides=[f"{k}={v}" for k, v in SETTINGS.items()])


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The run that is never killed, and its data."""
    from shapes import write_shapes_csv

    root = tmp_path_factory.mktemp("straight")
    data = write_shapes_csv(root / "shapes.csv")
    trainer, _ = run_training(config(), data, root / "run", tracking=False, progress=False)
    return trainer, root / "run", data


def kill_run(tmp_path, data, moment):
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER.format(killer=textwrap.dedent(KILLERS[moment])))
    argv = ["train", "--data", str(data), "--preset", "tiny", "--out", str(tmp_path / "run"), "--no-tracking"]
    argv += [arg for key, value in SETTINGS.items() for arg in ("--set", f"{key}={value}")]
    result = subprocess.run([sys.executable, str(driver), *argv], capture_output=True, text=True, timeout=300)
    assert result.returncode == -signal.SIGKILL, result.stderr
    return tmp_path / "run"


@pytest.mark.parametrize("moment,resumes_at", [
    ("training", 6), ("writing the snapshot", 6), ("writing the optimizer state", 6), ("publishing the weights", 12),
    ("updating the top level", 12), ("removing the old snapshot", 12)])
def test_kill_9_then_resume_gives_bitwise_the_same_weights(straight, tmp_path, moment, resumes_at):
    reference, reference_dir, data = straight
    out = kill_run(tmp_path, data, moment)
    assert RunCheckpoints(out).snapshots()[0][0] == resumes_at
    if moment == "writing the snapshot":
        assert (out / "checkpoints" / ".step-00000012.tmp" / "model.safetensors").is_file()  # the half file
        load_model(out)  # the top level is still step 6's, whole
        assert json.loads((out / "trainer_state.json").read_text())["step"] == 6
    if moment == "writing the optimizer state":
        assert (out / "checkpoints" / ".step-00000012.tmp" / "optimizer.pt").is_file()
        assert json.loads((out / "trainer_state.json").read_text())["step"] == 6
    if moment == "publishing the weights":
        assert (out / ".model.safetensors.tmp").is_file()
        load_model(out)  # the top level is still step 6's: its weights and checksums were not replaced yet
        assert json.loads((out / "trainer_state.json").read_text())["step"] == 6
    if moment == "updating the top level":
        with pytest.raises(CheckpointError, match="checksum mismatch"):
            load_model(out)  # caught half updated: refused, not loaded
    if moment == "removing the old snapshot":
        assert (out / "checkpoints" / ".step-00000006.old").is_dir()
        load_model(out)
        assert json.loads((out / "trainer_state.json").read_text())["step"] == 12

    resumed, _ = run_training(config(), data, out, resume=True, tracking=False, progress=False)

    timings = "train/tokens_per_s"
    assert resumed.history.keys() == reference.history.keys()
    for name in reference.history.keys() - {timings}:  # the same losses at every step, resumed ones included
        assert resumed.history[name] == reference.history[name], name
    expected, got = load_file(str(reference_dir / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[name], got[name]) for name in expected)
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]
    assert [step for step, _ in RunCheckpoints(out).snapshots()] == [18] and not list(out.glob(".*.tmp"))


@pytest.mark.parametrize("workers", [0, 2])
def test_a_resume_in_the_middle_of_an_epoch_trains_on_the_same_batches(shapes_csv, tmp_path, monkeypatch, workers):
    """9 training rows in batches of 2: 5 batches an epoch, so the checkpoint of step 6 is one batch
    into the second epoch (the kills above all land on an epoch boundary). The resumed run trains on
    the rows the straight run trained on after step 6, in the same batches, with the same losses."""
    settings = {"train.batch_size": 2, "train.max_steps": 9, "train.checkpoint_every": 3, "train.eval_every": 100,
                "train.log_every": 1, "data.val_fraction": 0.25, "data.num_workers": workers}
    config = runs.tiny(settings)
    trained = {}
    real_batches = Trainer.batches

    def recorded_batches(self):
        rows = trained.setdefault(self.out_dir.name, [])
        for batch in real_batches(self):
            rows.append(batch["index"].tolist())
            yield batch

    monkeypatch.setattr(Trainer, "batches", recorded_batches)
    straight, _ = runs.train(config, shapes_csv, tmp_path / "straight")
    with monkeypatch.context() as patch:
        runs.keep_copy_at(patch, 6, tmp_path / "resumed")
        runs.train(config, shapes_csv, tmp_path / "other")
    assert json.loads((tmp_path / "resumed" / "trainer_state.json").read_text())["batch_in_epoch"] == 1
    resumed, _ = runs.train(config, shapes_csv, tmp_path / "resumed", resume=True)
    assert len(straight.sampler) == 5 and len(trained["straight"]) == 9
    assert trained["resumed"] == trained["straight"][6:]
    timing = "train/tokens_per_s"
    for name in straight.history.keys() - {timing}:
        assert resumed.history[name] == straight.history[name], name
    expected = load_file(str(tmp_path / "straight" / "model.safetensors"))
    got = load_file(str(tmp_path / "resumed" / "model.safetensors"))
    assert all(torch.equal(expected[name], got[name]) for name in expected)
