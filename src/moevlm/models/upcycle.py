"""Sparse upcycling: dense feed-forward layers become MoE layers whose experts all start as
copies of the dense weights (Komatsuzaki et al. 2022, "Sparse Upcycling").

Why the upcycled model computes what the dense one did: every expert a token can be sent to is
the same function f, and the top-k weights are a softmax, so they sum to one:
sum_k w_k f(x) = f(x). That holds whatever the fresh router picks, so training starts from
the dense model's loss and the experts drift apart as they learn from different tokens. Two
things break the equality, both in training mode only: router noise and a capacity_factor that
drops tokens. In eval mode it is exact up to float rounding.

Two kinds of model:
- a transformers causal LM (Llama/Qwen2/Mistral, GPT-2, Phi): ``install_moe_layers``
  (models/moe_install.py) swaps a decoder layer's ``mlp`` for ``MoEMLP``, in place;
- the scratch ``VLM``: a new VLM is built from a config whose moe.layers includes the chosen
  layers, and every weight is copied over (dense FFN weights into each expert).
``upcycle`` handles both and returns the config that describes the result.
"""

from __future__ import annotations

from torch import nn

from moevlm.config import Config, moe_layer_indices
from moevlm.errors import ConfigError, MoevlmError
from moevlm.models.moe import MoE
from moevlm.models.moe_install import MoEMLP, decoder_layers, install_moe_layers, mlp_activation
from moevlm.models.vlm import VLM


def _chosen_layers(layers, depth: int) -> list[int]:
    chosen = moe_layer_indices(layers, depth, key="upcycle layers")
    if not chosen:
        raise ConfigError(f"upcycle layers must be all, every-other or a non-empty list of layer indices, "
                          f"not {layers!r}")
    return chosen


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
        chosen = _chosen_layers(layers, len(blocks))
        # The scratch FeedForward: exact GELU with biases (arch gpt) or SwiGLU without (llama).
        activation = "swiglu" if config.model.decoder.arch == "llama" else "gelu"
    elif isinstance(getattr(model, "lm", None), nn.Module):
        lm_layers = decoder_layers(model.lm)
        existing = [i for i, layer in enumerate(lm_layers) if isinstance(layer.mlp, MoEMLP)]
        chosen = _chosen_layers(layers, len(lm_layers))
        # Read the chosen MLPs now, so an unsupported one fails before anything changes.
        activation = mlp_activation(model.lm, [i for i in chosen if i not in existing]) or moe_cfg.activation
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
    install_moe_layers(model.lm, model.cfg.decoder, model.token_kinds)
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
        # FeedForward is nn.Linear, weight (out, in); experts hold (in, out) per expert. A swiglu
        # fc's rows [gate | up] become w1's columns [gate | up], the experts' layout.
        state[ffn + "w1_EDF"] = old_state[ffn + "fc.weight"].t().expand(E, -1, -1)
        state[ffn + "w2_EHD"] = old_state[ffn + "proj.weight"].t().expand(E, -1, -1)
        converted |= {ffn + "fc.weight", ffn + "proj.weight"}
        if ffn + "fc.bias" in old_state:  # gelu; swiglu has no biases
            state[ffn + "b1_EF"] = old_state[ffn + "fc.bias"].expand(E, -1)
            state[ffn + "b2_ED"] = old_state[ffn + "proj.bias"].expand(E, -1)
            converted |= {ffn + "fc.bias", ffn + "proj.bias"}
    for key, value in old_state.items():
        if key in converted:
            continue
        assert key in state and state[key].shape == value.shape, f"upcycled VLM has no {key} like the old one"
        state[key] = value
    assert all(".ffn." in k for k in set(state) - set(old_state))  # only experts and routers are new
    new.load_state_dict(state)
    return new.train(model.training)
