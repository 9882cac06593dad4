"""LoRA adapters (peft) on a pretrained LM's projections, and merging them back for the next stage.

The adapters go into every linear projection of the decoder layers (attention and MLP, the
QLoRA choice), never into the LM head, the embeddings or MoE layers: experts and routers are
trained in full when the ``moe`` group learns. peft injects the adapters in place, so the LM keeps
its own forward; a wrapped projection's weight is then named ``...q_proj.base_layer.weight``.
"""

from __future__ import annotations

from torch import nn

from moevlm.config import DecoderConfig
from moevlm.models.moe import MoE


def _projection_names(lm: nn.Module) -> list[str]:
    inside_moe = {name for name, module in lm.named_modules() if isinstance(module, MoE)}
    output = lm.get_output_embeddings() if hasattr(lm, "get_output_embeddings") else None
    return [name for name, module in lm.named_modules()
            if isinstance(module, (nn.Linear, _conv1d())) and module is not output
            and not any(name == moe or name.startswith(moe + ".") for moe in inside_moe)
            # the MoEMLP wrapper holds the MoE one level down; its router is a Linear too
            and ".moe." not in name]


def _conv1d() -> type:
    # Lazy: transformers takes seconds to import.
    from transformers.pytorch_utils import Conv1D  # GPT-2's linear layers, weights stored (in, out)

    return Conv1D


def apply_lora(lm: nn.Module, cfg: DecoderConfig) -> None:
    """Add rank ``cfg.lora_rank`` adapters; the LM computes exactly what it did (lora_B starts at zero)."""
    # Lazy: only LoRA needs peft.
    from peft import LoraConfig, inject_adapter_in_model

    targets = _projection_names(lm)
    if not targets:
        raise ValueError(f"{type(lm).__name__}: no linear projections to put LoRA adapters on")
    transposed = isinstance(lm.get_submodule(targets[0]), _conv1d())
    inject_adapter_in_model(LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                                       target_modules=targets, fan_in_fan_out=transposed), lm)


def has_lora(model: nn.Module) -> bool:
    # Lazy: only LoRA needs peft.
    from peft.tuners.lora import LoraLayer

    return any(isinstance(module, LoraLayer) for module in model.modules())


def merge_lora(model: nn.Module) -> None:
    """Fold every adapter into its base weight and put the plain layer back in its place."""
    # Lazy: only LoRA needs peft.
    from peft.tuners.lora import LoraLayer

    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge()
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, module.get_base_layer())
    for module in model.modules():  # peft's record of the adapters, on the module it injected into
        if "peft_config" in vars(module):
            del module.peft_config


def names_after_lora(names: set[str], model: nn.Module) -> set[str]:
    """``names`` of weights as they are called once adapters wrap their layers (``q_proj.weight``
    becomes ``q_proj.base_layer.weight``); names no longer in the model are dropped."""
    present = set(model.state_dict())
    out = set()
    for name in names:
        head, _, leaf = name.rpartition(".")
        for candidate in (name, f"{head}.base_layer.{leaf}"):
            if candidate in present:
                out.add(candidate)
    return out
