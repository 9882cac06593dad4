"""What keeps a model from being exported exactly: each blocker is one short phrase, and the export
refuses the model naming all of them (``ExportError``), rather than write a model that computes
something else."""

from __future__ import annotations

from moevlm.config import Config
from moevlm.errors import ExportError

# Pretrained LMs whose upcycled MoE layers have a transformers class: the source's model_type ->
# the MoE model_type for "every layer MoE" and for "some layers dense".
MOE_TARGETS = {
    "llama": ("mixtral", "qwen2_moe"),
    "mistral": ("mixtral", "qwen2_moe"),
    "qwen2": ("qwen2_moe", "qwen2_moe"),
    "qwen3": ("qwen3_moe", "qwen3_moe"),
}


def export_blockers(config: Config) -> list[str]:
    """Every reason ``config``'s model has no exact transformers LLaVA counterpart (empty: it exports)."""
    model = config.model
    vision, decoder, moe = model.vision, model.decoder, model.decoder.moe
    blockers = []
    if vision.pretrained is None:
        if getattr(vision, "arch", "vit") != "siglip":
            blockers.append("vision.arch vit (a CLS token and a final LayerNorm on every token, which no "
                            "HF vision class computes; train with vision.arch=siglip)")
        if vision.channels != 3:
            blockers.append(f"vision.channels {vision.channels} (HF image processors give RGB)")
    if model.projector.kind != "mlp":
        blockers.append("projector.kind linear (LLaVA's projector is linear_1, GELU, linear_2)")
    if decoder.pretrained is None:
        if getattr(decoder, "arch", "gpt") != "llama":
            blockers.append("decoder.arch gpt (LayerNorm with biases and learned positions, which no HF MoE "
                            "class computes; train with decoder.arch=llama)")
    elif decoder.moe_layer_indices:
        hf = decoder.hf_config or {}
        source_type = hf.get("model_type")
        if moe.activation == "gelu_tanh":
            blockers.append(f"GELU-tanh experts (upcycled from {source_type}; HF MoE classes have SwiGLU experts)")
        elif source_type not in MOE_TARGETS:
            blockers.append(f"MoE layers in a {source_type} LM (exportable: upcycled "
                            f"{', '.join(sorted(MOE_TARGETS))})")
        if hf.get("attention_bias") and source_type in ("llama", "mistral"):
            blockers.append("attention biases (attention_bias=true; Mixtral has none)")
        layers = decoder.moe_layer_indices
        head_dim = hf.get("head_dim") or decoder.width // decoder.heads
        if source_type in ("llama", "mistral") and len(layers) < decoder.depth and head_dim * decoder.heads != \
                decoder.width:
            blockers.append(f"head_dim {head_dim} x {decoder.heads} heads != width {decoder.width} with dense "
                            "layers (Qwen2-MoE derives head_dim from the width)")
    if moe.shared_expert and decoder.pretrained is not None:
        blockers.append("a shared expert in an upcycled LM")
    return blockers


def check_exportable(config: Config, where: str) -> None:
    blockers = export_blockers(config)
    if blockers:
        raise ExportError(f"{where}: cannot export exactly: {'; '.join(blockers)}")
