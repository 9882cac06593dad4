"""The configuration schema: typed sections, their validation and their derived values.

Every user-settable field is declared with ``option(default, help)``: the help text is what
``moevlm train --help-config`` prints, so the field's documentation lives in one place. Derived
values (``ffn_hidden``, ``num_image_tokens`` ...) are computed in ``__post_init__``, after every
override, so changing ``decoder.width`` also moves everything derived from it.

Configs are frozen once validated: code that needs another value builds a new config with
``Config.updated({"section.key": value})``, which goes through the same validation
(``config/values.py`` turns dicts into these classes).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from moevlm.config.values import from_dict, set_dotted, to_dict
from moevlm.errors import ConfigError


def option(default: Any = None, help: str = "", *, factory=None) -> Any:  # noqa: A002  (the field's --help text)
    """A user-settable field with its help text; ``factory`` for a nested section."""
    if factory is not None:
        return field(default_factory=factory, metadata={"help": help})
    return field(default=default, metadata={"help": help})


def derived() -> Any:
    """A value computed in ``__post_init__`` from the user-settable fields (never set by users)."""
    return field(init=False)


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def _set(obj, name: str, value) -> None:
    """Assign in ``__post_init__`` of a frozen dataclass."""
    object.__setattr__(obj, name, value)


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


@dataclass(frozen=True)
class DataConfig:
    val_fraction: float = option(0.1, "share held out for validation when --val-data is not given")
    on_bad_row: str = option("error", "a bad row: error (stop with file and row) or skip (skip and count)")
    num_workers: int = option(0, "DataLoader worker processes")
    augment: bool = option(False, "augment training images (never validation images) with the data.aug_* "
                                  "settings, the same way for a given (train.seed, epoch, row)")
    aug_translate: float = option(0.125, "augment: largest shift, as a share of the image side")
    aug_scale: float = option(0.0, "augment: zoom by up to this share in or out (0.1: 0.9x to 1.1x)")
    aug_rotate: float = option(0.0, "augment: largest rotation in degrees")
    aug_color: float = option(0.0, "augment: largest change of brightness and of contrast, as a share (0.2: "
                                   "+-20 %)")
    aug_noise: float = option(0.0, "augment: grain, the standard deviation of noise added to each pixel, as a "
                                   "share of the pixel range (0.1: 25 of 255 levels)")
    max_rows: int | None = option(None, "read at most this many rows (null: all)")
    group_by_length: bool = option(False, "training batches of rows of one modality (image or text-only) and similar "
                                          "length, still shuffled, resumable and the same on any number of ranks: "
                                          "less padding")
    preload: bool = option(True, "true: decode every image once, up front, into memory; false: check images up "
                                 "front and decode them batch by batch in the workers (data larger than memory)")
    image_root: str | None = option(None, "the folder COCO file names (and relative image paths of Hugging Face "
                                          "data) resolve under (null: COCO's train2017/-style folder or the data "
                                          "file's folder); COCO names leading outside it are refused")
    image_column: str | None = option(None, "Hugging Face datasets / Parquet / Arrow: the image column (null: "
                                            "'image' or 'images')")
    text_column: str | None = option(None, "Hugging Face datasets / Parquet / Arrow: the text column (null: "
                                           "'conversations', 'messages', 'texts', 'caption' or 'text')")
    split: str | None = option(None, "the split to read of a data set with several (a DatasetDict folder, an "
                                     "ImageFolder with split folders, hf:NAME); null: train, or the only one "
                                     "(hf:NAME:SPLIT names it too)")
    dedupe: str = option("drop", "rows repeating an earlier row (same image and text): drop (counted in the data "
                                 "summary) or keep; kept repeats stay on one side of the validation split")

    def __post_init__(self):
        _check(0 <= self.val_fraction < 1, "data.val_fraction must be in [0, 1)")
        _check(self.on_bad_row in ("error", "skip"), f"data.on_bad_row must be error or skip, not {self.on_bad_row!r}")
        _check(self.num_workers >= 0, "data.num_workers must be >= 0")
        _check(self.dedupe in ("drop", "keep"), f"data.dedupe must be drop or keep, not {self.dedupe!r}")
        _check(self.split is None or bool(str(self.split).strip()), "data.split must be a split name or null")
        for name in ("aug_translate", "aug_scale", "aug_color", "aug_noise"):
            _check(0 <= getattr(self, name) < 1, f"data.{name} must be in [0, 1)")
        _check(0 <= self.aug_rotate <= 180, "data.aug_rotate must be in [0, 180] degrees")


# The names of the training stages and parameter groups; which groups each stage trains is
# training policy (train/stages.py).
STAGES = ("full", "pretrain", "instruct", "moe")
PARAM_GROUPS = ("vision", "projector", "lm", "moe")
PRECISIONS = ("auto", "fp32", "bf16")
ACTIVATION_CHECKPOINTING = ("none", "full", "selective")
SELECT_METRICS = ("val_loss", "exact_match", "bleu4")


@dataclass(frozen=True)
class TrainConfig:
    batch_size: int = option(32, "rows per micro-batch, over all ranks together under torchrun (each rank takes "
                                 "batch_size / world size)")
    grad_accum: int = option(1, "micro-batches per optimizer step")
    max_steps: int = option(1000, "optimizer steps")
    lr: float = option(1e-3, "peak learning rate (AdamW)")
    min_lr_ratio: float = option(0.1, "the cosine decay ends at lr * min_lr_ratio")
    warmup_steps: int = option(50, "linear warmup steps")
    weight_decay: float = option(0.05, "AdamW weight decay (matrices only)")
    beta1: float = option(0.9, "AdamW beta1")
    beta2: float = option(0.98, "AdamW beta2")
    grad_clip: float = option(1.0, "gradient norm clipping")
    precision: str = option("auto", "auto (bf16 autocast on a GPU that has it, else fp32), fp32 or bf16")
    eval_every: int | None = option(None, "steps between validations (null: every 5 % of max_steps)")
    checkpoint_every: int = option(500, "steps between checkpoints")
    keep_checkpoints: int = option(3, "snapshots kept under checkpoints/; --resume falls back through them")
    max_bad_steps: int = option(10, "non-finite steps (loss or gradient norm) skipped in a row before the run stops")
    log_every: int = option(10, "steps between logged training metrics")
    seed: int = option(0, "seed of the weights, the data order, router noise and dropout")
    device: str = option("auto", "auto, cpu, cuda, cuda:1 ...")
    compile: bool = option(False, "torch.compile the training forward (inductor; needs a C++ compiler on CPU; pays "
                                  "off on long GPU runs)")
    val_generate: int = option(64, "validation rows captioned for exact match at each evaluation")
    stage: str = option("full", "what learns: full (everything), pretrain (the projector), instruct (projector and "
                                "LM, loss on answers), moe (the MoE layers, after upcycling a dense LM)")
    trainable: list | None = option(None, "a list of groups (vision, projector, lm, moe) that overrides the stage's "
                                          "choice")
    lr_vision: float | None = option(None, "learning rate of the vision group (null: train.lr)")
    lr_projector: float | None = option(None, "learning rate of the projector group (null: train.lr)")
    lr_lm: float | None = option(None, "learning rate of the lm group (null: train.lr)")
    lr_moe: float | None = option(None, "learning rate of the moe group (null: train.lr)")
    save_frozen: bool = option(False, "true: checkpoints hold the untrained pretrained weights too; false: they "
                                      "are named in pretrained.json and loaded from their source")
    select: str = option("val_loss", "the validation metric that chooses the best checkpoint: val_loss (lowest), "
                                     "exact_match or bleu4 (highest); ties keep the earlier step")
    patience: int | None = option(None, "stop after this many validations in a row without a new best (null: "
                                        "never stop early)")
    ema_decay: float = option(0.0, "keep an exponential moving average of the weights with this decay (0: off); "
                                   "validation, checkpoints and inference use the average")
    label_smoothing: float = option(0.0, "share of each answer token's target spread over the whole vocabulary "
                                         "(training loss only)")
    activation_checkpointing: str = option("none", "none; full (every block of the towers and the LM keeps only its "
                                                   "input and recomputes the rest in the backward); selective (only "
                                                   "each block's feed-forward or MoE sub-block recomputes)")

    @property
    def validation_interval(self) -> int:
        """Steps between validations: train.eval_every, else 5 % of the run."""
        return self.eval_every or max(1, round(self.max_steps / 20))

    def __post_init__(self):
        _check(self.stage in STAGES, f"train.stage must be {', '.join(STAGES)}, not {self.stage!r}")
        if self.trainable is not None:
            _check(isinstance(self.trainable, list) and self.trainable
                   and all(group in PARAM_GROUPS for group in self.trainable),
                   f"train.trainable must be a non-empty list of {', '.join(PARAM_GROUPS)}, not {self.trainable!r}")
        for name in ("lr_vision", "lr_projector", "lr_lm", "lr_moe"):
            _check(getattr(self, name) is None or getattr(self, name) > 0, f"train.{name} must be positive")
        for name in ("batch_size", "grad_accum", "max_steps", "checkpoint_every", "keep_checkpoints", "log_every"):
            _check(getattr(self, name) >= 1, f"train.{name} must be >= 1")
        _check(self.eval_every is None or self.eval_every >= 1, "train.eval_every must be >= 1 or null")
        _check(0 <= self.ema_decay < 1, "train.ema_decay must be in [0, 1)")
        _check(0 <= self.label_smoothing < 1, "train.label_smoothing must be in [0, 1)")
        _check(self.max_bad_steps >= 0, "train.max_bad_steps must be >= 0")
        _check(self.lr > 0, "train.lr must be positive")
        _check(self.select in SELECT_METRICS,
               f"train.select must be {', '.join(SELECT_METRICS)}, not {self.select!r}")
        _check(self.select == "val_loss" or self.val_generate > 0,
               f"train.select={self.select} needs train.val_generate > 0 (with 0 no row is captioned at validation)")
        _check(self.patience is None or self.patience >= 1, "train.patience must be >= 1 or null")
        _check(self.precision in PRECISIONS, f"train.precision must be {', '.join(PRECISIONS)}, not {self.precision!r}")
        _check(self.activation_checkpointing in ACTIVATION_CHECKPOINTING,
               f"train.activation_checkpointing must be {', '.join(ACTIVATION_CHECKPOINTING)}, "
               f"not {self.activation_checkpointing!r}")


STRATEGIES = ("auto", "ddp", "fsdp")
MIXED_PRECISIONS = ("auto", "bf16", "fp32")
BACKENDS = ("auto", "gloo", "nccl")


@dataclass(frozen=True)
class DistConfig:
    strategy: str = option("auto", "under torchrun: ddp (every rank holds the whole model), fsdp (FSDP2: parameters, "
                                   "gradients and optimizer state sharded across ranks) or auto (ddp when weights, "
                                   "gradients and AdamW state fit in half a rank's memory, else fsdp); one process "
                                   "ignores it")
    expert_parallel: int = option(1, "ranks that split each MoE layer's experts between them (each holds "
                                     "num_experts / E); 1: every rank holds every expert")
    backend: str = option("auto", "auto (nccl on CUDA, gloo on CPU), gloo or nccl")
    timeout_s: int = option(600, "seconds a rank waits for the others in one collective before the run fails")
    mixed_precision: str = option("auto", "FSDP2's parameter dtype: bf16 (weights gathered and computed in bf16, "
                                          "gradients reduced in fp32, fp32 weights in the optimizer), fp32, or auto "
                                          "(bf16 on a CUDA GPU that has it, else fp32); bf16 needs dist.strategy "
                                          "fsdp and no expert parallelism")
    meta_init: bool = option(True, "FSDP with a pretrained LM: build the model on the meta device and have each rank "
                                   "read only its shards of the pretrained weights (no rank holds the whole model); "
                                   "false: every rank builds and loads the whole model, then shards it")

    def __post_init__(self):
        _check(self.strategy in STRATEGIES, f"dist.strategy must be {', '.join(STRATEGIES)}, not {self.strategy!r}")
        _check(self.backend in BACKENDS, f"dist.backend must be {', '.join(BACKENDS)}, not {self.backend!r}")
        _check(self.expert_parallel >= 1, "dist.expert_parallel must be >= 1")
        _check(self.timeout_s >= 1, "dist.timeout_s must be >= 1")
        _check(self.mixed_precision in MIXED_PRECISIONS,
               f"dist.mixed_precision must be {', '.join(MIXED_PRECISIONS)}, not {self.mixed_precision!r}")


@dataclass(frozen=True)
class Config:
    model: ModelConfig = option(help="the model", factory=ModelConfig)
    data: DataConfig = option(help="reading and batching the data", factory=DataConfig)
    train: TrainConfig = option(help="the training run", factory=TrainConfig)
    dist: DistConfig = option(help="training on several processes (torchrun)", factory=DistConfig)

    def to_dict(self) -> dict:
        return to_dict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, values: dict) -> "Config":
        return from_dict(cls, values)

    def updated(self, changes: dict[str, Any]) -> "Config":
        """A new, validated config with ``{"model.decoder.vocab_size": 300, ...}`` changed. Derived
        fields follow; a field that was filled in from others (``ffn_hidden`` left null) keeps the
        value it was given, as it does in the config.json of a checkpoint."""
        values = self.to_dict()
        for key, value in changes.items():
            set_dotted(values, key, value)
        return Config.from_dict(values)
