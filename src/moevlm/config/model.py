"""The model's config sections: the vision encoder, projector, decoder and its MoE layers, tokenizer."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from moevlm.config.fields import _check, _set, derived, option

IMAGE_TOKENS = ("cls", "patches", "pooled")
VISION_ARCHS = ("vit", "siglip")
DECODER_ARCHS = ("gpt", "llama")


@dataclass(frozen=True)
class VisionConfig:
    image_size: int = option(32, "image side in pixels, after resizing")
    channels: int = option(3, "1 (grey) or 3 (RGB)")
    patch_size: int = option(4, "ViT patch side in pixels")
    width: int = option(128, "ViT width")
    depth: int = option(3, "ViT blocks")
    heads: int = option(4, "ViT attention heads")
    mlp_ratio: float = option(4.0, "ViT MLP hidden size / width")
    dropout: float = option(0.0, "dropout in the ViT")
    image_tokens: str = option("patches", "which encoder outputs become image tokens: cls (the seed's single "
                                          "token), patches (every patch) or pooled (to vision.pooled_tokens)")
    pooled_tokens: int = option(4, "image tokens with image_tokens=pooled: a square whose side divides the patch grid")
    pretrained: str | None = option(None, "a pretrained CLIP or SigLIP vision tower (hub id or folder; "
                                          "model.vision=hf:ID sets it); its sizes then come from its config.json")
    feature_layer: int = option(-2, "pretrained tower: the hidden layer whose outputs become image tokens "
                                    "(LLaVA: -2, the second to last)")
    keep_cls: bool = option(False, "pretrained CLIP tower: keep the CLS output as an extra image token")
    hf_config: dict | None = option(None, "the pretrained tower's own config.json, filled in when the model is "
                                          "first built, so a checkpoint rebuilds it without the source")
    arch: str = option("vit", "scratch encoder: vit (CLS token, final LayerNorm) or siglip (no CLS, no final "
                              "LayerNorm, image tokens are the patches; the layout transformers' SigLIP has)")
    num_patches: int = derived()
    num_image_tokens: int = derived()

    def __post_init__(self):
        # A pretrained tower's convolution drops the edge (SigLIP so400m: 384 px, patch 14, 27 x 27).
        _check(self.pretrained is not None or self.image_size % self.patch_size == 0,
               f"vision.image_size {self.image_size} is not a multiple of vision.patch_size {self.patch_size}")
        _check(self.width % self.heads == 0,
               f"vision.width {self.width} is not divisible by vision.heads {self.heads}")
        _check(self.image_tokens in IMAGE_TOKENS,
               f"vision.image_tokens must be cls, patches or pooled, not {self.image_tokens!r}")
        _check(self.arch in VISION_ARCHS, f"vision.arch must be vit or siglip, not {self.arch!r}")
        _set(self, "num_patches", (self.image_size // self.patch_size) ** 2)
        if self.pretrained is not None:
            _set(self, "image_tokens", "patches")  # a pretrained tower gives every patch (keep_cls adds CLS)
            _set(self, "num_image_tokens", self.num_patches + int(self.keep_cls))
            return
        _check(self.arch != "siglip" or self.image_tokens == "patches",
               f"vision.arch siglip gives patch tokens only, not image_tokens {self.image_tokens}: set "
               f"vision.image_tokens=patches (a larger vision.patch_size gives fewer tokens)")
        if self.image_tokens == "pooled":
            side = round(self.pooled_tokens ** 0.5)
            grid = self.image_size // self.patch_size
            _check(side * side == self.pooled_tokens and grid % side == 0,
                   f"vision.pooled_tokens {self.pooled_tokens} must be a square whose side divides "
                   f"the patch grid side {grid}")
        _set(self, "num_image_tokens", {"cls": 1, "patches": self.num_patches,
                                        "pooled": self.pooled_tokens}[self.image_tokens])


@dataclass(frozen=True)
class ProjectorConfig:
    kind: str = option("mlp", "mlp (two layers, GELU, as LLaVA-1.5) or linear (the original LLaVA)")

    def __post_init__(self):
        _check(self.kind in ("mlp", "linear"), f"projector.kind must be mlp or linear, not {self.kind!r}")


ACTIVATIONS = ("gelu", "gelu_tanh", "swiglu")
MOE_LAYER_CHOICES = ("all", "every-other", "none")


def moe_layer_indices(layers: Any, depth: int, key: str = "moe.layers") -> list[int]:
    """``all``, ``every-other`` (1, 3, 5 ...), ``none`` or a list of layer indices -> sorted indices;
    a ConfigError naming ``key`` for anything else."""
    if layers == "all":
        return list(range(depth))
    if layers == "every-other":
        return list(range(1, depth, 2))
    if layers == "none":
        return []
    _check(isinstance(layers, (list, tuple)) and all(isinstance(i, int) and not isinstance(i, bool) for i in layers),
           f"{key} must be all, every-other, none or a list of layer indices, not {layers!r}")
    bad = [i for i in layers if not 0 <= i < depth]
    _check(not bad, f"{key} {bad} are outside the decoder's layers 0..{depth - 1}")
    return sorted(set(layers))


@dataclass(frozen=True)
class MoEConfig:
    num_experts: int = option(4, "experts per MoE layer")
    top_k: int = option(2, "experts each token is routed to")
    layers: Any = option(None, "which decoder layers are MoE: all, every-other (1, 3, 5 ...), none or a list of "
                               "indices; null: all for a decoder trained from scratch, none for a pretrained LM "
                               "(dense until upcycled)")
    shared_expert: bool = option(False, "an always-on dense expert beside the routed ones")
    capacity_factor: float | None = option(None, "null: dropless; else, in training only, each expert takes at "
                                                 "most ceil(factor * real tokens * k / experts) assignments")
    router_noise: bool = option(True, "noisy top-k: learned per-expert noise on the router logits while training")
    aux_loss_coef: float = option(0.01, "weight of the Switch load-balancing loss")
    z_loss_coef: float = option(0.001, "weight of the router z-loss (ST-MoE)")
    activation: str = option("gelu", "expert feed-forward: gelu (two matrices with biases), gelu_tanh (the same "
                                     "with GPT-2's tanh GELU) or swiglu (gate, up, down; no biases; Llama/Mixtral); "
                                     "always swiglu with decoder.arch=llama")

    def __post_init__(self):
        _check(self.activation in ACTIVATIONS,
               f"moe.activation must be {', '.join(ACTIVATIONS)}, not {self.activation!r}")
        _check(1 <= self.top_k <= self.num_experts,
               f"moe.top_k {self.top_k} must be between 1 and moe.num_experts {self.num_experts}")
        _check(self.capacity_factor is None or self.capacity_factor > 0,
               "moe.capacity_factor must be positive or null (dropless)")
        _check(self.layers is None or isinstance(self.layers, list) or self.layers in MOE_LAYER_CHOICES,
               f"moe.layers must be all, every-other, none or a list of layer indices, not {self.layers!r}")


@dataclass(frozen=True)
class DecoderConfig:
    width: int = option(128, "decoder width")
    depth: int = option(4, "decoder layers")
    heads: int = option(4, "decoder attention heads")
    ffn_hidden: int | None = option(None, "hidden size of the feed-forward layers and of each expert; null: 4 * width")
    max_text_len: int = option(48, "text tokens per sample, <bos> and <eos> included")
    vocab_size: int = option(0, "set from the tokenizer when a model is built")
    dropout: float = option(0.0, "dropout in the decoder")
    tie_embeddings: bool = option(True, "the output head shares the token embedding matrix")
    moe: MoEConfig = option(help="the MoE layers", factory=MoEConfig)
    pretrained: str | None = option(None, "a pretrained causal LM (hub id or folder; model.lm=hf:ID sets it); its "
                                          "sizes and tokenizer then come from its own files")
    lora_rank: int = option(0, "LoRA adapters (peft) of this rank on the pretrained LM's projections; 0: none")
    lora_alpha: float = option(16.0, "LoRA scaling numerator")
    lora_dropout: float = option(0.0, "dropout on the LoRA path")
    hf_config: dict | None = option(None, "the pretrained LM's own config.json (see vision.hf_config)")
    image_token_id: int | None = option(None, "pretrained LM: the id in input_ids that marks an image-token "
                                              "position; null: the LM's vocabulary size, an id no text token has")
    arch: str = option("gpt", "decoder trained from scratch: gpt (LayerNorm, learned positions, biases, GELU) or "
                              "llama (RMSNorm, RoPE, no biases, SwiGLU everywhere; transformers' Llama/Mixtral layout)")
    rope_theta: float = option(10000.0, "arch=llama: RoPE base frequency")
    kv_heads: int | None = option(None, "key/value heads (grouped-query attention when fewer than decoder.heads); "
                                        "null: decoder.heads; a pretrained LM's own are filled in")
    moe_layer_indices: list = derived()

    def __post_init__(self):
        _check(self.lora_rank >= 0, "decoder.lora_rank must be >= 0")
        _check(self.lora_rank == 0 or self.pretrained is not None,
               "decoder.lora_rank needs a pretrained LM (model.lm=hf:ID); a model trained from scratch trains all "
               "weights")
        _check(self.width % self.heads == 0,
               f"decoder.width {self.width} is not divisible by decoder.heads {self.heads}")
        _check(self.max_text_len >= 3, "decoder.max_text_len must be at least 3 (<bos>, a token, <eos>)")
        _check(self.arch in DECODER_ARCHS, f"decoder.arch must be gpt or llama, not {self.arch!r}")
        _check(self.rope_theta > 0, f"decoder.rope_theta must be positive, not {self.rope_theta}")
        if self.ffn_hidden is None:
            _set(self, "ffn_hidden", 4 * self.width)
        if self.kv_heads is None:
            _set(self, "kv_heads", self.heads)
        _check(self.kv_heads >= 1 and self.heads % self.kv_heads == 0,
               f"decoder.kv_heads {self.kv_heads} must divide decoder.heads {self.heads}")
        if self.arch == "llama" and self.pretrained is None and self.moe.activation != "swiglu":
            # A llama decoder has SwiGLU feed-forwards and no biases anywhere: its experts are too.
            _set(self, "moe", dataclasses.replace(self.moe, activation="swiglu"))
        layers = self.moe.layers
        if layers is None:
            layers = "none" if self.pretrained is not None else "all"
        _set(self, "moe_layer_indices", moe_layer_indices(layers, self.depth))


TOKENIZER_KINDS = ("char", "bpe", "hf")


@dataclass(frozen=True)
class TokenizerConfig:
    kind: str = option("char", "char (one token per character, as the seed), bpe (byte-level, trained on the "
                               "data) or hf (the pretrained LM's own; set by model.lm)")
    vocab_size: int = option(512, "bpe: target vocabulary size")

    def __post_init__(self):
        _check(self.kind in TOKENIZER_KINDS, f"tokenizer.kind must be char, bpe or hf, not {self.kind!r}")


@dataclass(frozen=True)
class ModelConfig:
    vision: VisionConfig = option(help="the image encoder", factory=VisionConfig)
    projector: ProjectorConfig = option(help="image features -> text embedding space", factory=ProjectorConfig)
    decoder: DecoderConfig = option(help="the language model (model.lm is another name for it)",
                                    factory=DecoderConfig)
    tokenizer: TokenizerConfig = option(help="how text becomes token ids", factory=TokenizerConfig)

    def __post_init__(self):
        if self.decoder.pretrained is not None and self.tokenizer.kind != "hf":
            _set(self, "tokenizer", dataclasses.replace(self.tokenizer, kind="hf"))  # the LM brings its own
        _check(self.tokenizer.kind != "hf" or self.decoder.pretrained is not None,
               "tokenizer.kind hf needs a pretrained LM (model.lm=hf:ID)")

    @property
    def uses_pretrained(self) -> bool:
        return self.vision.pretrained is not None or self.decoder.pretrained is not None
