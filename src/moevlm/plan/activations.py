"""Activation memory of one training row, by a formula per block.

What a block keeps for the backward, in elements per token, counted from the tensors autograd saves
in an eager float32 forward (tests/test_plan.py checks each formula against those tensors at small
shapes; h width, kv = key/value heads x head size, f feed-forward width, a heads, E experts, k top-k):

- decoder attention sub-block (norm, q/k/v, RoPE, SDPA with its log-sum-exp, output projection):
  scratch ``llama`` 9h + 3kv + 1.5a; scratch ``gpt`` 5h + 3kv + 2a; a transformers LM 8h + 2kv + 1.5a.
  SDPA (flash or memory-efficient kernels) never stores the T x T scores, so nothing grows with T².
- dense feed-forward: SwiGLU 4f (gate, up, SiLU, product), GELU 2f.
- MoE feed-forward (top-k sorted dispatch, dropless): k (4f + 3h + 10) (2f for GELU experts: each
  token's k copies, the experts' hidden states, the index bookkeeping) + 5E + 9 (fp32 router logits,
  noise, probabilities); a shared expert adds a dense feed-forward.
- vision block (ViT, SigLIP, CLIP): 8h + 2f + 2a per image token.
- a frozen block that a gradient still passes through keeps no inputs of its matrix products:
  2h fewer in attention, h + f fewer in the feed-forward (k (h + f) in an MoE layer).
- a block no gradient reaches (a frozen tower with nothing trainable before it) keeps nothing.
- the head (``head_bytes``): the final norm 2h, RoPE's cos and sin, the attention mask, and at the
  labelled positions only (the models compute logits nowhere else; counted here as every text token,
  the most a row can have) the fp32 log-softmax (4 bytes per vocabulary entry); beside them the logits
  (2 or 4 bytes an entry) and, in the loss's backward, two fp32 gradients of their size (8 bytes an
  entry). At a vocabulary of 49,152 this is 16 bytes x 49,152 = 786 kB a labelled token, more than a
  960-wide block keeps.

The backward of a block makes a gradient for each tensor it kept, for a moment: one block's set more
(the largest) on top of what is kept.

Activation checkpointing (``train.activation_checkpointing``): ``full`` keeps each block's input (h per
token) and, during the backward, one block's whole set (the largest) while it is recomputed;
``selective`` recomputes only each block's feed-forward sub-block: the attention sub-blocks keep their
tensors (the feed-forward's input, its norm's output, among them), and one feed-forward's set lives
during its recompute.

In bf16 (autocast or FSDP2 mixed precision) a block's tensors take 2 bytes an element (norms run in
fp32 for a moment only); in fp32 4.
"""

from __future__ import annotations

from dataclasses import dataclass

from moevlm.config import Config
from moevlm.plan.counts import Counts

MODES = ("none", "full", "selective")


@dataclass(frozen=True)
class Shape:
    """Tokens one row puts through each stack."""
    decoder_tokens: int
    vision_tokens: int
    image_tokens: int  # through the projector


def row_shape(config: Config, seq_len: int | None) -> Shape:
    """A row with an image and the longest text: image tokens + decoder.max_text_len (``seq_len``: the
    decoder's tokens instead, image tokens included)."""
    vision = config.model.vision
    n_image = vision.num_image_tokens
    cls = int(vision.pretrained is None and vision.arch == "vit" or (vision.hf_config or {}).get(
        "model_type") == "clip_vision_model")
    return Shape(seq_len or n_image + config.model.decoder.max_text_len, vision.num_patches + cls, n_image)


def _decoder_dims(config: Config) -> dict:
    d = config.model.decoder
    head = d.width // d.heads
    return {"h": d.width, "kv": d.kv_heads * head, "f": d.ffn_hidden, "a": d.heads, "E": d.moe.num_experts,
            "k": d.moe.top_k, "swiglu": d.moe.activation == "swiglu", "shared": d.moe.shared_expert}


def attention_elements(config: Config, through: bool) -> float:
    d = config.model.decoder
    x = _decoder_dims(config)
    if d.pretrained is not None:
        n = 8 * x["h"] + 2 * x["kv"] + 1.5 * x["a"]
    elif d.arch == "llama":
        n = 9 * x["h"] + 3 * x["kv"] + 1.5 * x["a"]
    else:
        n = 5 * x["h"] + 3 * x["kv"] + 2 * x["a"]
    return n - 2 * x["h"] * through


def _dense_ffn(config: Config, f: int) -> int:
    d = config.model.decoder
    swiglu = d.arch == "llama" if d.pretrained is None else _hf_gated(config)
    return 4 * f if swiglu else 2 * f


def _hf_gated(config: Config) -> bool:
    """A transformers LM with a gated (SwiGLU-style) MLP: Llama, Mistral, Qwen ...; GPT-2 has none."""
    return (config.model.decoder.hf_config or {}).get("model_type") not in ("gpt2", "gpt_neox", "opt", "gpt_bigcode")


def ffn_elements(config: Config, moe: bool, through: bool) -> float:
    x = _decoder_dims(config)
    h, f = x["h"], x["f"]
    if not moe:
        return _dense_ffn(config, f) - (h + f) * through
    per_copy = (4 if x["swiglu"] else 2) * f + 3 * h + 10
    n = x["k"] * per_copy + 5 * x["E"] + 9 + (_dense_ffn(config, f) if x["shared"] else 0)
    return n - x["k"] * (h + f) * through


def vision_elements(config: Config) -> tuple[float, float]:
    """(attention sub-block, feed-forward) elements per image token of a vision block."""
    v = config.model.vision
    f = (v.hf_config or {}).get("intermediate_size") or round(v.mlp_ratio * v.width)
    return 8 * v.width + 2 * v.heads, 2 * f


def head_bytes(config: Config, shape: Shape, act_bytes: int) -> tuple[float, float]:
    """(kept by autograd, alive beside it at the start of the backward) bytes of a row's head and of the
    inputs every layer shares: the final norm (2h), RoPE's cos and sin (2 x head size; Llama-style LMs), the attention
    mask (s: one float per key), and at the labelled positions (every text token at most) the fp32
    log-softmax (4 bytes per vocabulary entry); beside them the logits the loss came from and, in the
    loss's backward, two fp32 gradients of their size."""
    d = config.model.decoder
    rope = 2 * d.width // d.heads if (d.arch == "llama" if d.pretrained is None else _hf_gated(config)) else 0
    labelled = shape.decoder_tokens - shape.image_tokens
    kept = shape.decoder_tokens * (2 * d.width + rope + shape.decoder_tokens) * act_bytes + labelled * 4 * d.vocab_size
    return kept, labelled * (act_bytes + 8) * d.vocab_size


def activation_bytes(config: Config, counts: Counts, shape: Shape, mode: str, act_bytes: int) -> float:
    """Bytes of one row's activations at their peak (the start of the backward), under ``mode``."""
    kept, transient = activation_parts(config, counts, shape, mode, act_bytes)
    return kept + transient


def activation_parts(config: Config, counts: Counts, shape: Shape, mode: str,
                     act_bytes: int) -> tuple[float, float]:
    """(kept for the backward at the end of the forward, more for a moment in the backward) bytes of a row."""
    assert mode in MODES, mode
    kept, recompute, working = 0.0, 0.0, 0.0
    width = {"vision": config.model.vision.width, "decoder": config.model.decoder.width}
    for block in counts.blocks:
        if block.grad == "none":
            continue
        through = block.grad == "through"
        if block.stack == "vision":
            tokens = shape.vision_tokens
            attn, ffn = vision_elements(config)
        else:
            tokens = shape.decoder_tokens
            frozen_attention = through or not block.trainable_outside_moe
            attn, ffn = attention_elements(config, frozen_attention), ffn_elements(config, block.moe, through)
        whole = (attn + ffn) * tokens
        working = max(working, whole)
        if mode == "none":
            kept += whole
        elif mode == "full":
            kept += width[block.stack] * tokens
            recompute = max(recompute, whole)
        else:  # a feed-forward's input is its norm's output, already kept with the attention sub-block
            kept += attn * tokens
            recompute = max(recompute, ffn * tokens)
    projector = shape.image_tokens * (config.model.vision.width + 2 * config.model.decoder.width *
                                      (config.model.projector.kind == "mlp"))
    learns = any(b.grad != "none" for b in counts.blocks if b.stack == "decoder")
    head, head_extra = head_bytes(config, shape, act_bytes) if learns else (0.0, 0.0)
    return (kept + projector * learns) * act_bytes + head, (recompute + working) * act_bytes + head_extra
