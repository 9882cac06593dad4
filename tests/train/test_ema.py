"""train.ema_decay: the weight average, what validation and checkpoints use, and resume."""

import pytest
import runs
import torch
from runs import keep_copy_at, train
from safetensors.torch import load_file

from moevlm.checkpoint import load_model
from moevlm.evaluate import evaluate
from moevlm.train import trainer as trainer_module
from moevlm.train.ema import decay_at

DECAY = 0.5


SETTINGS = {"train.max_steps": 3, "train.checkpoint_every": 3, "train.eval_every": 3, "train.val_generate": 2,
            "data.val_fraction": 0.25, "train.ema_decay": DECAY, "moe.router_noise": "false"}


def tiny(**overrides):
    return runs.tiny(SETTINGS, **overrides)


@pytest.fixture
def weights_after_each_update(monkeypatch):
    """The trainable weights right after each optimizer update, as the trainer has them."""
    seen = []
    real_step = trainer_module.Trainer.train_step

    def train_step(self, batches):
        metrics = real_step(self, batches)
        params = {id(p) for group in self.optimizer.param_groups for p in group["params"]}
        seen.append({name: p.detach().clone() for name, p in self.model.named_parameters() if id(p) in params})
        return metrics

    monkeypatch.setattr(trainer_module.Trainer, "train_step", train_step)
    return seen


def test_the_saved_weights_are_the_hand_computed_average_over_three_steps(shapes_csv, tmp_path,
                                                                         weights_after_each_update):
    train(tiny(), shapes_csv, tmp_path / "run")
    w1, w2, w3 = weights_after_each_update
    saved = load_file(tmp_path / "run" / "model.safetensors")
    d2, d3 = decay_at(DECAY, 2), decay_at(DECAY, 3)
    assert (d2, d3) == (0.25, 4 / 13)  # the warm-up of the decay, below train.ema_decay early on
    for name in w1:
        expected = d3 * (d2 * w1[name] + (1 - d2) * w2[name]) + (1 - d3) * w3[name]
        assert torch.allclose(saved[name], expected, atol=1e-6), name
        assert not torch.allclose(saved[name], w3[name]), name  # not the last weights
    # The optimizer state beside them holds the training weights, for --resume.
    optimizer = torch.load(tmp_path / "run" / "optimizer.pt", weights_only=True)
    raw = [state["ema"] for state in optimizer["state"].values()]
    assert any(torch.equal(r, w) for r in raw for w in w3.values())


def test_past_the_warm_up_the_decay_is_train_ema_decay(shapes_csv, tmp_path, weights_after_each_update):
    """(1 + t) / (10 + t) passes 0.5 at update 9: updates 9 and 10 use the cap, 0.5, not 10/19 and 11/20."""
    train(tiny(**{"train.max_steps": 10, "train.lr": 0.02, "train.eval_every": 100}), shapes_csv, tmp_path / "run")
    weights = weights_after_each_update
    decays = {t: min(DECAY, (1 + t) / (10 + t)) for t in range(2, 11)}  # written out, not decay_at
    assert [decays[t] for t in (8, 9, 10)] == [0.5, 0.5, 0.5] and decays[7] < 0.5
    assert [decay_at(DECAY, t) for t in range(2, 11)] == list(decays.values())
    saved = load_file(tmp_path / "run" / "model.safetensors")
    for name in weights[0]:
        expected = weights[0][name]
        for t in range(2, 11):
            expected = decays[t] * expected + (1 - decays[t]) * weights[t - 1][name]
        torch.testing.assert_close(saved[name], expected, rtol=0, atol=1e-6, msg=name)


def test_validation_scores_the_average_and_inference_reads_it(shapes_csv, tmp_path):
    trainer, result = train(tiny(), shapes_csv, tmp_path / "run")
    model = load_model(tmp_path / "run")[0]
    again = evaluate(model, trainer.val_set, trainer.tokenizer, batch_size=8, max_generate=2)
    assert again["loss"] == pytest.approx(result["loss"], rel=1e-6)
    # What the run returns is the average too.
    assert all(torch.equal(p, q) for p, q in zip(trainer.model.state_dict().values(), model.state_dict().values()))


def test_resume_goes_on_with_the_training_weights_and_the_average(shapes_csv, tmp_path, monkeypatch):
    config = tiny(**{"train.max_steps": 6, "train.log_every": 1})
    straight, _ = train(config, shapes_csv, tmp_path / "straight")
    with monkeypatch.context() as patch:
        keep_copy_at(patch, 3, tmp_path / "interrupted")
        train(config, shapes_csv, tmp_path / "other")
    resumed, _ = train(config, shapes_csv, tmp_path / "interrupted", resume=True)
    timing = "train/tokens_per_s"
    assert {k: v for k, v in resumed.history.items() if k != timing} == \
        {k: v for k, v in straight.history.items() if k != timing}
    a, b = (load_file(tmp_path / run / "model.safetensors") for run in ("straight", "interrupted"))
    assert all(torch.equal(a[name], b[name]) for name in a)


def test_off_leaves_the_last_weights(shapes_csv, tmp_path, weights_after_each_update):
    train(tiny(**{"train.ema_decay": 0}), shapes_csv, tmp_path / "run")
    saved = load_file(tmp_path / "run" / "model.safetensors")
    assert all(torch.equal(saved[name], w) for name, w in weights_after_each_update[-1].items())
