"""The decoder as a transformers text model: its config (Mixtral, Qwen2-MoE, Qwen3-MoE, or a
pretrained LM's own) and its weights, named as that model's classic checkpoint layout
(``model.layers.{i}.block_sparse_moe.experts.{e}.w1.weight`` ...), which transformers 5 and vLLM both read.

Exactness, piece by piece:
- experts: ``w1_EDF[e]`` holds [gate | up] side by side, (D, 2H): gate and up are its halves, transposed;
- routers: our router computes transformers' order (fp32 softmax over all experts, top-k,
  renormalise: Mixtral always, Qwen-MoE with ``norm_topk_prob``); router noise is training-only;
- dense layers (some layers not MoE): Qwen-MoE's ``mlp_only_layers``;
- a shared expert: Qwen2-MoE gates it with sigmoid(x . w), so w = 0 gives 0.5 and its down
  projection is doubled (exact in floating point); without one, Qwen2-MoE still has a shared
  expert: one of width 1 and zero weights, which adds exactly 0;
- the image token: LLaVA marks image positions with an id of the embedding table. An LM whose
  tokenizer fills the table gets one more row: zeros in the input embedding (replaced by image
  features anyway), and in the output head a copy of the padding row, so greedy decoding never
  prefers it (argmax takes the lower id on a tie); generation_config also suppresses it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from moevlm.config import ModelConfig
from moevlm.export.blockers import MOE_TARGETS
from moevlm.models.moe import MoE
from moevlm.models.moe_install import MoEMLP, decoder_layers

CLASS_OF = {"mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM"}


@dataclass
class TextPart:
    config: dict  # the text_config, "architectures" included (vLLM picks its class by it)
    weights: dict[str, torch.Tensor]  # "model.*" and "lm_head.weight" (the LLaVA prefix comes later)
    image_token_id: int


def _moe_names(target: str, layer: int) -> str:
    return f"model.layers.{layer}." + ("block_sparse_moe." if target == "mixtral" else "mlp.")


def _experts(moe: MoE, target: str, prefix: str) -> dict[str, torch.Tensor]:
    """One MoE layer's router and experts (shared one included) in ``target``'s classic names."""
    out = {prefix + "gate.weight": moe.gate.weight}
    hidden = moe.w2_EHD.size(1)
    for e in range(moe.cfg.num_experts):
        w1 = moe.w1_EDF[e]
        gate, up, down = w1[:, :hidden].t(), w1[:, hidden:].t(), moe.w2_EHD[e].t()
        if target == "mixtral":
            names = ("w1", "w3", "w2")
        else:
            names = ("gate_proj", "up_proj", "down_proj")
        for name, tensor in zip(names, (gate, up, down)):
            out[f"{prefix}experts.{e}.{name}.weight"] = tensor
    if target == "qwen2_moe":
        out.update(_shared_expert(moe, prefix))
    return out


def _shared_expert(moe: MoE, prefix: str) -> dict[str, torch.Tensor]:
    width = moe.gate.weight.size(1)
    like = moe.gate.weight
    if moe.shared is None:
        gate = up = like.new_zeros(1, width)
        down = like.new_zeros(width, 1)
    else:
        gate, up = _swiglu_halves(moe.shared.fc.weight)
        down = moe.shared.proj.weight * 2  # sigmoid(0) = 0.5 halves it in Qwen2-MoE
    return {prefix + "shared_expert.gate_proj.weight": gate, prefix + "shared_expert.up_proj.weight": up,
            prefix + "shared_expert.down_proj.weight": down,
            prefix + "shared_expert_gate.weight": like.new_zeros(1, width)}


def _swiglu_halves(fc_weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A swiglu FeedForward's fc (2H, D), rows [gate | up] -> gate_proj, up_proj (H, D) each."""
    hidden = fc_weight.size(0) // 2
    return fc_weight[:hidden], fc_weight[hidden:]


def _classic_expert_names(weights: dict[str, torch.Tensor], model_type: str) -> None:
    """transformers 5 holds a native MoE LM's experts stacked (``mlp.experts.gate_up_proj`` (E, 2H, D),
    ``mlp.experts.down_proj`` (E, D, H)); written back per expert, in the layout vLLM reads."""
    for name in [n for n in weights if n.endswith(".mlp.experts.gate_up_proj")]:
        layer = name.removesuffix("mlp.experts.gate_up_proj")
        gate_up, down = weights.pop(name), weights.pop(layer + "mlp.experts.down_proj")
        prefix = layer + ("block_sparse_moe." if model_type == "mixtral" else "mlp.")
        if model_type == "mixtral":
            weights[prefix + "gate.weight"] = weights.pop(layer + "mlp.gate.weight")
        names = ("w1", "w3", "w2") if model_type == "mixtral" else ("gate_proj", "up_proj", "down_proj")
        hidden = down.size(2)
        for e in range(gate_up.size(0)):
            for part, tensor in zip(names, (gate_up[e, :hidden], gate_up[e, hidden:], down[e])):
                weights[f"{prefix}experts.{e}.{part}.weight"] = tensor


def _with_image_row(weights: dict[str, torch.Tensor], config: dict, image_token_id: int, copy_row: int) -> None:
    """Append the image token's row to both embedding tables when ``image_token_id`` is past them."""
    embed = weights["model.embed_tokens.weight"]
    if image_token_id < embed.size(0):
        return
    assert image_token_id == embed.size(0), (image_token_id, embed.size(0))
    head = weights.get("lm_head.weight", embed)
    weights["model.embed_tokens.weight"] = torch.cat([embed, embed.new_zeros(1, embed.size(1))])
    weights["lm_head.weight"] = torch.cat([head, head[copy_row:copy_row + 1]])
    config.update(vocab_size=embed.size(0) + 1, tie_word_embeddings=False)


def scratch_text_part(decoder: nn.Module, model_cfg: ModelConfig, special: dict[str, int]) -> TextPart:
    """moevlm's own llama-style decoder -> Mixtral (every layer MoE, no shared expert) or Qwen2-MoE.

    ``special``: the tokenizer's pad, bos, eos ids."""
    d = model_cfg.decoder
    moe_layers = d.moe_layer_indices
    target = "mixtral" if len(moe_layers) == d.depth and not d.moe.shared_expert else "qwen2_moe"
    kv_heads = getattr(d, "kv_heads", None) or d.heads
    head_dim = d.width // d.heads
    config = {
        "model_type": target, "architectures": [CLASS_OF[target]],
        "vocab_size": d.vocab_size, "hidden_size": d.width, "intermediate_size": d.ffn_hidden,
        "num_hidden_layers": d.depth, "num_attention_heads": d.heads, "num_key_value_heads": kv_heads,
        "hidden_act": "silu", "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
        "max_position_embeddings": model_cfg.vision.num_image_tokens + d.max_text_len,
        "rope_parameters": {"rope_type": "default", "rope_theta": float(getattr(d, "rope_theta", 10000.0))},
        "num_experts_per_tok": d.moe.top_k, "router_aux_loss_coef": d.moe.aux_loss_coef,
        "pad_token_id": special["pad"], "bos_token_id": special["bos"], "eos_token_id": special["eos"],
        "attention_dropout": 0.0, "use_cache": True,
    }
    if target == "mixtral":
        config.update(num_local_experts=d.moe.num_experts, head_dim=head_dim, sliding_window=None)
    else:
        config.update(num_experts=d.moe.num_experts, moe_intermediate_size=d.ffn_hidden, norm_topk_prob=True,
                      shared_expert_intermediate_size=d.ffn_hidden if d.moe.shared_expert else 1,
                      decoder_sparse_step=1, mlp_only_layers=[i for i in range(d.depth) if i not in moe_layers],
                      qkv_bias=True, use_sliding_window=False)
    weights = {"model.embed_tokens.weight": decoder.tok_emb.weight, "model.norm.weight": decoder.ln_f.weight,
               "lm_head.weight": decoder.lm_head.weight}
    q_rows, kv_rows = d.heads * head_dim, kv_heads * head_dim
    for i, block in enumerate(decoder.blocks):
        layer = f"model.layers.{i}."
        q, k, v = block.attn.qkv.weight.split([q_rows, kv_rows, kv_rows])
        weights.update({layer + "input_layernorm.weight": block.ln1.weight,
                        layer + "post_attention_layernorm.weight": block.ln2.weight,
                        layer + "self_attn.q_proj.weight": q, layer + "self_attn.k_proj.weight": k,
                        layer + "self_attn.v_proj.weight": v,
                        layer + "self_attn.o_proj.weight": block.attn.proj.weight})
        if target == "qwen2_moe":
            for name, rows in (("q", q_rows), ("k", kv_rows), ("v", kv_rows)):
                weights[layer + f"self_attn.{name}_proj.bias"] = q.new_zeros(rows)
        if isinstance(block.ffn, MoE):
            weights.update(_experts(block.ffn, target, _moe_names(target, i)))
        else:
            gate, up = _swiglu_halves(block.ffn.fc.weight)
            weights.update({layer + "mlp.gate_proj.weight": gate, layer + "mlp.up_proj.weight": up,
                            layer + "mlp.down_proj.weight": block.ffn.proj.weight})
    image_token_id = d.vocab_size
    _with_image_row(weights, config, image_token_id, special["pad"])
    return TextPart(config, weights, image_token_id)


def pretrained_text_part(lm: nn.Module, model_cfg: ModelConfig, image_token_id: int, copy_row: int) -> TextPart:
    """A transformers causal LM (LoRA merged) -> the same LM, or its MoE counterpart when moevlm's
    MoE layers are installed in it (``MOE_TARGETS``)."""
    d = model_cfg.decoder
    source = dict(d.hf_config)
    layers = decoder_layers(lm)
    moe_layers = [i for i, layer in enumerate(layers) if isinstance(layer.mlp, MoEMLP)]
    state = {name: tensor for name, tensor in lm.state_dict(keep_vars=True).items()
             if ".mlp.moe." not in name}
    tied = bool(source.get("tie_word_embeddings")) or (
        "lm_head.weight" in state and state["lm_head.weight"] is state.get("model.embed_tokens.weight"))
    if tied:
        state.pop("lm_head.weight", None)
    weights = {name: tensor.detach() for name, tensor in state.items()}
    config = {key: value for key, value in source.items() if key not in ("transformers_version", "_name_or_path")}
    if not moe_layers:
        config.setdefault("architectures", [type(lm).__name__])
        _classic_expert_names(weights, config["model_type"])
    else:
        every, some = MOE_TARGETS[source["model_type"]]
        target = every if len(moe_layers) == len(layers) else some
        moe_cfg = d.moe
        config.update(model_type=target, architectures=[CLASS_OF[target]], num_experts_per_tok=moe_cfg.top_k,
                      router_aux_loss_coef=moe_cfg.aux_loss_coef, hidden_act="silu")
        hidden = d.ffn_hidden
        if target == "mixtral":
            config.update(num_local_experts=moe_cfg.num_experts, intermediate_size=hidden)
        else:
            config.update(num_experts=moe_cfg.num_experts, moe_intermediate_size=hidden, norm_topk_prob=True,
                          decoder_sparse_step=1, use_sliding_window=False,
                          mlp_only_layers=[i for i in range(len(layers)) if i not in moe_layers])
        if target == "qwen2_moe":
            config.update(shared_expert_intermediate_size=1, qkv_bias=True)
            for i in range(len(layers)):
                for name in ("q", "k", "v"):
                    weight = weights[f"model.layers.{i}.self_attn.{name}_proj.weight"]
                    weights.setdefault(f"model.layers.{i}.self_attn.{name}_proj.bias", weight.new_zeros(weight.size(0)))
        for i in moe_layers:
            weights.update({name: t.detach() for name, t in _experts(layers[i].mlp.moe, target,
                                                                       _moe_names(target, i)).items()})
    if tied and image_token_id >= weights["model.embed_tokens.weight"].size(0):
        weights["lm_head.weight"] = weights["model.embed_tokens.weight"]
    _with_image_row(weights, config, image_token_id, copy_row)
    config["tie_word_embeddings"] = "lm_head.weight" not in weights
    return TextPart(config, weights, image_token_id)
