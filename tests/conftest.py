import pytest
import torch

from moevlm.config import load_config
from shapes import write_shapes_csv


@pytest.fixture
def tiny_config():
    """The tiny preset with a small fixed vocabulary, for model-level tests."""
    config = load_config("tiny")
    config.model.decoder.vocab_size = 23
    return config


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def shapes_csv(tmp_path):
    return write_shapes_csv(tmp_path / "shapes.csv")
