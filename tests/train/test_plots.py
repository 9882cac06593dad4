import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from PIL import Image

from moevlm.train.plots import plot_expert_load, plot_loss_curves


@pytest.fixture(autouse=True)
def no_leaked_figures():
    plt.close("all")
    yield
    assert plt.get_fignums() == []


def assert_png(path):
    assert path.is_file() and path.stat().st_size > 0
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.width > 100 and image.height > 100


def test_loss_curves_with_lr_and_empty_series(tmp_path):
    steps = range(0, 200, 10)
    history = {
        "train/loss": [(s, 5.0 * 0.97 ** s) for s in steps],  # spans > 50x: log axis
        "val/loss": [(s, 4.0 * 0.97 ** s) for s in steps[::5]],
        "train/aux_loss": [(s, 0.01) for s in steps],
        "train/lr": [(s, 1e-3 * min(1.0, s / 50)) for s in steps],
        "val/bleu": [],
    }
    path = plot_loss_curves(history, tmp_path / "plots" / "loss.png")
    assert path == tmp_path / "plots" / "loss.png"
    assert_png(path)


def test_loss_curves_leave_out_series_that_are_not_losses(tmp_path):
    losses = {"train/loss": [(1, 2.0), (2, 1.5)], "val/loss": [(2, 1.7)]}
    others = {"train/tokens_per_s": [(1, 5e4), (2, 6e4)], "val/exact_match": [(2, 0.3)]}
    plain = plot_loss_curves(losses, tmp_path / "plain.png")
    mixed = plot_loss_curves(losses | others, tmp_path / "mixed.png")
    with Image.open(plain) as a, Image.open(mixed) as b:
        assert a.size == b.size and a.tobytes() == b.tobytes()


def test_loss_curves_without_lr_is_shorter(tmp_path):
    history = {"train/loss": [(1, 2.0), (2, 1.5)], "train/lr": [(1, 1e-3), (2, 1e-3)]}
    with_lr = plot_loss_curves(history, tmp_path / "with_lr.png")
    without_lr = plot_loss_curves({"train/loss": history["train/loss"]}, tmp_path / "loss.png")
    with Image.open(with_lr) as tall, Image.open(without_lr) as short:
        assert tall.height > short.height


def test_loss_curves_with_nothing_yet(tmp_path):
    assert_png(plot_loss_curves({"train/loss": []}, tmp_path / "empty.png"))


def test_expert_load_small_grid_numpy(tmp_path):
    load = np.random.default_rng(0).integers(0, 100, size=(4, 2, 8))
    load[2, 0] = 0  # a layer that saw no image tokens stays blank
    path = plot_expert_load(load, tmp_path / "load.png", title="step 100")
    assert path == tmp_path / "load.png"
    assert_png(path)


def test_expert_load_large_grid_tensor(tmp_path):
    load = torch.randint(0, 50, (40, 2, 64))
    assert_png(plot_expert_load(load, tmp_path / "big.png"))


def test_expert_load_rejects_wrong_shape(tmp_path):
    with pytest.raises(ValueError):
        plot_expert_load(np.ones((4, 8)), tmp_path / "bad.png")
    assert not (tmp_path / "bad.png").exists()
