"""The dense feed-forward block used by ViT blocks, dense decoder layers and the shared expert."""

import torch
import torch.nn.functional as F
from torch import nn

FFN_ACTIVATIONS = ("gelu", "swiglu")


class FeedForward(nn.Module):
    """gelu: proj(gelu(fc(x))) with biases. swiglu (Shazeer 2020, as Llama): no biases, ``fc``
    makes gate and up side by side (rows [gate (hidden) | up (hidden)], the order transformers'
    gate_proj / up_proj split into), proj(silu(gate) * up)."""

    def __init__(self, width: int, hidden: int, dropout: float = 0.0, activation: str = "gelu"):
        super().__init__()
        assert activation in FFN_ACTIVATIONS, activation
        self.activation = activation
        swiglu = activation == "swiglu"
        self.fc = nn.Linear(width, 2 * hidden if swiglu else hidden, bias=not swiglu)
        self.proj = nn.Linear(hidden, width, bias=not swiglu)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.activation == "swiglu":
            gate, up = self.fc(x).chunk(2, dim=-1)
            return self.dropout(self.proj(F.silu(gate) * up))
        return self.dropout(self.proj(F.gelu(self.fc(x))))
