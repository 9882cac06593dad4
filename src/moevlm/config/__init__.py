"""Configuration: the schema (``schema.py``, the root ``Config``, with its sections in ``model.py`` and
``training.py``), presets (``presets.py``) and loading from presets, YAML files and ``--set`` overrides
(``loading.py``); ``values.py`` turns dicts into the schema's dataclasses."""

from moevlm.config.loading import ALIASES, describe_fields, load_config, parse_override
from moevlm.config.presets import PRESETS
from moevlm.config.schema import (
                                  ACTIVATIONS,
                                  PARAM_GROUPS,
                                  STAGES,
                                  Config,
                                  DataConfig,
                                  DecoderConfig,
                                  DistConfig,
                                  ModelConfig,
                                  MoEConfig,
                                  ProjectorConfig,
                                  TokenizerConfig,
                                  TrainConfig,
                                  VisionConfig,
                                  moe_layer_indices,
)
from moevlm.config.values import flat_keys

__all__ = ["ACTIVATIONS", "ALIASES", "PARAM_GROUPS", "PRESETS", "STAGES", "Config", "DataConfig", "DecoderConfig",
           "DistConfig", "ModelConfig", "MoEConfig", "ProjectorConfig", "TokenizerConfig", "TrainConfig",
           "VisionConfig", "describe_fields", "flat_keys", "load_config", "moe_layer_indices", "parse_override"]
