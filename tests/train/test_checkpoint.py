import json
import logging
import pickle
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file

from moevlm.checkpoint import (
    CHECKSUMS,
    TRAINING_FILES,
    load_model,
    load_training_checkpoint,
    sha256,
    verify_checkpoint,
)
from moevlm.config import load_config
from moevlm.errors import CheckpointError
from moevlm.train.run import run_training
from moevlm.train.snapshots import RunCheckpoints


def tiny(**overrides):
    values = {"train.max_steps": 4, "train.checkpoint_every": 1, "train.eval_every": 100,
              "train.keep_checkpoints": 2, "data.val_fraction": 0.25}
    values.update(overrides)
    return load_config("tiny", overrides=[f"{k}={v}" for k, v in values.items()])


def train(data, out, **kw):
    return run_training(kw.pop("config", tiny()), data, out, tracking=False, progress=False, **kw)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 4-step run with a checkpoint every step, keeping 2: never modified, copy it first."""
    from shapes import write_shapes_csv

    root = tmp_path_factory.mktemp("ckpt")
    data = write_shapes_csv(root / "shapes.csv")
    train(data, root / "run")
    return root / "run", data


@pytest.fixture
def copy(run, tmp_path):
    """A copy of the run; copytree makes each name its own file, so damage to one leaves its twin whole."""
    return shutil.copytree(run[0], tmp_path / "run")


def flip_byte(path, offset=-20):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def rewrite_checksums(folder):
    """What it takes to get a foreign file past the checksums: recompute them."""
    manifest = json.loads((folder / CHECKSUMS).read_text())
    manifest["sha256"] = {name: sha256(folder / name) for name in manifest["sha256"]}
    (folder / CHECKSUMS).write_text(json.dumps(manifest))


def test_the_last_k_snapshots_are_kept_and_the_top_level_is_the_newest(run):
    out, _ = run
    assert [step for step, _ in RunCheckpoints(out).snapshots()] == [4, 3]
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]
    newest = out / "checkpoints" / "step-00000004"
    for name in TRAINING_FILES + (CHECKSUMS,):
        assert (out / name).read_bytes() == (newest / name).read_bytes(), name
    assert set(json.loads((out / CHECKSUMS).read_text())["sha256"]) == set(TRAINING_FILES)
    verify_checkpoint(out, TRAINING_FILES)
    assert load_training_checkpoint(newest)[1]["step"] == 4
    load_model(out)


@pytest.mark.parametrize("name,damage,problem", [
    ("model.safetensors", flip_byte, "model.safetensors: checksum mismatch"),
    ("optimizer.pt", lambda p: p.write_bytes(p.read_bytes()[:100]), "optimizer.pt: checksum mismatch"),
    ("trainer_state.json", lambda p: p.write_text(p.read_text()[:-5]), "trainer_state.json: checksum mismatch"),
    ("config.json", lambda p: p.unlink(), "not a complete moevlm checkpoint (config.json is missing)"),
    ("checksums.json", lambda p: p.unlink(), "checksums.json is missing"),
    ("checksums.json", lambda p: p.write_text('{"sha256": {"model.saf'), "checksums.json: damaged"),
])
def test_a_damaged_checkpoint_is_refused_naming_the_file(copy, name, damage, problem):
    damage(copy / name)
    with pytest.raises(CheckpointError) as info:
        load_training_checkpoint(copy)
    assert problem in str(info.value) and "\n" not in str(info.value)


def test_caption_and_eval_loading_checks_only_the_model_files(copy):
    flip_byte(copy / "optimizer.pt")
    load_model(copy)
    flip_byte(copy / "tokenizer.json", offset=5)
    with pytest.raises(CheckpointError, match="tokenizer.json: checksum mismatch"):
        load_model(copy)


def test_resume_falls_back_to_the_newest_good_snapshot(run, copy, caplog):
    out, data = run
    flip_byte(copy / "checkpoints" / "step-00000004" / "model.safetensors")
    damaged_bytes = (copy / "checkpoints" / "step-00000004" / "model.safetensors").read_bytes()
    flip_byte(copy / "model.safetensors")
    with caplog.at_level(logging.WARNING, logger="moevlm.train.snapshots"):
        trainer, _ = train(data, copy, resume=True)
    warnings = [r.getMessage() for r in caplog.records]
    assert "step-00000004/model.safetensors: checksum mismatch" in warnings[0]
    assert warnings[1].startswith(f"resuming from {copy / 'checkpoints' / 'step-00000003'} (step 3)")
    # The damaged snapshot is kept for a look, out of the way of the new step 4.
    moved = copy / "checkpoints" / "damaged-step-00000004"
    assert warnings[2] == f"damaged {copy / 'checkpoints' / 'step-00000004'} moved to {moved}"
    assert (moved / "model.safetensors").read_bytes() == damaged_bytes
    # Step 4 done again from step 3 gives the very same weights as the first time.
    expected, again = load_file(str(out / "model.safetensors")), load_file(str(copy / "model.safetensors"))
    assert expected.keys() == again.keys() and all(torch.equal(expected[k], again[k]) for k in expected)
    assert [step for step, _ in RunCheckpoints(copy).snapshots()] == [4, 3]
    verify_checkpoint(copy / "checkpoints" / "step-00000004", TRAINING_FILES)


def test_resume_fails_when_no_checkpoint_passes_its_checks(run, copy):
    _, data = run
    for step in (3, 4):
        flip_byte(copy / "checkpoints" / f"step-0000000{step}" / "model.safetensors")
    flip_byte(copy / "model.safetensors")
    with pytest.raises(CheckpointError, match="no checkpoint to resume from passed its checks") as info:
        train(data, copy, resume=True)
    assert "step-00000004/model.safetensors: checksum mismatch" in str(info.value)


def test_damaged_snapshots_past_the_resume_point_do_not_push_out_good_ones(run, copy):
    _, data = run
    (copy / "checkpoints" / "step-00000009").mkdir()  # as a kill -9 can never leave, but a disk can
    (copy / "checkpoints" / "damaged-step-00000009").mkdir()  # from an earlier resume
    train(data, copy, resume=True, max_steps=5)
    assert [step for step, _ in RunCheckpoints(copy).snapshots()] == [5, 4]
    assert (copy / "checkpoints" / "damaged-step-00000009.2").is_dir()


@pytest.mark.parametrize("failure", [MemoryError(), pickle.UnpicklingError("Weights only load failed: unsupported "
                                                                           "global torch.SomeNewClass")])
def test_resume_stops_when_an_intact_optimizer_state_cannot_be_read(run, copy, monkeypatch, failure):
    """Not damage: an older snapshot would not help, and its saves would replace the newer ones."""
    _, data = run
    load = torch.load

    def refuse_the_newest(path, **kw):
        if "step-00000004" in str(path):
            raise failure
        return load(path, **kw)

    monkeypatch.setattr(torch, "load", refuse_the_newest)
    newest = copy / "checkpoints" / "step-00000004"
    before = {path.name: path.stat().st_ino for path in newest.iterdir()}
    with pytest.raises(CheckpointError, match=r"step-00000004/optimizer\.pt: unreadable optimizer state \(") as info:
        train(data, copy, resume=True)
    assert "\n" not in str(info.value)
    assert {path.name: path.stat().st_ino for path in newest.iterdir()} == before
    assert [step for step, _ in RunCheckpoints(copy).snapshots()] == [4, 3]


def test_resume_stops_when_a_file_cannot_be_opened(run, copy, monkeypatch):
    from moevlm.checkpoint import folder

    _, data = run
    digest = folder.sha256

    def denied(path):
        if "step-00000004" in str(path):
            raise PermissionError(13, "Permission denied", str(path))
        return digest(path)

    monkeypatch.setattr(folder, "sha256", denied)
    with pytest.raises(CheckpointError, match=r"step-00000004/config\.json: cannot read \(Permission denied\)$"):
        train(data, copy, resume=True)
    assert [step for step, _ in RunCheckpoints(copy).snapshots()] == [4, 3]


def test_weights_from_a_model_with_another_config_are_refused(run, copy, tmp_path):
    _, data = run
    train(data, tmp_path / "wide", config=tiny(**{"train.max_steps": 1, "decoder.width": 64}))
    shutil.copy(tmp_path / "wide" / "model.safetensors", copy / "model.safetensors")
    with pytest.raises(CheckpointError, match="model.safetensors: checksum mismatch"):
        load_model(copy)
    rewrite_checksums(copy)
    # The first tensor whose shape differs is named, e.g. "(decoder.blocks.0.attn.proj.bias is [64] in
    # the weights, [32] in the model)"; which one comes first depends on the model's tensor names.
    pattern = (re.escape(f"{copy / 'model.safetensors'}: weights do not fit config.json (")
               + r"[\w.]+ is \[[\d, ]+\] in the weights, \[[\d, ]+\] in the model\)$")
    with pytest.raises(CheckpointError, match=pattern):
        load_model(copy)


class _Payload:
    """Unpickling this creates a file: the proof that pickled code ran."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_loading_never_runs_pickled_code(copy, tmp_path):
    marker = tmp_path / "pwned"
    torch.save(_Payload(marker), copy / "optimizer.pt")
    rewrite_checksums(copy)
    with pytest.raises(CheckpointError, match="optimizer.pt: unreadable optimizer state"):
        load_training_checkpoint(copy)
    assert not marker.exists()
    torch.load(copy / "optimizer.pt", weights_only=False).close()
    assert marker.exists()  # the payload is live: only weights_only=True kept it from running


def test_a_checkpoint_that_cannot_be_written_is_a_one_line_error(run, tmp_path):
    _, data = run
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "checkpoints").write_text("a file where the snapshots folder goes")
    with pytest.raises(CheckpointError, match=r"run: cannot write checkpoint: File exists"):
        train(data, tmp_path / "run", config=tiny(**{"train.max_steps": 1}))


def test_a_checkpoint_with_the_old_expert_tensor_names_still_loads(copy):
    from safetensors.torch import save_file

    weights = copy / "model.safetensors"
    current = load_file(str(weights))
    renamed = {name.replace("w1_EDF", "w1_EDH").replace("b1_EF", "b1_EH"): t for name, t in current.items()}
    assert renamed.keys() != current.keys()
    save_file(renamed, str(weights), metadata={"format": "pt"})
    rewrite_checksums(copy)
    model, _, _ = load_model(copy)
    for name, tensor in model.state_dict().items():
        if name in current:
            torch.testing.assert_close(tensor, current[name], rtol=0, atol=0)


def test_run_checkpoints_load_a_chosen_step_and_name_the_latest(copy):
    checkpoints = RunCheckpoints(copy)
    assert checkpoints.exists() and checkpoints.latest() == 4
    _, state, _ = checkpoints.load(step=3)
    assert state["step"] == 3
    with pytest.raises(CheckpointError, match="nothing to resume \\(no snapshot of step 2\\)"):
        checkpoints.load(step=2)  # kept 2: step 2's was removed
    assert not RunCheckpoints(copy / "nothing").exists() and RunCheckpoints(copy / "nothing").latest() is None
