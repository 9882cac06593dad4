"""moevlm: Mixture-of-Experts vision-language models in PyTorch."""

__version__ = "0.1.0"
