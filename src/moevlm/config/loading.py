"""Loading a config: a preset, then a YAML file, then ``--set section.key=value`` overrides.

Every source is first put in canonical form by ``canonical``: the short names in ``ALIASES``
(``vision.`` for ``model.vision.``, ``lm`` for ``model.decoder`` ...) become full keys and
``model.vision=hf:ID`` becomes ``model.vision.pretrained=ID``. Only then are the sources merged
and validated, once, into a ``Config``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import yaml

from moevlm.config.presets import PRESETS
from moevlm.config.schema import Config
from moevlm.config.values import field_types, merge, section_type, set_dotted
from moevlm.errors import ConfigError

# The one table of other names: a dotted prefix on the left means the one on the right.
ALIASES = {
    "vision": "model.vision", "projector": "model.projector", "decoder": "model.decoder", "lm": "model.decoder",
    "tokenizer": "model.tokenizer", "moe": "model.decoder.moe", "model.lm": "model.decoder",
}
# Sections that take "hf:<hub id or folder>" as short for {"pretrained": ...}.
PRETRAINED_SECTIONS = ("model.vision", "model.decoder")


def canonical_key(dotted_key: str) -> str:
    """The full dotted key of ``dotted_key``, with the longest matching alias prefix replaced."""
    for alias in sorted(ALIASES, key=len, reverse=True):
        if dotted_key == alias or dotted_key.startswith(alias + "."):
            return ALIASES[alias] + dotted_key[len(alias):]
    return dotted_key


def _pretrained_section(value: str, key: str) -> dict:
    if not value.startswith("hf:") or not value[3:].strip():
        raise ConfigError(f"config key {key} takes a section or hf:<hub id or folder>, not {value!r}")
    return {"pretrained": value[3:].strip()}


def canonical(values: dict, prefix: str = "") -> dict:
    """A nested dict of config values with aliases resolved (see the module docstring)."""
    out: dict = {}
    for key, value in values.items():
        written = f"{prefix}{key}"
        full = canonical_key(written)
        if full in PRETRAINED_SECTIONS and isinstance(value, str):
            value = _pretrained_section(value, written)
        if isinstance(value, dict) and _is_section(full):
            value = canonical(value, full + ".")
        sections = full[len(prefix):] if full.startswith(prefix) else full
        nested: dict = {}
        set_dotted(nested, sections, value)
        out = merge(out, nested)
    return out


def _is_section(dotted_key: str) -> bool:
    """Whether ``dotted_key`` names a config section (as opposed to a dict-valued field like hf_config)."""
    cls: Any = Config
    for part in dotted_key.split("."):
        cls = section_type(field_types(cls).get(part)) if cls is not None and part in field_types(cls) else None
        if cls is None:
            return False
    return True


def parse_override(text: str) -> dict:
    """``"train.lr=3e-4"`` -> ``{"train": {"lr": 0.0003}}`` (values parsed as YAML)."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected key=value, e.g. train.lr=3e-4")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set {text!r}: bad key {key!r}")
    raw = raw.strip()
    try:
        # "hf:ID" is a source, never YAML ("hf: x" would read as a mapping).
        value = raw if raw.startswith("hf:") else yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError:
        value = raw
    nested: dict = {}
    set_dotted(nested, key, value)
    return canonical(nested)


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    try:
        loaded = yaml.safe_load(path.read_text()) or {}
    except OSError as err:
        raise ConfigError(f"{path}: cannot read config file: {err.strerror}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: a config file must hold a mapping of sections")
    return canonical(loaded)


def config_values(preset: str = "default", config_file: str | Path | None = None, overrides: list[str] = (),
                  model: dict | None = None) -> dict:
    """The merged, canonical values of ``load_config`` before validation."""
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r} (choose from {', '.join(PRESETS)})")
    values = canonical(PRESETS[preset])
    if model is not None:
        values["model"] = canonical(model, "model.")
    if config_file is not None:
        values = merge(values, read_yaml(config_file))
    for text in overrides:
        values = merge(values, parse_override(text))
    return values


def load_config(preset: str = "default", config_file: str | Path | None = None, overrides: list[str] = (),
                model: dict | None = None) -> Config:
    """Preset, then YAML file, then ``--set`` overrides. ``model``: a model section to start from
    instead of the preset's (a new stage continues the model of an earlier checkpoint)."""
    return Config.from_dict(config_values(preset, config_file, overrides, model))


def describe_fields(cls: type = Config, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted key, default, help) of every user-settable field, for ``moevlm train --help-config``."""
    rows = []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        section = section_type(field_types(cls)[f.name])
        if section is not None:
            rows += describe_fields(section, f"{prefix}{f.name}.")
            continue
        default = "null" if f.default is None else str(f.default).lower() if isinstance(f.default, bool) \
            else str(f.default)
        rows.append((f"{prefix}{f.name}", default, f.metadata.get("help", "")))
    return rows

