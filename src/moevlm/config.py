"""Typed configuration: model, data and training sections, presets, overrides.

A config is built from a preset (a dict of values over the dataclass defaults), then a YAML
file, then ``--set section.key=value`` overrides, and only then turned into dataclasses.
Derived values (``ffn_hidden``, ``num_image_tokens`` ...) are computed in ``__post_init__``
after all of that, so an override of ``decoder.width`` also moves everything derived from it.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from moevlm.errors import ConfigError


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


@dataclass
class VisionConfig:
    image_size: int = 32
    channels: int = 3
    patch_size: int = 4
    width: int = 128
    depth: int = 3
    heads: int = 4
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    # Which encoder outputs become image tokens: "cls" (the seed's single token), "patches"
    # (every patch) or "pooled" (patch grid average-pooled to `pooled_tokens` tokens).
    image_tokens: str = "patches"
    pooled_tokens: int = 4
    # A pretrained CLIP or SigLIP vision tower (hub id or local folder; ``--set
    # model.vision=hf:ID`` sets it). Its sizes then come from its own config.json
    # (models/pretrained.py fills image_size, patch_size, width, depth and heads in).
    pretrained: str | None = None
    feature_layer: int = -2  # hidden layer whose outputs become image tokens (LLaVA: the second to last)
    keep_cls: bool = False  # CLIP only: keep the CLS output as an extra image token
    # The pretrained tower's own config (its config.json as a dict), filled in when the model is
    # first built, so a checkpoint rebuilds the architecture without the source at hand.
    hf_config: dict | None = None
    num_patches: int = field(init=False)
    num_image_tokens: int = field(init=False)

    def __post_init__(self):
        # A pretrained tower's convolution drops the edge (SigLIP so400m: 384 px, patch 14, 27 x 27).
        _check(self.pretrained is not None or self.image_size % self.patch_size == 0,
               f"vision.image_size {self.image_size} is not a multiple of vision.patch_size {self.patch_size}")
        _check(self.width % self.heads == 0,
               f"vision.width {self.width} is not divisible by vision.heads {self.heads}")
        _check(self.image_tokens in ("cls", "patches", "pooled"),
               f"vision.image_tokens must be cls, patches or pooled, not {self.image_tokens!r}")
        self.num_patches = (self.image_size // self.patch_size) ** 2
        if self.pretrained is not None:
            self.image_tokens = "patches"  # a pretrained tower gives every patch (vision.keep_cls adds CLS)
            self.num_image_tokens = self.num_patches + int(self.keep_cls)
            return
        if self.image_tokens == "pooled":
            side = round(self.pooled_tokens ** 0.5)
            grid = self.image_size // self.patch_size
            _check(side * side == self.pooled_tokens and grid % side == 0,
                   f"vision.pooled_tokens {self.pooled_tokens} must be a square whose side divides "
                   f"the patch grid side {grid}")
        self.num_image_tokens = {"cls": 1, "patches": self.num_patches,
                                 "pooled": self.pooled_tokens}[self.image_tokens]


@dataclass
class ProjectorConfig:
    kind: str = "mlp"  # "mlp" (two layers, GELU, as in LLaVA-1.5) or "linear"

    def __post_init__(self):
        _check(self.kind in ("mlp", "linear"), f"projector.kind must be mlp or linear, not {self.kind!r}")


ACTIVATIONS = ("gelu", "gelu_tanh", "swiglu")


@dataclass
class MoEConfig:
    num_experts: int = 4
    top_k: int = 2
    # "all", "every-other" (1, 3, 5 ...), "none" or a list of layer indices. None: "all" for a
    # decoder trained from scratch, "none" for a pretrained LM (dense until upcycled).
    layers: Any = None
    shared_expert: bool = False
    # None: dropless. Otherwise, in training only, each expert takes at most
    # ceil(factor * real tokens * k / experts) assignments (models/moe.py, MoE.within_capacity).
    capacity_factor: float | None = None
    router_noise: bool = True
    aux_loss_coef: float = 0.01
    z_loss_coef: float = 0.001
    # Expert feed-forward: "gelu" (two matrices with biases, like the dense FFN), "gelu_tanh"
    # (the same with GPT-2's tanh approximation of GELU) or "swiglu" (gate, up and down
    # matrices without biases, like Llama and Mixtral experts).
    activation: str = "gelu"

    def __post_init__(self):
        _check(self.activation in ACTIVATIONS,
               f"moe.activation must be {', '.join(ACTIVATIONS)}, not {self.activation!r}")
        _check(1 <= self.top_k <= self.num_experts,
               f"moe.top_k {self.top_k} must be between 1 and moe.num_experts {self.num_experts}")
        _check(self.capacity_factor is None or self.capacity_factor > 0,
               "moe.capacity_factor must be positive or null (dropless)")
        _check(self.layers is None or isinstance(self.layers, list) or self.layers in ("all", "every-other", "none"),
               f"moe.layers must be all, every-other, none or a list of layer indices, not {self.layers!r}")

    def layer_indices(self, depth: int, pretrained: bool = False) -> list[int]:
        if self.layers is None:
            return [] if pretrained else list(range(depth))
        if self.layers == "all":
            return list(range(depth))
        if self.layers == "every-other":
            return list(range(1, depth, 2))
        if self.layers == "none":
            return []
        bad = [i for i in self.layers if not (isinstance(i, int) and 0 <= i < depth)]
        _check(not bad, f"moe.layers names layers {bad} outside 0..{depth - 1}")
        return sorted(set(self.layers))


@dataclass
class DecoderConfig:
    width: int = 128
    depth: int = 4
    heads: int = 4
    ffn_hidden: int | None = None  # None: 4 * width
    max_text_len: int = 48  # text tokens per sample, <bos> and <eos> included
    vocab_size: int = 0  # set from the tokenizer when a model is built
    dropout: float = 0.0
    tie_embeddings: bool = True
    moe: MoEConfig = field(default_factory=MoEConfig)
    # A pretrained causal LM (hub id or local folder; ``--set model.lm=hf:ID`` sets it). Its
    # sizes and tokenizer then come from its own files (models/pretrained.py fills them in).
    pretrained: str | None = None
    # LoRA adapters (peft) on the pretrained LM's attention and MLP projections; 0: none.
    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    hf_config: dict | None = None  # the pretrained LM's config.json as a dict (see VisionConfig)
    # With a pretrained LM, the id in input_ids that marks an image-token position. None: the
    # LM's vocabulary size, an id no text token has (an imported LLaVA keeps its own).
    image_token_id: int | None = None
    moe_layer_indices: list = field(init=False)

    def __post_init__(self):
        _check(self.lora_rank >= 0, "decoder.lora_rank must be >= 0")
        _check(self.lora_rank == 0 or self.pretrained is not None,
               "decoder.lora_rank needs a pretrained LM (model.lm=hf:ID); a model trained from scratch trains all weights")
        _check(self.width % self.heads == 0,
               f"decoder.width {self.width} is not divisible by decoder.heads {self.heads}")
        _check(self.max_text_len >= 3, "decoder.max_text_len must be at least 3 (<bos>, a token, <eos>)")
        if self.ffn_hidden is None:
            self.ffn_hidden = 4 * self.width
        self.moe_layer_indices = self.moe.layer_indices(self.depth, pretrained=self.pretrained is not None)


@dataclass
class TokenizerConfig:
    # "char" (one token per character, as the seed), "bpe", or "hf": the pretrained LM's own
    # tokenizer and chat template (set automatically with model.lm=hf:ID).
    kind: str = "char"
    vocab_size: int = 512  # bpe only: target vocabulary size

    def __post_init__(self):
        _check(self.kind in ("char", "bpe", "hf"), f"tokenizer.kind must be char, bpe or hf, not {self.kind!r}")


@dataclass
class ModelConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)

    def __post_init__(self):
        if self.decoder.pretrained is not None:
            self.tokenizer.kind = "hf"
        _check(self.tokenizer.kind != "hf" or self.decoder.pretrained is not None,
               "tokenizer.kind hf needs a pretrained LM (model.lm=hf:ID)")

    @property
    def uses_pretrained(self) -> bool:
        return self.vision.pretrained is not None or self.decoder.pretrained is not None


@dataclass
class DataConfig:
    val_fraction: float = 0.1  # of unique rows, when --val-data is not given
    on_bad_row: str = "error"  # "error" stops with file and row; "skip" skips and counts
    num_workers: int = 0
    augment: bool = False  # small random shifts; never applied to validation
    max_rows: int | None = None  # read at most this many rows (None: all)
    # true: every image decoded once, when the data is loaded, and kept in memory (N x C x S x S
    # bytes); false: only checked then, and decoded each time its batch is built, in the
    # DataLoader workers (data sets larger than memory: 558k LLaVA images at 224 px are 84 GB).
    preload: bool = True

    def __post_init__(self):
        _check(0 <= self.val_fraction < 1, "data.val_fraction must be in [0, 1)")
        _check(self.on_bad_row in ("error", "skip"), f"data.on_bad_row must be error or skip, not {self.on_bad_row!r}")
        _check(self.num_workers >= 0, "data.num_workers must be >= 0")


STAGES = ("full", "pretrain", "instruct", "moe")
PARAM_GROUPS = ("vision", "projector", "lm", "moe")
STAGE_TRAINABLE = {"full": PARAM_GROUPS, "pretrain": ("projector",), "instruct": ("projector", "lm", "moe"),
                   "moe": ("moe",)}


@dataclass
class TrainConfig:
    batch_size: int = 32
    grad_accum: int = 1
    max_steps: int = 1000
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    weight_decay: float = 0.05
    beta1: float = 0.9
    beta2: float = 0.98
    grad_clip: float = 1.0
    precision: str = "auto"  # "auto" (bf16 autocast on a GPU that has it, else fp32), "fp32", "bf16"
    eval_every: int = 200
    checkpoint_every: int = 500
    keep_checkpoints: int = 3  # snapshots kept under checkpoints/; resume falls back through them
    # Non-finite loss or gradient norm: the update is skipped; this many in a row stop the run.
    max_bad_steps: int = 10
    log_every: int = 10
    seed: int = 0
    device: str = "auto"  # "auto", "cpu", "cuda", "cuda:1" ...
    # torch.compile the training forward (inductor; needs a C++ compiler on CPU). It pays off on
    # long runs on a GPU; on a small CPU model the compile time dominates.
    compile: bool = False
    val_generate: int = 64  # validation rows captioned for exact match at each evaluation
    # Which parts learn. "full": everything (training from scratch); "pretrain": the projector
    # only; "instruct": projector and LM, loss on answers only; "moe": the MoE layers (experts
    # and routers), after upcycling a dense LM. ``trainable`` overrides the stage's choice with
    # a list of groups: vision, projector, lm (every LM weight outside MoE layers), moe.
    stage: str = "full"
    trainable: list | None = None
    # Learning rate per group; None: train.lr.
    lr_vision: float | None = None
    lr_projector: float | None = None
    lr_lm: float | None = None
    lr_moe: float | None = None
    # Pretrained weights that no stage has trained are named in pretrained.json and loaded from
    # their source, not copied into every checkpoint; true writes them into model.safetensors too.
    save_frozen: bool = False

    def __post_init__(self):
        _check(self.stage in STAGES, f"train.stage must be {', '.join(STAGES)}, not {self.stage!r}")
        if self.trainable is not None:
            _check(isinstance(self.trainable, list) and self.trainable
                   and all(group in PARAM_GROUPS for group in self.trainable),
                   f"train.trainable must be a non-empty list of {', '.join(PARAM_GROUPS)}, not {self.trainable!r}")
        for name in ("lr_vision", "lr_projector", "lr_lm", "lr_moe"):
            _check(getattr(self, name) is None or getattr(self, name) > 0, f"train.{name} must be positive")
        for name in ("batch_size", "grad_accum", "max_steps", "eval_every", "checkpoint_every", "keep_checkpoints",
                     "log_every"):
            _check(getattr(self, name) >= 1, f"train.{name} must be >= 1")
        _check(self.max_bad_steps >= 0, "train.max_bad_steps must be >= 0")
        _check(self.lr > 0, "train.lr must be positive")
        _check(self.precision in ("auto", "fp32", "bf16"), f"train.precision must be auto, fp32 or bf16")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict:
        return _input_fields(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, values: dict) -> "Config":
        return _build(cls, values, "")


def _input_fields(obj) -> dict:
    """The user-settable fields of a (nested) config dataclass; derived ones are left out."""
    out = {}
    for f in dataclasses.fields(obj):
        if not f.init:
            continue
        value = getattr(obj, f.name)
        out[f.name] = _input_fields(value) if dataclasses.is_dataclass(value) else copy.deepcopy(value)
    return out


def _build(cls, values: dict, prefix: str):
    if not isinstance(values, dict):
        raise ConfigError(f"config section {prefix.rstrip('.') or '(top)'} must be a mapping")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    if cls is ModelConfig and "lm" in values:  # model.lm is another name for model.decoder
        values = dict(values)
        lm = values.pop("lm")
        if isinstance(lm, str):
            lm = _pretrained_section(lm, f"{prefix}lm")
        values["decoder"] = _merge(values.get("decoder") or {}, lm) if isinstance(lm, dict) else lm
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(f"unknown config key {prefix}{unknown[0]} (known: {', '.join(sorted(fields))})")
    kwargs = {}
    for name, value in values.items():
        sub = _nested_type(cls, name)
        if sub in (VisionConfig, DecoderConfig) and isinstance(value, str):
            value = _pretrained_section(value, f"{prefix}{name}")
        kwargs[name] = (_build(sub, value, f"{prefix}{name}.") if sub
                        else _coerce(fields[name].type, value, f"{prefix}{name}"))
    try:
        return cls(**kwargs)
    except TypeError as err:
        raise ConfigError(f"bad value in config section {prefix.rstrip('.')}: {err}") from None


def _pretrained_section(value: str, key: str) -> dict:
    """``model.vision=hf:ID`` is short for ``model.vision.pretrained=ID`` (same for the LM)."""
    if not value.startswith("hf:") or not value[3:].strip():
        raise ConfigError(f"config key {key} takes a section or hf:<hub id or folder>, not {value!r}")
    return {"pretrained": value[3:].strip()}


def _coerce(annotation: str, value, key: str):
    """Turn YAML's loose scalars into the field's type ("3e-4" is a string to YAML 1.1)."""
    kinds = [part.strip() for part in str(annotation).split("|")]
    if value is None and "None" in kinds:
        return None
    if "bool" in kinds:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config key {key} must be true or false, not {value!r}")
    if "int" not in kinds and "float" not in kinds:
        return value
    try:
        number = None if isinstance(value, bool) else float(value)
    except (TypeError, ValueError):
        number = None
    if number is not None and "int" in kinds and number.is_integer() and not (
            "float" in kinds and isinstance(value, float)):
        return int(number)
    if number is not None and "float" in kinds:
        return number
    raise ConfigError(f"config key {key} must be {' or '.join(kinds)}, not {value!r}")


_NESTED = {
    (Config, "model"): ModelConfig, (Config, "data"): DataConfig, (Config, "train"): TrainConfig,
    (ModelConfig, "vision"): VisionConfig, (ModelConfig, "projector"): ProjectorConfig,
    (ModelConfig, "decoder"): DecoderConfig, (ModelConfig, "tokenizer"): TokenizerConfig,
    (DecoderConfig, "moe"): MoEConfig,
}


def _nested_type(cls, name):
    return _NESTED.get((cls, name))


# Shorter spellings for --set: "vision.width" means "model.vision.width".
_ALIASES = {"vision": "model.vision", "projector": "model.projector", "decoder": "model.decoder",
            "lm": "model.decoder", "tokenizer": "model.tokenizer", "moe": "model.decoder.moe"}


def _merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _nest(dotted_key: str, value) -> dict:
    head = dotted_key.split(".", 1)[0]
    if head in _ALIASES:
        dotted_key = _ALIASES[head] + dotted_key[len(head):]
    if dotted_key == "model.lm" or dotted_key.startswith("model.lm."):
        dotted_key = "model.decoder" + dotted_key[len("model.lm"):]
    out: dict = {}
    node = out
    parts = dotted_key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    if dotted_key in ("model.vision", "model.decoder") and isinstance(value, str):
        value = _pretrained_section(value, dotted_key)
    node[parts[-1]] = value
    return out


def parse_override(text: str) -> dict:
    """``"train.lr=3e-4"`` -> ``{"train": {"lr": 0.0003}}`` (values parsed as YAML)."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected key=value, e.g. train.lr=3e-4")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set {text!r}: bad key {key!r}")
    try:
        # "hf:ID" is a source, never YAML ("hf: x" would read as a mapping).
        value = raw.strip() if raw.strip().startswith("hf:") else yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return _nest(key, value)


PRESETS: dict[str, dict] = {
    # Sizes of the original notebook: 96 px, patch 16, ViT 512 x 3 blocks x 8 heads, decoder
    # 128 x 8 layers x 8 heads, 8 experts top-2, one CLS image token, character tokenizer.
    "seed": {
        "model": {
            "vision": {"image_size": 96, "patch_size": 16, "width": 512, "depth": 3, "heads": 8,
                       "image_tokens": "cls"},
            "decoder": {"width": 128, "depth": 8, "heads": 8, "max_text_len": 40,
                        "moe": {"num_experts": 8, "top_k": 2}},
            "tokenizer": {"kind": "char"},
        },
        "train": {"batch_size": 16, "max_steps": 300, "lr": 1e-3, "warmup_steps": 20,
                  "eval_every": 100, "checkpoint_every": 300},
    },
    # About 100M parameters (one GPU): 224 px, patch 16, every patch an image token, decoder
    # 512 x 8 layers with 8 experts of hidden 1024, top-2, byte-level BPE.
    "base": {
        "model": {
            "vision": {"image_size": 224, "patch_size": 16, "width": 384, "depth": 6, "heads": 6,
                       "image_tokens": "pooled", "pooled_tokens": 49},
            "decoder": {"width": 512, "depth": 8, "heads": 8, "ffn_hidden": 1024, "max_text_len": 128,
                        "moe": {"num_experts": 8, "top_k": 2}},
            "tokenizer": {"kind": "bpe", "vocab_size": 8192},
        },
        "train": {"batch_size": 32, "lr": 5e-4, "warmup_steps": 200, "max_steps": 20000,
                  "eval_every": 1000, "checkpoint_every": 1000},
    },
    # The staged recipe on pretrained parts (--stage pretrain|instruct|moe with model.vision=hf:ID
    # and model.lm=hf:ID): LLaVA-length conversations, no augmentation of the pretrained tower's
    # input. Learning rates are per stage: see the README walk-through.
    "llava": {
        "model": {"decoder": {"max_text_len": 1024}},
        "data": {"augment": False, "val_fraction": 0.01, "preload": False, "num_workers": 2},
        "train": {"batch_size": 16, "lr": 1e-3, "warmup_steps": 100, "max_steps": 5000, "eval_every": 500,
                  "checkpoint_every": 500, "val_generate": 16},
    },
    # Seconds per run: for tests and quick checks.
    "tiny": {
        "model": {
            "vision": {"image_size": 16, "patch_size": 8, "width": 32, "depth": 1, "heads": 2,
                       "image_tokens": "pooled", "pooled_tokens": 1},
            "decoder": {"width": 32, "depth": 2, "heads": 2, "max_text_len": 24,
                        "moe": {"num_experts": 4, "top_k": 2}},
        },
        "train": {"batch_size": 8, "max_steps": 20, "warmup_steps": 2, "eval_every": 10,
                  "checkpoint_every": 10, "log_every": 5},
    },
    # Learns well on small datasets of small images (a few thousand, up to 32 px): every 4 px
    # patch is an image token, small random shifts, ~13 minutes on 2 CPU cores.
    "default": {
        "data": {"augment": True},
        "train": {"max_steps": 2000, "lr": 1.5e-3, "eval_every": 500, "checkpoint_every": 500},
    },
}


def load_config(preset: str = "default", config_file: str | Path | None = None,
                overrides: list[str] = (), model: dict | None = None) -> Config:
    """Preset, then YAML file, then ``--set`` overrides. ``model``: a model section to start from
    instead of the preset's (a new stage continues the model of an earlier checkpoint)."""
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r} (choose from {', '.join(PRESETS)})")
    values = copy.deepcopy(PRESETS[preset])
    if model is not None:
        values["model"] = copy.deepcopy(model)
    if config_file is not None:
        path = Path(config_file)
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except OSError as err:
            raise ConfigError(f"{path}: cannot read config file: {err.strerror}") from None
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {str(err).splitlines()[0]}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: a config file must hold a mapping of sections")
        values = _merge(values, loaded)
    for text in overrides:
        values = _merge(values, parse_override(text))
    return Config.from_dict(values)
