"""Training on 2 CPU processes over gloo (moevlm/train/distributed.py), each rank a real
``moevlm train`` process started as torchrun starts its workers (tests/train/ranks.py): the same
losses as one process on the same global batch, sharded checkpoints that resume on another number
of ranks, and every rank stopping together."""

import base64
import csv
import io
import json
import shutil

import pytest
import torch
from PIL import Image
from ranks import train_ranks

from moevlm.checkpoint import is_sharded, load_checkpoint, load_model, sha256
from moevlm.cli import main
from moevlm.config import load_config
from moevlm.data.dataset import EpochBatchSampler
from moevlm.errors import ConfigError
from moevlm.train.distributed import RankBatches, World, configure_world
from moevlm.train.run import run_training

# fp32; router noise off: each rank draws its own noise, so with it on no split equals one process. A weight
# average (train.ema_decay) is kept, so sharding, saving and resharding it are compared too.
COMMON = ["--preset", "tiny", "--no-tracking", "--set", "moe.router_noise=false", "--set", "train.log_every=1",
          "--set", "train.ema_decay=0.5",
          "--set", "train.eval_every=4", "--set", "train.checkpoint_every=4", "--set", "train.val_generate=4",
          "--set", "train.grad_accum=2", "--set", "data.val_fraction=0.1"]
COMPARED = ("train/loss", "train/lm_loss", "train/balance_loss", "train/z_loss", "train/grad_norm",
            "train/expert_balance", "val/loss")


def history(folder):
    return json.loads((folder / "trainer_state.json").read_text())["history"]


def assert_same_history(got, want, steps=None):
    for key in COMPARED:
        g, w = got[key][:steps], want[key][:steps]
        assert [s for s, _ in g] == [s for s, _ in w], key
        assert [v for _, v in g] == pytest.approx([v for _, v in w], rel=1e-5, abs=1e-6), key


def one_process(data, out, *extra):
    assert main(["train", "--data", str(data), "--out", str(out), *COMMON, *extra]) == 0
    return history(out)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from shapes import write_shapes_csv

    # 12 pictures: 11 train rows, batches of 8 and 3 (the short one split 2 + 1 over two ranks)
    return write_shapes_csv(tmp_path_factory.mktemp("data") / "shapes.csv", rows=12)


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    """One process, 8 steps, a checkpoint every 4."""
    out = tmp_path_factory.mktemp("one") / "run"
    one_process(data, out, "--set", "train.max_steps=8")
    return out


@pytest.mark.parametrize("settings", [["dist.strategy=ddp"], ["dist.strategy=fsdp"],
                                      ["dist.strategy=ddp", "dist.expert_parallel=2"],
                                      ["dist.strategy=fsdp", "dist.expert_parallel=2"]],
                         ids=["ddp", "fsdp", "ddp-ep", "fsdp-ep"])
def test_two_ranks_train_as_one_process_on_the_same_global_batch(data, reference, tmp_path, settings):
    out = tmp_path / "run"
    sets = [arg for setting in settings for arg in ("--set", setting)]
    ranks = train_ranks(["--data", str(data), "--out", str(out), *COMMON, "--set", "train.max_steps=8", *sets])
    assert_same_history(history(out), history(reference))
    # rank 0 alone reports
    assert "trained to step 8" in ranks[0].output and "trained to step 8" not in ranks[1].output
    assert is_sharded(out) and not (out / "model.safetensors").exists()
    # the sharded checkpoint loads in one process with the weights one process trained
    sharded, plain = load_model(out)[0].state_dict(), load_model(reference)[0].state_dict()
    assert sharded.keys() == plain.keys()
    for name, tensor in plain.items():
        torch.testing.assert_close(sharded[name], tensor, rtol=1e-4, atol=1e-5, msg=name)
    if settings == ["dist.strategy=fsdp"]:
        check_sharded_checkpoint_rules(out, tmp_path)


def check_sharded_checkpoint_rules(out, tmp_path):
    """Shards are in checksums.json: a damaged one is named, and --resume falls back past it; the
    export reads the folder in one process."""
    from moevlm.errors import DamagedCheckpointError
    from moevlm.export.hf import export_hf
    from moevlm.train.snapshots import RunCheckpoints

    export_hf(out, tmp_path / "hf")
    assert (tmp_path / "hf" / "model.safetensors").is_file()
    sums = json.loads((out / "checksums.json").read_text())["sha256"]
    shard = out / "checkpoints" / "step-00000008" / sorted(name for name in sums if name.endswith(".distcp"))[0]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 1
    shard.write_bytes(bytes(data))
    with pytest.raises(DamagedCheckpointError, match=f"{shard}: checksum mismatch"):
        load_checkpoint(shard.parent.parent)
    _, state, _ = RunCheckpoints(out).load()
    assert state["step"] == 4 and (out / "checkpoints" / "damaged-step-00000008").is_dir()


def test_a_two_rank_checkpoint_resumes_on_one_process_and_a_one_process_checkpoint_on_two(data, tmp_path):
    """Each continues as one process resuming its own 4-step checkpoint (train.max_steps moves the schedule)."""
    plain = tmp_path / "plain"
    one_process(data, plain, "--set", "train.max_steps=4")
    shutil.copytree(plain, tmp_path / "plain_on_two")
    assert main(["train", "--data", str(data), "--out", str(plain), "--resume", "--max-steps", "8",
                 "--no-tracking"]) == 0

    sharded = tmp_path / "sharded"
    train_ranks(["--data", str(data), "--out", str(sharded), *COMMON, "--set", "train.max_steps=4",
                 "--set", "dist.strategy=fsdp"])
    assert history(sharded)["train/loss"][-1][0] == 4
    assert main(["train", "--data", str(data), "--out", str(sharded), "--resume", "--max-steps", "8",
                 "--no-tracking"]) == 0
    assert_same_history(history(sharded), history(plain))
    assert not is_sharded(sharded) and not (sharded / "sharded").exists()  # one process wrote the last one

    on_two = tmp_path / "plain_on_two"
    train_ranks(["--data", str(data), "--out", str(on_two), "--resume", "--max-steps", "8", *COMMON,
                 "--set", "dist.strategy=fsdp", "--set", "dist.expert_parallel=2"])
    assert_same_history(history(on_two), history(plain))
    assert is_sharded(on_two) and load_checkpoint(on_two).config.train.max_steps == 8


def _bad_row_data(path, rows=12):
    """The shapes set with row 5's PNG cut after its header: it passes the up-front check of
    data.preload=false and fails when a rank decodes it."""
    from shapes import write_shapes_csv

    write_shapes_csv(path, rows=rows)
    with open(path, newline="") as handle:
        table = list(csv.reader(handle))
    png = io.BytesIO()
    Image.new("RGB", (24, 24), (1, 2, 3)).save(png, format="PNG")
    table[5] = [base64.b64encode(png.getvalue()[:60]).decode(), "a cut picture"]
    with open(path, "w", newline="") as handle:
        csv.writer(handle).writerows(table)
    return path


def test_a_bad_row_on_one_rank_stops_both_with_its_one_line_error(tmp_path):
    data = _bad_row_data(tmp_path / "bad.csv")
    ranks = train_ranks(["--data", str(data), "--out", str(tmp_path / "run"), *COMMON, "--set", "train.max_steps=8",
                         "--set", "data.preload=false", "--set", "data.val_fraction=0", "--set", "dist.timeout_s=60"],
                        timeout=120, check=False)
    assert [rank.code for rank in ranks] == [2, 2]
    errors = [line for rank in ranks for line in rank.output.splitlines() if line.startswith("moevlm: error:")]
    assert len(errors) == 2 and all("bad.csv: row 5: cannot decode image" in line for line in errors)
    assert any(line.endswith("(rank 0)") for line in errors) or any(line.endswith("(rank 1)") for line in errors)
    assert not any("Traceback" in rank.output for rank in ranks)


KILL_AT_STEP_6 = """
import os, signal, sys
from moevlm.cli import main
from moevlm.train import trainer

train_step = trainer.Trainer.train_step
def dying(self, batches):
    if self.step == 6:  # after the checkpoint of step 4, before that of step 8
        os.kill(os.getpid(), signal.SIGKILL)
    return train_step(self, batches)
trainer.Trainer.train_step = dying
sys.exit(main(sys.argv[1:]))
"""


def test_kill_9_of_one_rank_then_resume_continues_from_the_last_complete_checkpoint(data, reference, tmp_path):
    from ranks import finish, start

    out = tmp_path / "run"
    args = ["--data", str(data), "--out", str(out), *COMMON, "--set", "train.max_steps=8", "--set", "dist.timeout_s=60"]
    ranks = finish(start(args, drivers={1: KILL_AT_STEP_6}), timeout=120)
    assert ranks[1].code == -9 and ranks[0].code != 0  # rank 0 loses its peer and stops
    assert history(out)["train/loss"][-1][0] == 4
    train_ranks(["--data", str(data), "--out", str(out), "--resume", *COMMON, "--set", "train.max_steps=8"])
    assert_same_history(history(out), history(reference))


TERM_AT_STEP_3 = KILL_AT_STEP_6.replace("self.step == 6", "self.step == 3").replace("SIGKILL", "SIGTERM")


def test_sigterm_to_one_rank_stops_both_at_the_same_step(data, tmp_path):
    from ranks import finish, start

    args = ["--data", str(data), "--out", str(tmp_path / "run"), *COMMON, "--set", "train.max_steps=8"]
    ranks = finish(start(args, drivers={1: TERM_AT_STEP_3}), timeout=120)
    assert [rank.code for rank in ranks] == [130, 130]
    assert all("moevlm: interrupted" in rank.output and "Traceback" not in rank.output for rank in ranks)


def test_the_batch_is_split_across_ranks_and_its_position_is_that_of_the_whole_batches():
    parts = [list(RankBatches(EpochBatchSampler(11, 8, seed=0, min_rows=2), rank, 2)) for rank in (0, 1)]
    again = list(EpochBatchSampler(11, 8, seed=0))
    assert [a + b for a, b in zip(*parts)] == again  # first epoch: rank 0 then rank 1 rows of each batch
    assert [len(p) for p in parts[0]] == [4, 2] and [len(p) for p in parts[1]] == [4, 1]
    # a last batch with fewer rows than ranks is left out (each rank needs one); 10 % 8 = 2 >= 2 is kept
    assert len(EpochBatchSampler(9, 8, seed=0, min_rows=2)) == 1
    assert len(EpochBatchSampler(10, 8, seed=0, min_rows=2)) == 2
    assert len(EpochBatchSampler(9, 8, seed=0)) == 2


def test_a_world_that_does_not_fit_the_config_is_refused_in_one_line(data, tmp_path, capsys):
    config = load_config("tiny", overrides=["train.batch_size=7"])
    with pytest.raises(ConfigError, match=r"^train.batch_size=7 is the batch over all 2 ranks: it must be a multiple "
                                          r"of 2 \(each rank takes batch_size / 2\)$"):
        configure_world(World(rank=0, size=2), config, torch.device("cpu"))
    config = load_config("tiny", overrides=["dist.expert_parallel=4"])
    with pytest.raises(ConfigError, match=r"^dist.expert_parallel=4 must divide the 2 ranks$"):
        configure_world(World(rank=0, size=2), config, torch.device("cpu"))
    assert main(["train", "--data", str(data), "--out", str(tmp_path / "r"), "--preset", "tiny", "--no-tracking",
                 "--set", "dist.expert_parallel=2"]) == 2
    assert capsys.readouterr().err.strip() == (
        "moevlm: error: dist.expert_parallel=2 needs 2 or a multiple of 2 processes: start with "
        "torchrun --nproc_per_node=2 -m moevlm train ...")


def test_one_process_ignores_the_strategy_and_writes_the_one_file_checkpoint(data, tmp_path):
    config = load_config("tiny", overrides=["dist.strategy=fsdp", "train.max_steps=2", "moe.router_noise=false"])
    trainer, _ = run_training(config, data, tmp_path / "run", tracking=False, progress=False)
    assert trainer.parallel.strategy == "none" and not is_sharded(tmp_path / "run")
    assert (tmp_path / "run" / "model.safetensors").is_file()


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_pretrained_parts_with_frozen_and_unused_weights_train_on_two_ranks_as_on_one(pretrained_parts, tmp_path,
                                                                                      strategy):
    """A pretrained tower that trains (its layers after vision.feature_layer get no gradient: frozen,
    so DDP needs no find_unused_parameters) and a frozen pretrained LM (left out of the checkpoint)."""
    from shapes import write_llava_data

    (tmp_path / "data").mkdir()
    captions = write_llava_data(tmp_path / "data", rows=8)["captions"]
    vision, lm = pretrained_parts["siglip"], pretrained_parts["llama"]
    args = ["--data", str(captions), "--preset", "tiny", "--no-tracking", "--set", "train.trainable=[vision,projector]",
            "--set", f"model.vision=hf:{vision}", "--set", f"model.lm=hf:{lm}",
            "--set", "train.batch_size=4", "--set", "train.max_steps=3", "--set", "train.log_every=1",
            "--set", "train.checkpoint_every=3", "--set", "train.eval_every=3", "--set", "data.val_fraction=0.25"]
    assert main(["train", *args, "--out", str(tmp_path / "one")]) == 0
    train_ranks([*args, "--out", str(tmp_path / "two"), "--set", f"dist.strategy={strategy}"])
    for key in ("train/loss", "train/grad_norm", "val/loss"):
        assert [v for _, v in history(tmp_path / "two")[key]] == pytest.approx(
            [v for _, v in history(tmp_path / "one")[key]], rel=1e-5), key
    refs = json.loads((tmp_path / "two" / "pretrained.json").read_text())
    assert refs == json.loads((tmp_path / "one" / "pretrained.json").read_text())  # the same frozen weights, by name
    assert any(name.startswith("lm.") for name in refs["untouched"])
    two, one = load_model(tmp_path / "two")[0].state_dict(), load_model(tmp_path / "one")[0].state_dict()
    for name, tensor in one.items():
        # A key bias shifts every score of a query alike: its gradient is rounding noise, which
        # AdamW scales up to full steps of either sign. Every other weight must agree.
        if not name.endswith("k_proj.bias"):
            torch.testing.assert_close(two[name], tensor, rtol=1e-4, atol=1e-5, msg=name)


def test_auto_picks_ddp_while_weights_gradients_and_adamw_state_fit_in_half_a_rank(tiny_config, monkeypatch):
    from moevlm.models.factory import build_model
    from moevlm.train.distributed import strategy_for

    model = build_model(tiny_config.model)
    needed = 16 * sum(p.numel() for p in model.parameters())
    pages = {"SC_PAGE_SIZE": 1, "SC_PHYS_PAGES": 2 * needed}
    monkeypatch.setattr("os.sysconf", lambda name: pages[name])
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert strategy_for(tiny_config, model, torch.device("cpu")) == "ddp"
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # two ranks share the machine's memory
    assert strategy_for(tiny_config, model, torch.device("cpu")) == "fsdp"
    assert strategy_for(tiny_config.updated({"dist.strategy": "ddp"}), model, torch.device("cpu")) == "ddp"


def test_an_optimizer_state_that_does_not_fit_the_trainable_parameters_is_one_line(data, tmp_path, capsys):
    """E.g. a run that trained a pretrained tower before its unused layers were frozen."""
    out = tmp_path / "run"
    one_process(data, out, "--set", "train.max_steps=2", "--set", "train.checkpoint_every=2")
    state = torch.load(out / "optimizer.pt", weights_only=True)
    state["param_groups"][0]["params"] = state["param_groups"][0]["params"][:-1]
    for folder in (out, out / "checkpoints" / "step-00000002"):
        (folder / "optimizer.pt").unlink()  # a hard link to the snapshot's: replace, not rewrite in place
        torch.save(state, folder / "optimizer.pt")
    sums = json.loads((out / "checksums.json").read_text())
    sums["sha256"]["optimizer.pt"] = sha256(out / "optimizer.pt")
    for folder in (out, out / "checkpoints" / "step-00000002"):
        (folder / "checksums.json").unlink()
        (folder / "checksums.json").write_text(json.dumps(sums))
    capsys.readouterr()
    assert main(["train", "--data", str(data), "--out", str(out), "--resume", "--max-steps", "4",
                 "--no-tracking"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"moevlm: error: {out}: the checkpoint's optimizer state does not fit this run's trainable "
                          "parameters (") and err.endswith(f"--from {out} instead of --resume") and "\n" not in err
