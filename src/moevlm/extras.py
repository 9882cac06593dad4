"""Optional libraries and the pip extra that brings each (pyproject.toml's optional-dependencies).

``pip install moevlm`` trains, captions and evaluates scratch models; pretrained parts, Hugging Face
data, serving and MLflow tracking need an extra. A feature that finds its library missing says in
one line which extra to install, instead of a ModuleNotFoundError traceback.
"""

from __future__ import annotations

import importlib

from moevlm.errors import MoevlmError

# Top-level module name -> the extra that installs it.
EXTRA_OF = {
    "transformers": "hf", "peft": "hf", "datasets": "hf", "pyarrow": "hf", "huggingface_hub": "hf",
    "fastapi": "serve", "uvicorn": "serve", "starlette": "serve", "pydantic": "serve",
    "mlflow": "track",
    "sklearn": "demo",
    "bitsandbytes": "nf4",
}


class MissingExtraError(MoevlmError):
    """A feature whose optional library is not installed; names the extra that brings it."""

    def __init__(self, feature: str, module: str):
        extra = EXTRA_OF[module]
        super().__init__(f"{feature} needs the {extra} extra: pip install 'moevlm[{extra}]'")
        self.feature, self.module, self.extra = feature, module, extra


def missing_module(err: ModuleNotFoundError) -> str | None:
    """The optional library ``err`` is about (its top-level name), or None for any other module."""
    top = (err.name or "").partition(".")[0]
    return top if top in EXTRA_OF else None


def require(module: str, feature: str) -> None:
    """Import ``module`` (an optional library); MissingExtraError naming ``feature`` if it is absent."""
    try:
        importlib.import_module(module)
    except ModuleNotFoundError as err:
        if missing_module(err) != module.partition(".")[0]:
            raise  # the library is there but one of its own dependencies is not: a broken install
        raise MissingExtraError(feature, missing_module(err)) from None


def available(module: str) -> bool:
    """Whether ``module`` imports (without raising)."""
    try:
        require(module, module)
    except MissingExtraError:
        return False
    return True
