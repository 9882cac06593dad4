"""moevlm: Mixture-of-Experts vision-language models in PyTorch."""

from importlib.metadata import PackageNotFoundError, version

try:
    # The one source of the version is pyproject.toml; an installed package carries it in its metadata.
    __version__ = version("moevlm")
except PackageNotFoundError:  # a source tree on PYTHONPATH that was never installed
    __version__ = "0.0.0+unknown"
