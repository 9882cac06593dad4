"""Sparse upcycling: dense feed-forward layers become MoE layers whose experts all start as
copies of the dense weights (Komatsuzaki et al. 2022, "Sparse Upcycling").

Why the upcycled model computes what the dense one did: every expert a token can be sent to is
the same function f, and the top-k weights are a softmax, so they sum to one:
sum_k w_k f(x) = f(x). That holds whatever the fresh router picks, so training starts from
the dense model's loss and the experts drift apart as they learn from different tokens. Two
things break the equality, both in training mode only: router noise and a capacity_factor that
drops tokens. In eval mode it is exact up to float rounding.

Two kinds of model:
- a transformers causal LM (Llama/Qwen2/Mistral, GPT-2, Phi): ``install_moe_layers`` swaps a
  decoder layer's ``mlp`` for ``MoEMLP``, in place;
- the scratch ``VLM``: a new VLM is built from a config whose moe.layers includes the chosen
  layers, and every weight is copied over (dense FFN weights into each expert).
``upcycle`` handles both and returns the config that describes the result.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from moevlm.config import Config, DecoderConfig, MoEConfig
from moevlm.errors import ConfigError, MoevlmError
from moevlm.models.moe import MoE
from moevlm.models.vlm import VLM


class MoEMLP(nn.Module):
    """Drop-in for a transformers decoder layer's ``mlp``: (B, T, D) -> (B, T, D).

    The decoder layer calls ``mlp(hidden_states)`` and nothing more, so which tokens are
    image, text or padding (for the load statistics and the aux losses) comes in through
    ``token_kind`` (B, T) with moe.PAD / IMAGE / TEXT, set by the model before each LM call.
    None: every token counts as text."""

    def __init__(self, moe: MoE):
        super().__init__()
        self.moe = moe
        self.token_kind: torch.Tensor | None = None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        kind = self.token_kind
        assert kind is None or kind.shape == hidden_states.shape[:2], (
            f"MoEMLP.token_kind has shape {tuple(kind.shape)} but the layer got hidden states "
            f"{tuple(hidden_states.shape)}: set token_kind for this call (or None)")
        return self.moe(hidden_states, kind)


@dataclass
class DenseMLP:
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


def read_dense_mlp(mlp: nn.Module) -> DenseMLP:
    """The weights of a transformers MLP, or a one-line MoevlmError naming its class."""
    from transformers.pytorch_utils import Conv1D  # here: importing transformers takes seconds

    name = type(mlp).__name__

    def fail(problem: str):
        raise MoevlmError(f"cannot upcycle {name}: {problem}")

    def linear(attr: str, kinds: tuple[type, ...] = (nn.Linear,)) -> nn.Module:
        module = getattr(mlp, attr)
        if type(module) not in kinds:  # a LoRA-wrapped projection is not a plain Linear
            fail(f"{attr} is a {type(module).__name__}, not {' or '.join(k.__name__ for k in kinds)} "
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
        act, kind = act_module("act_fn", "act", "activation_fn")
        if kind != "silu":
            fail(f"gated MLP with activation {type(act).__name__}; only silu (SwiGLU) experts exist")
        w1 = torch.cat([gate.weight.t(), up.weight.t()], dim=1)  # (D, 2H): [gate | up], as moe.py
        return DenseMLP(w1, None, down.weight.t(), None, "swiglu", dropout)
    if hasattr(mlp, "c_fc") and hasattr(mlp, "c_proj"):  # GPT-2: Conv1D holds weight as (in, out)
        fc, proj = linear("c_fc", (Conv1D,)), linear("c_proj", (Conv1D,))
        w1, b1, w2, b2 = fc.weight, fc.bias, proj.weight, proj.bias
        act, kind = act_module("act", "act_fn", "activation_fn")
    elif hasattr(mlp, "fc1") and hasattr(mlp, "fc2"):  # Phi: nn.Linear holds weight as (out, in)
        fc, proj = linear("fc1"), linear("fc2")
        w1, b1, w2, b2 = fc.weight.t(), fc.bias, proj.weight.t(), proj.bias
        act, kind = act_module("activation_fn", "act", "act_fn")
    else:
        fail("unknown MLP layout (expected gate_proj/up_proj/down_proj, c_fc/c_proj or fc1/fc2)")
    if kind not in ("gelu", "gelu_tanh"):
        fail(f"activation {type(act).__name__} is not GELU or GELU-tanh, the two-matrix experts there are")
    if b1 is None or b2 is None:
        fail("two-matrix MLP without biases; gelu experts have biases")
    return DenseMLP(w1, b1, w2, b2, kind, dropout)


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


def experts_from_dense(dense: DenseMLP, cfg: MoEConfig, router_std: float = 0.02) -> MoE:
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
        moe.w1_EDH.copy_(dense.w1_DF.expand(E, -1, -1))
        moe.w2_EHD.copy_(dense.w2_HD.expand(E, -1, -1))
        if moe.b1_EH is not None:
            moe.b1_EH.copy_(dense.b1_F.expand(E, -1))
            moe.b2_ED.copy_(dense.b2_D.expand(E, -1))
        nn.init.normal_(moe.gate.weight, std=router_std)
        if moe.noise is not None:
            nn.init.zeros_(moe.noise.weight)  # softplus(0) noise at first, learned from there
    return moe


def install_moe_layers(lm: nn.Module, decoder_cfg: DecoderConfig) -> None:
    """Replace the MLP of each layer in ``decoder_cfg.moe_layer_indices`` of a transformers
    causal LM with ``MoEMLP`` (experts copied from the dense MLP, fresh router), in place.

    The LM's MLPs decide the expert activation (Llama-family silu -> swiglu, GPT-2/Phi
    gelu_new -> gelu_tanh, exact gelu -> gelu): it is WRITTEN INTO ``decoder_cfg.moe.activation``
    (in place), so the config describes the model. Layers that already hold an ``MoEMLP``
    are left as they are, so the call is idempotent. Every MLP is read before any is
    replaced: on an error the LM is unchanged."""
    layers = decoder_layers(lm)
    indices = decoder_cfg.moe_layer_indices
    bad = [i for i in indices if not 0 <= i < len(layers)]
    if bad:
        raise MoevlmError(f"MoE layers {bad} are outside the LM's layers 0..{len(layers) - 1}")
    dense = {i: read_dense_mlp(layers[i].mlp) for i in indices if not isinstance(layers[i].mlp, MoEMLP)}
    kinds = sorted({mlp.activation for mlp in dense.values()})
    if len(kinds) > 1:
        raise MoevlmError(f"cannot upcycle {type(lm).__name__}: its MLPs mix activations {kinds}")
    if kinds:
        decoder_cfg.moe.activation = kinds[0]
    for i in indices:
        if isinstance(layers[i].mlp, MoEMLP) and layers[i].mlp.moe.cfg.activation != decoder_cfg.moe.activation:
            raise MoevlmError(f"layer {i} already has {layers[i].mlp.moe.cfg.activation} experts, "
                              f"not {decoder_cfg.moe.activation}")
    router_std = getattr(getattr(lm, "config", None), "initializer_range", 0.02)
    for i, mlp in dense.items():  # in the replaced MLP's mode: a fresh module would be training
        layers[i].mlp = MoEMLP(experts_from_dense(mlp, decoder_cfg.moe, router_std)).train(layers[i].mlp.training)


def parse_layers(layers, depth: int) -> list[int]:
    """"all", "every-other" (1, 3, 5 ...) or a list of layer indices -> sorted indices."""
    if layers == "all":
        return list(range(depth))
    if layers == "every-other":
        return list(range(1, depth, 2))
    if isinstance(layers, (list, tuple)) and layers and all(
            isinstance(i, int) and not isinstance(i, bool) for i in layers):
        bad = [i for i in layers if not 0 <= i < depth]
        if bad:
            raise ConfigError(f"upcycle layers {bad} are outside the decoder's layers 0..{depth - 1}")
        return sorted(set(layers))
    raise ConfigError(f"upcycle layers must be all, every-other or a non-empty list of layer indices, not {layers!r}")


def upcycle(model: nn.Module, config: Config, experts: int, top_k: int,
            layers: str | list[int] = "all") -> tuple[nn.Module, Config]:
    """Turn the dense FFN/MLP of ``layers`` into MoE layers of ``experts`` copies, top-``top_k``.

    ``model`` is a scratch ``VLM`` (a new VLM is returned; the old one is left as it was) or a
    ``PretrainedVLM`` (changed in place, and returned). The returned config is ``config``
    with model.decoder.moe num_experts, top_k, layers and activation describing the new model
    (other moe settings, router_noise included, as they were). Layers that are MoE already
    keep theirs; they must share experts, top_k and activation (one moe section per model)."""
    if isinstance(experts, bool) or not isinstance(experts, int) or experts < 1:
        raise ConfigError(f"upcycle experts must be an integer >= 1, not {experts!r}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= experts:
        raise ConfigError(f"upcycle top_k must be between 1 and experts {experts}, not {top_k!r}")
    moe_cfg = config.model.decoder.moe
    if moe_cfg.shared_expert:
        raise ConfigError("upcycling needs moe.shared_expert=false: a shared expert would add to the dense output")
    if isinstance(model, VLM):
        blocks = model.decoder.blocks
        existing = [i for i, block in enumerate(blocks) if isinstance(block.ffn, MoE)]
        chosen = parse_layers(layers, len(blocks))
        activation = "gelu"  # the scratch FeedForward: exact GELU with biases
    elif isinstance(getattr(model, "lm", None), nn.Module):
        lm_layers = decoder_layers(model.lm)
        existing = [i for i, layer in enumerate(lm_layers) if isinstance(layer.mlp, MoEMLP)]
        chosen = parse_layers(layers, len(lm_layers))
        # Read the chosen MLPs now, so an unsupported one fails before anything changes.
        kinds = sorted({read_dense_mlp(lm_layers[i].mlp).activation for i in chosen if i not in existing})
        if len(kinds) > 1:
            raise MoevlmError(f"cannot upcycle {type(model.lm).__name__}: its MLPs mix activations {kinds}")
        activation = kinds[0] if kinds else moe_cfg.activation
    else:
        raise MoevlmError(f"cannot upcycle a {type(model).__name__}: expected a VLM or a PretrainedVLM")
    already = sorted(set(chosen) & set(existing))
    if already:
        raise ConfigError(f"upcycle layers {already} are MoE layers already (MoE layers: {existing})")
    if existing and (experts, top_k, activation) != (moe_cfg.num_experts, moe_cfg.top_k, moe_cfg.activation):
        raise ConfigError(f"the model's MoE layers {existing} have {moe_cfg.num_experts} {moe_cfg.activation} "
                          f"experts, top-{moe_cfg.top_k}; new MoE layers must match them, not "
                          f"{experts} {activation} experts, top-{top_k}")

    values = config.to_dict()
    values["model"]["decoder"]["moe"].update(
        num_experts=experts, top_k=top_k, activation=activation,
        layers=sorted(set(existing) | set(chosen)) if existing or isinstance(layers, (list, tuple)) else layers)
    new_config = Config.from_dict(values)
    assert sorted(set(existing) | set(chosen)) == new_config.model.decoder.moe_layer_indices

    if isinstance(model, VLM):
        return _upcycled_vlm(model, new_config, chosen), new_config
    model.cfg = new_config.model
    install_moe_layers(model.lm, model.cfg.decoder)
    for layer in decoder_layers(model.lm):  # MoE layers from before share the new moe section
        if isinstance(layer.mlp, MoEMLP):
            layer.mlp.moe.cfg = model.cfg.decoder.moe
    return model, new_config


def _upcycled_vlm(model: VLM, config: Config, chosen: list[int]) -> VLM:
    """A new VLM for ``config`` with every weight of ``model``; the dense FFNs of ``chosen``
    copied into each expert. Routers keep the Decoder's init (gate N(0, 0.02), noise 0)."""
    cfg = config.model
    new = VLM(cfg)  # random weights (a pretrained vision tower from its hf_config), all overwritten below
    param = next(model.parameters())
    new.to(device=param.device, dtype=param.dtype)
    old_state, state = model.state_dict(), new.state_dict()
    E = cfg.decoder.moe.num_experts
    converted = set()
    for i in chosen:
        ffn = f"decoder.blocks.{i}.ffn."
        # FeedForward is nn.Linear, weight (out, in); experts hold (in, out) per expert.
        state[ffn + "w1_EDH"] = old_state[ffn + "fc.weight"].t().expand(E, -1, -1)
        state[ffn + "b1_EH"] = old_state[ffn + "fc.bias"].expand(E, -1)
        state[ffn + "w2_EHD"] = old_state[ffn + "proj.weight"].t().expand(E, -1, -1)
        state[ffn + "b2_ED"] = old_state[ffn + "proj.bias"].expand(E, -1)
        converted |= {ffn + p for p in ("fc.weight", "fc.bias", "proj.weight", "proj.bias")}
    for key, value in old_state.items():
        if key in converted:
            continue
        assert key in state and state[key].shape == value.shape, f"upcycled VLM has no {key} like the old one"
        state[key] = value
    assert all(".ffn." in k for k in set(state) - set(old_state))  # only experts and routers are new
    new.load_state_dict(state)
    return new.train(model.training)
