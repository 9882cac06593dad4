"""MoE layers installed into a transformers causal LM: each chosen decoder layer's ``mlp`` becomes an
``MoEMLP`` whose experts all start as copies of the dense MLP, with a fresh router (sparse upcycling,
Komatsuzaki et al. 2022). Reads Llama-family (gate/up/down, SiLU), GPT-2 (Conv1D c_fc/c_proj) and Phi
(fc1/fc2) MLPs; the activation is recognised by its values, so every spelling transformers uses for
the same function is understood.

Why the upcycled LM computes what the dense one did: every expert a token can be sent to is the same
function f and the top-k weights sum to one, so sum_k w_k f(x) = f(x) whatever the fresh router picks
(up to router noise in training and tokens dropped by a capacity factor).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from moevlm.config import DecoderConfig, MoEConfig
from moevlm.errors import ConfigError, MoevlmError
from moevlm.models.moe import MoE


class TokenKinds:
    """Which positions of the LM call in progress are image, text or padding (moe.PAD / IMAGE /
    TEXT, (B, T)), for the MoE layers installed in that LM: their load statistics, aux losses and
    capacity leave padding out. A transformers decoder layer calls ``mlp(hidden_states)`` and nothing
    more, so the model that owns the LM hands the kinds over for the length of one call:
    ``with kinds.given(token_kind): lm(...)``. Outside such a call every token counts as text."""

    def __init__(self):
        self._current: torch.Tensor | None = None

    @contextlib.contextmanager
    def given(self, token_kind: torch.Tensor):
        previous, self._current = self._current, token_kind
        try:
            yield
        finally:
            self._current = previous

    def for_positions(self, shape: torch.Size) -> torch.Tensor | None:
        kind = self._current
        assert kind is None or kind.shape == shape, (
            f"the token kinds given have shape {tuple(kind.shape)} but the MoE layer got hidden states of "
            f"{tuple(shape)} positions: give the kinds of this call")
        return kind


class MoEMLP(nn.Module):
    """Drop-in for a transformers decoder layer's ``mlp``: (B, T, D) -> (B, T, D), with the token
    kinds of the call from the ``TokenKinds`` its model shares with it."""

    def __init__(self, moe: MoE, kinds: TokenKinds):
        super().__init__()
        self.moe = moe
        self.kinds = kinds

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.moe(hidden_states, self.kinds.for_positions(hidden_states.shape[:2]))


@dataclass
class DenseWeights:
    """A dense MLP's weights in our expert layout: act(x @ w1 + b1) @ w2 + b2."""
    w1_DF: torch.Tensor  # (D, F); swiglu: F = 2H, [gate | up] side by side
    b1_F: torch.Tensor | None
    w2_HD: torch.Tensor
    b2_D: torch.Tensor | None
    activation: str  # a moe.activation value
    dropout: float

    @property
    def width(self) -> int:
        return self.w2_HD.size(1)

    @property
    def hidden(self) -> int:
        return self.w2_HD.size(0)


# Activations are recognised by their values, not their names: transformers spells the same
# function several ways (gelu_new, gelu_fast, gelu_pytorch_tanh; silu, swish), and a value
# check cannot mistake GELU's tanh form for the exact one (they differ by up to ~5e-4 here).
_PROBE = torch.linspace(-6.0, 6.0, 241, dtype=torch.float64)
_KNOWN = {"silu": F.silu, "gelu": F.gelu, "gelu_tanh": lambda x: F.gelu(x, approximate="tanh")}


def activation_of(act: nn.Module) -> str | None:
    """"silu", "gelu", "gelu_tanh", or None for anything else."""
    try:
        with torch.no_grad():
            got = act(_PROBE.clone())
    except Exception:  # an activation that cannot take a float64 vector is not one of ours
        return None
    for name, fn in _KNOWN.items():
        if isinstance(got, torch.Tensor) and got.shape == _PROBE.shape and torch.allclose(
                got, fn(_PROBE), rtol=0.0, atol=1e-6):
            return name
    return None


def read_dense_mlp(mlp: nn.Module) -> DenseWeights:
    """The weights of a transformers MLP, or a one-line MoevlmError naming its class."""
    # Lazy: transformers takes seconds to import.
    from transformers.pytorch_utils import Conv1D

    name = type(mlp).__name__

    def fail(problem: str):
        raise MoevlmError(f"cannot upcycle {name}: {problem}")

    def linear(attr: str, classes: tuple[type, ...] = (nn.Linear,)) -> nn.Module:
        module = getattr(mlp, attr)
        if type(module) not in classes:  # a LoRA-wrapped projection is not a plain Linear
            fail(f"{attr} is a {type(module).__name__}, not {' or '.join(k.__name__ for k in classes)} "
                 "(merge LoRA adapters before upcycling)")
        return module

    def act_module(*attrs: str) -> tuple[nn.Module, str | None]:
        for attr in attrs:
            if isinstance(getattr(mlp, attr, None), nn.Module):
                act = getattr(mlp, attr)
                return act, activation_of(act)
        fail(f"no activation module ({' or '.join(attrs)})")

    dropout = mlp.dropout.p if isinstance(getattr(mlp, "dropout", None), nn.Dropout) else 0.0
    if all(hasattr(mlp, attr) for attr in ("gate_proj", "up_proj", "down_proj")):  # Llama family
        gate, up, down = linear("gate_proj"), linear("up_proj"), linear("down_proj")
        if any(p.bias is not None for p in (gate, up, down)):
            fail("its projections have biases (mlp_bias=True); swiglu experts have none")
        act, activation = act_module("act_fn", "act", "activation_fn")
        if activation != "silu":
            fail(f"gated MLP with activation {type(act).__name__}; only silu (SwiGLU) experts exist")
        w1 = torch.cat([gate.weight.t(), up.weight.t()], dim=1)  # (D, 2H): [gate | up], as moe.py
        return DenseWeights(w1, None, down.weight.t(), None, "swiglu", dropout)
    if hasattr(mlp, "c_fc") and hasattr(mlp, "c_proj"):  # GPT-2: Conv1D holds weight as (in, out)
        fc, proj = linear("c_fc", (Conv1D,)), linear("c_proj", (Conv1D,))
        w1, b1, w2, b2 = fc.weight, fc.bias, proj.weight, proj.bias
        act, activation = act_module("act", "act_fn", "activation_fn")
    elif hasattr(mlp, "fc1") and hasattr(mlp, "fc2"):  # Phi: nn.Linear holds weight as (out, in)
        fc, proj = linear("fc1"), linear("fc2")
        w1, b1, w2, b2 = fc.weight.t(), fc.bias, proj.weight.t(), proj.bias
        act, activation = act_module("activation_fn", "act", "act_fn")
    else:
        fail("unknown MLP layout (expected gate_proj/up_proj/down_proj, c_fc/c_proj or fc1/fc2)")
    if activation not in ("gelu", "gelu_tanh"):
        fail(f"activation {type(act).__name__} is not GELU or GELU-tanh, the two-matrix experts there are")
    if b1 is None or b2 is None:
        fail("two-matrix MLP without biases; gelu experts have biases")
    return DenseWeights(w1, b1, w2, b2, activation, dropout)


def decoder_layers(lm: nn.Module) -> nn.ModuleList:
    """The decoder layers of a transformers causal LM: model.layers (Llama, Qwen2, Mistral,
    Phi) or transformer.h (GPT-2), found through get_decoder() where the model has it."""
    owners = [lm, getattr(lm, "model", None), getattr(lm, "transformer", None)]
    try:
        owners.insert(0, lm.get_decoder())
    except (AttributeError, NotImplementedError, ValueError):
        pass
    for owner in owners:
        for attr in ("layers", "h"):
            layers = getattr(owner, attr, None)
            if isinstance(layers, nn.ModuleList) and len(layers) and hasattr(layers[0], "mlp"):
                return layers
    raise MoevlmError(f"cannot upcycle {type(lm).__name__}: found no decoder layers with an mlp "
                      "(looked for model.layers and transformer.h)")


def experts_from_dense(dense: DenseWeights, cfg: MoEConfig, router_std: float = 0.02) -> MoE:
    """An MoE layer whose experts are all copies of ``dense``, with a fresh router: a small
    normal gate and a zero noise projection (as decoder.py initialises them)."""
    assert cfg.activation == dense.activation, (cfg.activation, dense.activation)
    if cfg.shared_expert:
        raise ConfigError("upcycling needs moe.shared_expert=false: a shared expert would add to the dense output")
    device, dtype = dense.w1_DF.device, dense.w1_DF.dtype
    with torch.device(device):
        moe = MoE(dense.width, dense.hidden, cfg, dense.dropout)
    moe.to(dtype)
    E = cfg.num_experts
    with torch.no_grad():
        moe.w1_EDF.copy_(dense.w1_DF.expand(E, -1, -1))
        moe.w2_EHD.copy_(dense.w2_HD.expand(E, -1, -1))
        if moe.b1_EF is not None:
            moe.b1_EF.copy_(dense.b1_F.expand(E, -1))
            moe.b2_ED.copy_(dense.b2_D.expand(E, -1))
        nn.init.normal_(moe.gate.weight, std=router_std)
        if moe.noise is not None:
            nn.init.zeros_(moe.noise.weight)  # softplus(0) noise at first, learned from there
    return moe


def install_moe_layers(lm: nn.Module, decoder_cfg: DecoderConfig, kinds: TokenKinds | None = None) -> None:
    """Replace the MLP of each layer in ``decoder_cfg.moe_layer_indices`` of a transformers
    causal LM with ``MoEMLP`` (experts copied from the dense MLP, fresh router), in place.

    The LM's MLPs decide the expert activation (Llama-family silu -> swiglu, GPT-2/Phi
    gelu_new -> gelu_tanh, exact gelu -> gelu); ``decoder_cfg.moe.activation`` must name it
    (``upcycle`` builds such a config). Layers that already hold an ``MoEMLP``
    are left as they are, so the call is idempotent. Every MLP is read before any is
    replaced: on an error the LM is unchanged."""
    layers = decoder_layers(lm)
    dense = _dense_mlps(lm, decoder_cfg.moe_layer_indices)
    activation = _one_activation(lm, dense)
    if activation and activation != decoder_cfg.moe.activation:
        raise MoevlmError(f"{type(lm).__name__}'s MLPs make {activation} experts, but moe.activation is "
                          f"{decoder_cfg.moe.activation} (resolve_pretrained or upcycle give the config that fits)")
    for i in decoder_cfg.moe_layer_indices:
        if isinstance(layers[i].mlp, MoEMLP) and layers[i].mlp.moe.cfg.activation != decoder_cfg.moe.activation:
            raise MoevlmError(f"layer {i} already has {layers[i].mlp.moe.cfg.activation} experts, "
                              f"not {decoder_cfg.moe.activation}")
    router_std = getattr(getattr(lm, "config", None), "initializer_range", 0.02)
    for i, mlp in dense.items():  # in the replaced MLP's mode: a fresh module would be training
        moe = experts_from_dense(mlp, decoder_cfg.moe, router_std)
        layers[i].mlp = MoEMLP(moe, kinds or TokenKinds()).train(layers[i].mlp.training)


def _dense_mlps(lm: nn.Module, indices: list[int]) -> dict[int, DenseWeights]:
    """The dense MLPs of ``indices`` (layers that are MoE already left out), read before anything changes."""
    layers = decoder_layers(lm)
    bad = [i for i in indices if not 0 <= i < len(layers)]
    if bad:
        raise MoevlmError(f"MoE layers {bad} are outside the LM's layers 0..{len(layers) - 1}")
    return {i: read_dense_mlp(layers[i].mlp) for i in indices if not isinstance(layers[i].mlp, MoEMLP)}


def _one_activation(lm: nn.Module, dense: dict[int, DenseWeights]) -> str:
    activations = sorted({mlp.activation for mlp in dense.values()})
    if len(activations) > 1:
        raise MoevlmError(f"cannot upcycle {type(lm).__name__}: its MLPs mix activations {activations}")
    return activations[0] if activations else ""


def mlp_activation(lm: nn.Module, indices: list[int]) -> str:
    """The expert activation the dense MLPs of ``indices`` make ("" when all are MoE already)."""
    return _one_activation(lm, _dense_mlps(lm, indices))
