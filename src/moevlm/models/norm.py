"""RMSNorm (Zhang & Sennrich 2019) as transformers' ``LlamaRMSNorm`` computes it.

Weight only, no mean subtraction, no bias. The statistics are taken in fp32 and the result is
cast back before the weight is applied, in that order, so an exported model matches bit for bit.
"""

from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, width: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)
