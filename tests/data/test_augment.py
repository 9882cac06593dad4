import math

import numpy as np
import pytest
import torch

from moevlm.config import load_config
from moevlm.data.augment import Augmentation, _warp


def ring(size=32):
    """A dark ring on white: rotation and zoom move its ink, a plain picture would hide them."""
    y, x = np.mgrid[:size, :size] - (size - 1) / 2
    radius = np.hypot(x, y)
    ink = (np.abs(radius - size / 4) < 2) | ((np.abs(x) < 1.5) & (y < 0) & (y > -size / 3))
    return torch.from_numpy(np.where(ink, 0, 255).astype(np.uint8))[None].repeat(3, 1, 1)


def test_the_identity_returns_the_image_itself():
    image = ring()
    assert Augmentation()(image, 0, 0, 0) is image
    assert Augmentation(translate=0.2).is_identity is False


def test_same_numbers_same_image_other_numbers_another():
    augment = Augmentation(translate=0.1, scale=0.1, rotate=10, color=0.2)
    image = ring()
    first = augment(image, 3, 1, 7)
    assert torch.equal(first, augment(image, 3, 1, 7))
    for other in ((4, 1, 7), (3, 2, 7), (3, 1, 8)):  # seed, epoch, row
        assert not torch.equal(first, augment(image, *other))
    assert first.dtype == torch.uint8 and first.shape == image.shape


def test_a_shift_alone_moves_whole_pixels_and_repeats_the_border():
    image = ring(16)
    for row in range(20):
        out = Augmentation(translate=0.125)(image, 5, 0, row)
        dy, dx = (round(v * 0.125 * 16) for v in np.random.default_rng([5, 0, row]).uniform(-1, 1, size=6)[:2])
        rows = (torch.arange(16) - dy).clamp(0, 15)
        cols = (torch.arange(16) - dx).clamp(0, 15)
        assert torch.equal(out, image[:, rows][:, :, cols]), row


def test_a_quarter_turn_is_exact_and_about_the_centre():
    image = ring(33).float()
    turned = _warp(image, 0.0, 0.0, 1.0, math.pi / 2)
    assert torch.allclose(turned, torch.rot90(image, k=-1, dims=(1, 2)), atol=1e-2)
    twice_as_big = _warp(image, 0.0, 0.0, 2.0, 0.0)
    assert torch.allclose(twice_as_big[:, 16, 16], image[:, 16, 16])  # the centre stays put


def test_colour_jitter_changes_brightness_and_contrast_only():
    augment = Augmentation(color=0.3)
    image = ring()
    out = augment(image, 1).float()
    # A brightness and contrast change is affine in the pixel values: ink and paper stay two levels.
    assert len(torch.unique(out)) <= 2 and not torch.equal(out, image.float())


def test_grain_is_the_same_in_every_channel_with_the_asked_spread():
    image = torch.full((3, 32, 32), 128, dtype=torch.uint8)
    out = Augmentation(noise=0.1)(image, 2, 0, 5)
    assert torch.equal(out[0], out[1]) and torch.equal(out[1], out[2])
    assert 20 < (out.float() - 128).std() < 31  # 0.1 of 255 levels
    assert torch.equal(out, Augmentation(noise=0.1)(image, 2, 0, 5))
    assert not torch.equal(out, Augmentation(noise=0.1)(image, 2, 0, 6))


def test_presets_and_config_give_the_augmentation():
    config = load_config("default")
    assert Augmentation.from_config(config.data) is not None
    off = load_config("default", overrides=["data.augment=false"])
    assert Augmentation.from_config(off.data) is None
    with pytest.raises(Exception, match="data.aug_rotate must be in"):
        load_config("default", overrides=["data.aug_rotate=200"])
    with pytest.raises(Exception, match=r"data.aug_noise must be in \[0, 1\)"):
        load_config("default", overrides=["data.aug_noise=-0.1"])
    assert Augmentation.from_config(load_config("default", overrides=["data.aug_noise=0.2"]).data).noise == 0.2
