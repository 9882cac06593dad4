import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from moevlm.config import load_config
from moevlm.errors import CheckpointError, MoevlmError
from moevlm.train import trainer as trainer_module
from moevlm.train.checkpoint import load_model
from moevlm.train.run import run_training
from moevlm.train.trainer import lr_factor


def tiny(**overrides):
    values = {"train.max_steps": 12, "train.checkpoint_every": 6, "train.eval_every": 6, "data.val_fraction": 0.25}
    values.update(overrides)
    return load_config("tiny", overrides=[f"{k}={v}" for k, v in values.items()])


def train(config, data, out, **kw):
    return run_training(config, data, out, tracking=False, progress=False, **kw)


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    factors = [lr_factor(s, 10, 110, 0.1) for s in range(110)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert factors[10] == pytest.approx(1.0)
    assert factors[60] == pytest.approx(0.55)
    assert lr_factor(110, 10, 110, 0.1) == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(factors[10:], factors[11:]))


def test_training_lowers_the_loss_and_writes_the_checkpoint_layout(shapes_csv, tmp_path):
    trainer, result = train(tiny(**{"train.max_steps": 40, "train.lr": 3e-3}), shapes_csv, tmp_path / "run")
    losses = [v for _, v in trainer.history["train/lm_loss"]]
    assert losses[-1] < losses[0] * 0.7
    assert len(trainer.history["train/expert_balance"]) == len(trainer.history["train/lm_loss"])
    assert all(0 < v <= 1 for _, v in trainer.history["train/expert_balance"])
    names = {p.name for p in (tmp_path / "run").iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "trainer_state.json", "optimizer.pt",
            "checksums.json", "checkpoints", "loss.png", "expert_load.png", "samples.txt"} <= names
    assert not [n for n in names if n.endswith(".tmp")]
    assert json.loads((tmp_path / "run" / "trainer_state.json").read_text())["step"] == 40
    assert result["num_samples"] == 3  # floor(12 * 0.25) validation rows


def test_checkpoint_reload_gives_identical_logits(shapes_csv, tmp_path):
    trainer, _ = train(tiny(), shapes_csv, tmp_path / "run")
    model, tokenizer, config = load_model(tmp_path / "run")
    trainer.model.eval()
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    ids = torch.tensor([[tokenizer.bos_id] + tokenizer.encode("a red bar")] * 2)
    torch.testing.assert_close(model(images, ids).logits, trainer.model(images, ids).logits, rtol=0, atol=0)
    assert config.to_dict() == trainer.config.to_dict()


def test_resume_continues_the_same_loss_curve_and_weights(shapes_csv, tmp_path, monkeypatch):
    straight, _ = train(tiny(), shapes_csv, tmp_path / "straight")

    saved = trainer_module.Trainer.save

    def save_and_keep_step_6(self):
        saved(self)
        if self.step == 6:
            shutil.copytree(self.out_dir, tmp_path / "interrupted")

    monkeypatch.setattr(trainer_module.Trainer, "save", save_and_keep_step_6)
    train(tiny(), shapes_csv, tmp_path / "other")
    monkeypatch.setattr(trainer_module.Trainer, "save", saved)

    resumed, _ = train(tiny(), shapes_csv, tmp_path / "interrupted", resume=True)
    assert resumed.history["train/loss"] == straight.history["train/loss"]
    a = load_file(str(tmp_path / "straight" / "model.safetensors"))
    b = load_file(str(tmp_path / "interrupted" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_can_extend_max_steps(shapes_csv, tmp_path):
    train(tiny(**{"train.max_steps": 4}), shapes_csv, tmp_path / "run")
    trainer, _ = train(tiny(), shapes_csv, tmp_path / "run", resume=True, max_steps=8)
    assert trainer.step == 8


def test_refuses_to_overwrite_or_resume_nothing(shapes_csv, tmp_path):
    train(tiny(**{"train.max_steps": 2}), shapes_csv, tmp_path / "run")
    with pytest.raises(MoevlmError, match="already holds a checkpoint"):
        train(tiny(), shapes_csv, tmp_path / "run")
    with pytest.raises(CheckpointError, match="nothing to resume"):
        train(tiny(), shapes_csv, tmp_path / "empty", resume=True)




def test_gradient_accumulation_consumes_micro_batches_and_matches_one_big_batch(shapes_csv, tmp_path):
    big, _ = train(tiny(**{"train.max_steps": 1, "train.batch_size": 8, "moe.router_noise": False}),
                   shapes_csv, tmp_path / "big")
    small, _ = train(tiny(**{"train.max_steps": 3, "train.batch_size": 4, "train.grad_accum": 2,
                             "moe.router_noise": False}), shapes_csv, tmp_path / "small")
    # 9 training rows in batches of 4 make 3 batches an epoch: 3 steps x 2 micro-batches = 2 epochs.
    assert (small.epoch, small.batch_in_epoch) == (2, 0)
    # Step 1 sees the same 8 rows either way (one epoch permutation), so about the same loss;
    # only the per-micro-batch token means differ.
    assert big.history["train/loss"][0][1] == pytest.approx(small.history["train/loss"][0][1], rel=0.05)


def test_bad_rows_stop_the_run_or_are_skipped(shapes_csv, tmp_path):
    lines = shapes_csv.read_text().splitlines()
    lines[3] = "bm90IGFuIGltYWdl,a broken row"
    shapes_csv.write_text("\n".join(lines) + "\n")
    with pytest.raises(MoevlmError, match=r"shapes.csv: row 3: cannot decode image"):
        train(tiny(**{"train.max_steps": 1}), shapes_csv, tmp_path / "a")
    trainer, _ = train(tiny(**{"train.max_steps": 1, "data.on_bad_row": "skip"}), shapes_csv, tmp_path / "b")
    assert len(trainer.train_set) + len(trainer.val_set) == 11


def test_dataloader_workers_give_the_same_batches_as_the_main_process(shapes_csv, tmp_path):
    overrides = {"train.max_steps": 4, "data.augment": "true", "train.batch_size": 4}
    plain, _ = train(tiny(**overrides), shapes_csv, tmp_path / "plain")
    workers, _ = train(tiny(**overrides, **{"data.num_workers": 2}), shapes_csv, tmp_path / "workers")
    assert plain.history["train/loss"] == workers.history["train/loss"]


def test_bf16_autocast_trains_on_cpu(shapes_csv, tmp_path):
    trainer, result = train(tiny(**{"train.max_steps": 2, "train.precision": "bf16"}), shapes_csv, tmp_path / "run")
    assert trainer.amp_dtype == torch.bfloat16
    assert all(torch.isfinite(torch.tensor(v)) for _, v in trainer.history["train/loss"])


def test_compiled_training_follows_the_eager_loss_curve(shapes_csv, tmp_path, monkeypatch):
    # aot_eager traces the model the way inductor does (dynamo graphs, graph breaks, AOT
    # autograd) without the minutes of C++ compilation; compiled random numbers differ from
    # eager ones, so router noise is off.
    compiled_with = []
    real_compile = torch.compile

    def compile_for_test(model, **kw):
        compiled_with.append(model)
        return real_compile(model, backend="aot_eager", **kw)

    monkeypatch.setattr(trainer_module.torch, "compile", compile_for_test)
    settings = {"train.max_steps": 4, "train.log_every": 1, "train.eval_every": 100, "moe.router_noise": "false"}
    eager, _ = train(tiny(**settings), shapes_csv, tmp_path / "eager")
    compiled, _ = train(tiny(**settings, **{"train.compile": "true"}), shapes_csv, tmp_path / "compiled")
    assert compiled_with == [compiled.model] and compiled.forward is not compiled.model
    eager_losses = [v for _, v in eager.history["train/loss"]]
    assert len(eager_losses) == 4
    assert [v for _, v in compiled.history["train/loss"]] == pytest.approx(eager_losses, rel=1e-5)
