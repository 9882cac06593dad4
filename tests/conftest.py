import pytest
import torch

from moevlm.config import load_config


@pytest.fixture
def tiny_config():
    """The tiny preset with a small fixed vocabulary, for model-level tests."""
    config = load_config("tiny")
    config.model.decoder.vocab_size = 23
    return config


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
