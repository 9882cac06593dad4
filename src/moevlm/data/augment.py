"""Training-image augmentation: one random affine warp (shift, zoom, rotation), a colour jitter and grain.

The draw depends only on the numbers it is given (train.seed, epoch, row), never on a global
RNG, so a row looks the same whichever DataLoader worker reads it, in whatever order, and a
resumed run sees the images the uninterrupted one saw. Zoom in is a random resized crop, zoom
out and shifts repeat the border pixels into the gap (plain paper stays plain paper). A shift
without zoom or rotation moves whole pixels, so it does not blur small images.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Augmentation:
    """The largest change of each kind (data.aug_*); all 0 is the identity."""

    translate: float = 0.0  # share of the image side
    scale: float = 0.0  # zoom in or out by up to this share
    rotate: float = 0.0  # degrees
    color: float = 0.0  # brightness and contrast change, as a share
    noise: float = 0.0  # per-pixel noise's standard deviation, as a share of 255

    @classmethod
    def from_config(cls, data_config) -> Augmentation | None:
        """The augmentation data.augment asks for, None when it is off."""
        if not data_config.augment:
            return None
        return cls(data_config.aug_translate, data_config.aug_scale, data_config.aug_rotate, data_config.aug_color,
                   data_config.aug_noise)

    @property
    def is_identity(self) -> bool:
        return not (self.translate or self.scale or self.rotate or self.color or self.noise)

    def __call__(self, image: torch.Tensor, *seed: int) -> torch.Tensor:
        """uint8 (C, H, W) -> the same shape, warped as the numbers ``seed`` draw it."""
        if self.is_identity:
            return image
        rng = np.random.default_rng(list(seed))
        shift_y, shift_x, zoom, angle, brightness, contrast = rng.uniform(-1, 1, size=6)
        out = image.float()
        _, height, width = image.shape
        if self.translate or self.scale or self.rotate:
            move_x, move_y = self.translate * shift_x * width, self.translate * shift_y * height  # pixels
            if not (self.scale or self.rotate):  # whole pixels: a shift alone then blurs nothing
                move_x, move_y = round(move_x), round(move_y)
            out = _warp(out, 2 * move_x / width, 2 * move_y / height, 1 + self.scale * zoom,
                        math.radians(self.rotate * angle))
        if self.color:
            mean = out.mean()
            out = (out - mean) * (1 + self.color * contrast) + mean + 255 * self.color * brightness
        if self.noise:  # one grain for all channels: a grey scan stays grey
            out += torch.from_numpy(rng.normal(0.0, 255 * self.noise, size=(1, height, width))).float()
        return out.round_().clamp_(0, 255).to(torch.uint8)


def _warp(image: torch.Tensor, shift_x: float, shift_y: float, zoom: float, angle: float) -> torch.Tensor:
    """Float (C, H, W) moved by (shift_x, shift_y) in [-1, 1] image coordinates (2 = the whole side),
    zoomed by ``zoom`` and turned by ``angle`` radians about its centre, bilinear, border repeated."""
    cos, sin = math.cos(angle) / zoom, math.sin(angle) / zoom
    # The grid maps each output pixel to where it samples the input: the inverse of the motion.
    theta = torch.tensor([[cos, sin, -(cos * shift_x + sin * shift_y)],
                          [-sin, cos, -(-sin * shift_x + cos * shift_y)]], dtype=torch.float32)
    grid = F.affine_grid(theta[None], [1, *image.shape], align_corners=False)
    return F.grid_sample(image[None], grid, mode="bilinear", padding_mode="border", align_corners=False)[0]
