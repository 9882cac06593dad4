import json

import pytest
import torch
from runs import keep_copy_at
from safetensors.torch import load_file

from moevlm.checkpoint import load_model
from moevlm.config import load_config
from moevlm.device import autocast_dtype, resolve_device
from moevlm.errors import ConfigError, MoevlmError
from moevlm.models.vlm import VLM
from moevlm.train import trainer as trainer_module
from moevlm.train.optimizer import lr_factor
from moevlm.train.run import run_training


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

    with monkeypatch.context() as patch:
        keep_copy_at(patch, 6, tmp_path / "interrupted")
        train(tiny(), shapes_csv, tmp_path / "other")

    resumed, _ = train(tiny(), shapes_csv, tmp_path / "interrupted", resume=True)
    assert resumed.history["train/loss"] == straight.history["train/loss"]
    a = load_file(str(tmp_path / "straight" / "model.safetensors"))
    b = load_file(str(tmp_path / "interrupted" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_can_extend_max_steps(shapes_csv, tmp_path):
    train(tiny(**{"train.max_steps": 4}), shapes_csv, tmp_path / "run")
    trainer, _ = train(tiny(), shapes_csv, tmp_path / "run", resume=True, max_steps=8)
    assert trainer.step == 8


def test_refuses_to_overwrite_and_resuming_nothing_starts_fresh(shapes_csv, tmp_path, caplog):
    train(tiny(**{"train.max_steps": 2}), shapes_csv, tmp_path / "run")
    with pytest.raises(MoevlmError, match="already holds a checkpoint"):
        train(tiny(), shapes_csv, tmp_path / "run")
    fresh, _ = train(tiny(**{"train.max_steps": 2}), shapes_csv, tmp_path / "empty", resume=True)
    assert fresh.step == 2
    assert f"{tmp_path / 'empty'} holds no checkpoint yet: starting a fresh run" in caplog.text
    a = load_file(str(tmp_path / "run" / "model.safetensors"))
    b = load_file(str(tmp_path / "empty" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)




def test_resume_holds_the_command_line_to_the_config_the_run_started_with(shapes_csv, tmp_path, monkeypatch):
    train(tiny(**{"train.max_steps": 2}), shapes_csv, tmp_path / "run")
    # A resume's config is held against the config as given, not as the built model filled it in.
    assert json.loads((tmp_path / "run" / "config.json").read_text())["model"]["decoder"]["vocab_size"] > 0
    state = json.loads((tmp_path / "run" / "trainer_state.json").read_text())
    assert state["command_config"] == tiny(**{"train.max_steps": 2}).to_dict()
    more = {"train.max_steps": 3, "train.eval_every": 1, "train.log_every": 1, "data.num_workers": 1}
    trainer, _ = train(tiny(**more), shapes_csv, tmp_path / "run", resume=True, compare_config=True)
    assert trainer.step == 3 and trainer.config.train.eval_every == 1 and trainer.config.data.num_workers == 1
    with pytest.raises(ConfigError) as info:
        train(tiny(**{"moe.router_noise": False, "data.val_fraction": 0.5}), shapes_csv, tmp_path / "run",
              resume=True, compare_config=True)
    assert str(info.value) == (
        f"--resume: the command line's config differs from the run in {tmp_path / 'run'}: "
        "data.val_fraction 0.25 (checkpoint) vs 0.5 (now); model.decoder.moe.router_noise True (checkpoint) vs "
        "False (now) (on resume only train.max_steps, train.log_every, train.eval_every, train.checkpoint_every, "
        "train.keep_checkpoints, train.max_bad_steps, train.patience, train.val_generate, "
        "train.activation_checkpointing, data.num_workers, dist.strategy, dist.expert_parallel, dist.backend, "
        "dist.timeout_s, dist.mixed_precision, dist.meta_init may change)")
    # Without compare_config (the command line gave no config) the checkpoint's own config is used.
    trainer, _ = train(tiny(**{"moe.router_noise": False}), shapes_csv, tmp_path / "run", resume=True, max_steps=4)
    assert trainer.step == 4 and trainer.config.model.decoder.moe.router_noise


def test_resume_refuses_flags_for_a_checkpoint_that_does_not_record_them(shapes_csv, tmp_path, monkeypatch):
    state = trainer_module.Trainer._state
    monkeypatch.setattr(trainer_module.Trainer, "_state",
                        lambda self: {k: v for k, v in state(self).items() if k != "command_config"})
    train(tiny(**{"train.max_steps": 2}), shapes_csv, tmp_path / "run")
    monkeypatch.undo()
    with pytest.raises(ConfigError, match="does not record the config its run was started with"):
        train(tiny(), shapes_csv, tmp_path / "run", resume=True, compare_config=True)
    assert train(tiny(), shapes_csv, tmp_path / "run", resume=True, max_steps=3)[0].step == 3


def _equal_length_captions(path, rows):
    """Shapes images captioned "item 00", "item 01" ...: every row has as many answer tokens."""
    lines = path.read_text().splitlines()
    path.write_text("\n".join([lines[0]] + [f"{line.split(',')[0]},item {i:02d}"
                                             for i, line in enumerate(lines[1:rows + 1])]) + "\n")
    return path


def _record_steps(monkeypatch, config, data, out):
    """The trainer, and per optimizer step: the weights before it, the micro-batches it trained on
    and the gradients it clipped (by parameter name)."""
    steps = []
    train_step, forward, clip = trainer_module.Trainer.train_step, VLM.forward, torch.nn.utils.clip_grad_norm_

    def recording_train_step(self, batches):
        names = {id(p): name for name, p in self.model.named_parameters()}
        weights = {name: value.clone() for name, value in self.model.state_dict().items()}
        steps.append({"weights": weights, "names": names, "batches": [], "grads": None})
        return train_step(self, batches)

    def recording_forward(self, images, input_ids, attention_mask=None, labels=None, **options):
        if labels is not None and self.training:  # evaluation passes labels too
            steps[-1]["batches"].append((images, input_ids, attention_mask, labels))
        return forward(self, images, input_ids, attention_mask, labels, **options)

    def recording_clip(params, max_norm):
        params = list(params)
        steps[-1]["grads"] = {steps[-1]["names"][id(p)]: p.grad.clone() for p in params}
        return clip(params, max_norm)

    monkeypatch.setattr(trainer_module.Trainer, "train_step", recording_train_step)
    monkeypatch.setattr(VLM, "forward", recording_forward)
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", recording_clip)
    trainer, _ = train(config, data, out)
    monkeypatch.undo()
    return trainer, steps


def _whole_batch_gradients(model, step) -> dict[str, torch.Tensor]:
    """The gradient of the step's rows in one forward and backward pass, from the weights before it."""
    model.load_state_dict(step["weights"])
    model.zero_grad(set_to_none=True)
    images, ids, mask, labels = (torch.cat(parts) for parts in zip(*step["batches"]))
    model.train()
    model(images, ids, mask, labels).loss.backward()
    return {name: p.grad for name, p in model.named_parameters() if name in step["grads"]}


def test_gradient_accumulation_gives_the_gradients_of_one_big_batch(tmp_path, monkeypatch):
    from shapes import write_shapes_csv

    # The loss is a mean per micro-batch, so B rows and 2 x B/2 give the same gradient only when
    # both halves hold as many tokens: equal-length captions, no padding. The Switch balance loss
    # is a product of two per-batch means, not a mean, so it is off here; the z-loss is a
    # per-token mean and stays. Router noise off: the two runs draw their noise differently.
    data = _equal_length_captions(write_shapes_csv(tmp_path / "items.csv", rows=16), rows=16)
    settings = {"train.max_steps": 2, "data.val_fraction": 0, "moe.router_noise": False, "moe.aux_loss_coef": 0}
    # 16 rows: two steps are one epoch in both runs, so each step sees the same 8 rows either way.
    _, big = _record_steps(monkeypatch, tiny(**settings, **{"train.batch_size": 8}), data, tmp_path / "big")
    trainer, small = _record_steps(monkeypatch, tiny(**settings, **{"train.batch_size": 4, "train.grad_accum": 2}),
                          data, tmp_path / "small")
    assert [len(step["batches"]) for step in big] == [1, 1] and [len(step["batches"]) for step in small] == [2, 2]
    # An Adam update would not show a wrong scale (its first step is about lr * sign(gradient)), so
    # gradients are compared: with each other, and with the gradient of the step's 8 rows in one
    # pass from the weights before the step. A missing 1/grad_accum doubles the accumulated ones;
    # a gradient not cleared after step 1 adds itself to step 2's in both runs.
    for step, (b, s) in enumerate(zip(big, small), start=1):
        assert torch.equal(torch.cat([ids for _, ids, _, _ in s["batches"]]), b["batches"][0][1]), step
        reference = _whole_batch_gradients(trainer.model, s)
        assert set(b["grads"]) == set(s["grads"]) == set(reference) and len(reference) > 10
        for name, grad in s["grads"].items():
            assert grad.abs().max() > 0, (step, name)
            torch.testing.assert_close(grad, b["grads"][name], rtol=1e-4, atol=1e-7, msg=f"step {step}: {name}")
            torch.testing.assert_close(grad, reference[name], rtol=1e-4, atol=1e-7, msg=f"step {step}: {name}")
            torch.testing.assert_close(b["grads"][name], reference[name], rtol=1e-4, atol=1e-7,
                                       msg=f"step {step}: {name}")


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


def test_bf16_autocast_learns_on_cpu(shapes_csv, tmp_path):
    trainer, _ = train(tiny(**{"train.max_steps": 40, "train.lr": 3e-3, "train.precision": "bf16",
                               "train.eval_every": 100}), shapes_csv, tmp_path / "run")
    assert trainer.amp_dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())  # autocast, not bf16 weights
    losses = [v for _, v in trainer.history["train/lm_loss"]]
    assert losses[-1] < losses[0] * 0.7


@pytest.mark.parametrize("cuda,mps,expected", [(True, True, "cuda"), (False, True, "mps"), (False, False, "cpu")])
def test_device_auto_prefers_cuda_then_mps_then_cpu(monkeypatch, cuda, mps, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)
    assert resolve_device("auto") == torch.device(expected)
    assert resolve_device("cpu") == torch.device("cpu")


def test_a_device_the_machine_lacks_is_refused_in_one_line(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=r"^train.device cuda:1: this machine has no CUDA device"):
        resolve_device("cuda:1")
    with pytest.raises(ConfigError, match=r"^--device mps: this machine has no Apple MPS device"):
        resolve_device("mps", key="--device")
    with pytest.raises(ConfigError, match=r"^--device 'gpu': expected auto, cpu, cuda, cuda:N or mps"):
        resolve_device("gpu", key="--device")


def test_auto_precision_is_bf16_only_where_the_device_supports_it(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    monkeypatch.setattr(torch.backends.mps, "is_macos_or_newer", lambda major, minor: (major, minor) <= (14, 0))
    assert autocast_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert autocast_dtype("auto", torch.device("mps")) == torch.bfloat16
    assert autocast_dtype("auto", torch.device("cpu")) is None
    assert autocast_dtype("fp32", torch.device("cuda")) is None
    assert autocast_dtype("bf16", torch.device("cpu")) == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)  # e.g. a V100
    monkeypatch.setattr(torch.backends.mps, "is_macos_or_newer", lambda major, minor: False)  # macOS 13
    assert autocast_dtype("auto", torch.device("cuda")) is None
    assert autocast_dtype("auto", torch.device("mps")) is None


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
