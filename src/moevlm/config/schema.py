"""The configuration schema: typed sections, their validation and their derived values.

Every user-settable field is declared with ``option(default, help)``: the help text is what
``moevlm train --help-config`` prints, so the field's documentation lives in one place. Derived
values (``ffn_hidden``, ``num_image_tokens`` ...) are computed in ``__post_init__``, after every
override, so changing ``decoder.width`` also moves everything derived from it.

Configs are frozen once validated: code that needs another value builds a new config with
``Config.updated({"section.key": value})``, which goes through the same validation
(``config/values.py`` turns dicts into these classes).

The sections live by what they describe: ``config/model.py`` (vision, projector, decoder, MoE,
tokenizer), ``config/training.py`` (data, train, dist); ``config/fields.py`` declares fields. This
module holds the root, ``Config``, and names every section, so ``moevlm.config.schema.X`` still finds it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from moevlm.config.fields import derived, option
from moevlm.config.model import (
    ACTIVATIONS,
    DECODER_ARCHS,
    IMAGE_TOKENS,
    MOE_LAYER_CHOICES,
    TOKENIZER_KINDS,
    VISION_ARCHS,
    DecoderConfig,
    ModelConfig,
    MoEConfig,
    ProjectorConfig,
    TokenizerConfig,
    VisionConfig,
    moe_layer_indices,
)
from moevlm.config.training import (
    ACTIVATION_CHECKPOINTING,
    BACKENDS,
    MIXED_PRECISIONS,
    PARAM_GROUPS,
    PRECISIONS,
    SELECT_METRICS,
    STAGES,
    STRATEGIES,
    DataConfig,
    DistConfig,
    TrainConfig,
)
from moevlm.config.values import from_dict, set_dotted, to_dict

__all__ = [
    "ACTIVATIONS", "ACTIVATION_CHECKPOINTING", "BACKENDS", "DECODER_ARCHS", "IMAGE_TOKENS", "MIXED_PRECISIONS",
    "MOE_LAYER_CHOICES", "PARAM_GROUPS", "PRECISIONS", "SELECT_METRICS", "STAGES", "STRATEGIES", "TOKENIZER_KINDS",
    "VISION_ARCHS", "Config", "DataConfig", "DecoderConfig", "DistConfig", "ModelConfig", "MoEConfig",
    "ProjectorConfig", "TokenizerConfig", "TrainConfig", "VisionConfig", "derived", "moe_layer_indices", "option",
]


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
