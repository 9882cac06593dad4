"""Plain dicts <-> config dataclasses, guided by the classes' own type annotations.

``from_dict`` walks a nested dict against a dataclass: a field annotated with another dataclass is a
section (built recursively), any other field is a value coerced to its annotated type (YAML reads
"3e-4" as a string, and ``--set train.lr=1`` as an int). Unknown keys and values of the wrong type
raise a ConfigError naming the dotted key. Nothing here knows the schema: it works for any
dataclass, which is how a new section needs no table entry.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import types
import typing
from typing import Any

from moevlm.errors import ConfigError


@functools.cache
def field_types(cls: type) -> dict[str, Any]:
    """The resolved annotation of each user-settable field of a dataclass."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}


def section_type(annotation: Any) -> type | None:
    """The dataclass a field holds, or None for a plain value."""
    return annotation if isinstance(annotation, type) and dataclasses.is_dataclass(annotation) else None


def to_dict(obj) -> dict:
    """The user-settable fields of a (nested) config dataclass; derived ones are left out."""
    out = {}
    for name in field_types(type(obj)):
        value = getattr(obj, name)
        out[name] = to_dict(value) if dataclasses.is_dataclass(value) else copy.deepcopy(value)
    return out


def from_dict(cls: type, values: Any, prefix: str = ""):
    """Build ``cls`` from a nested dict; ConfigError naming the key for anything that does not fit."""
    if not isinstance(values, dict):
        raise ConfigError(f"config section {prefix.rstrip('.') or '(top)'} must be a mapping")
    types_ = field_types(cls)
    unknown = sorted(set(values) - set(types_))
    if unknown:
        raise ConfigError(f"unknown config key {prefix}{unknown[0]} (known: {', '.join(sorted(types_))})")
    kwargs = {}
    for name, value in values.items():
        section = section_type(types_[name])
        kwargs[name] = (from_dict(section, value, f"{prefix}{name}.") if section
                        else coerce(types_[name], value, f"{prefix}{name}"))
    try:
        return cls(**kwargs)
    except TypeError as err:
        raise ConfigError(f"bad value in config section {prefix.rstrip('.')}: {err}") from None


def _scalar_kinds(annotation: Any) -> set[type]:
    """{int, float, bool, str, NoneType ...} of an annotation such as ``int | None``."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return {arg for arg in typing.get_args(annotation) if isinstance(arg, type)}
    return {annotation} if isinstance(annotation, type) else set()


def coerce(annotation: Any, value: Any, key: str):
    """Turn YAML's loose scalars into the field's type; leave other kinds of field as they are."""
    kinds = _scalar_kinds(annotation)
    if value is None and type(None) in kinds:
        return None
    if bool in kinds:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config key {key} must be true or false, not {value!r}")
    if int not in kinds and float not in kinds:
        return value
    try:
        number = None if isinstance(value, bool) else float(value)
    except (TypeError, ValueError):
        number = None
    written_as_float = float in kinds and isinstance(value, float)
    if number is not None and int in kinds and number.is_integer() and not written_as_float:
        return int(number)
    if number is not None and float in kinds:
        return number
    names = " or ".join(kind.__name__ for kind in (int, float) if kind in kinds)
    raise ConfigError(f"config key {key} must be {names}, not {value!r}")


def merge(base: dict, extra: dict) -> dict:
    """``extra`` over ``base``, sections merged key by key (neither is changed)."""
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def flat_keys(values: dict, prefix: str = "") -> dict[str, Any]:
    """``{"train": {"lr": 1}}`` -> ``{"train.lr": 1}``; a pretrained part's ``hf_config`` stays one value."""
    out = {}
    for key, value in values.items():
        if isinstance(value, dict) and key != "hf_config":
            out.update(flat_keys(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def set_dotted(values: dict, dotted_key: str, value: Any) -> None:
    """``values["a"]["b"]["c"] = value`` for ``"a.b.c"``, creating sections on the way."""
    *sections, leaf = dotted_key.split(".")
    node = values
    for part in sections:
        node = node.setdefault(part, {})
    node[leaf] = value
