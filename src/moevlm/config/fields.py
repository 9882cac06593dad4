"""How a config field is declared: ``option(default, help)`` (user-settable, with the help text
``moevlm train --help-config`` prints) or ``derived()`` (computed in ``__post_init__``), and the two
helpers every section's ``__post_init__`` uses."""

from __future__ import annotations

from dataclasses import field
from typing import Any

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
