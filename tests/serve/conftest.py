"""A tiny trained checkpoint for the serve tests (helpers: serve_helpers.py)."""

import pytest

from shapes import train_tiny


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    return train_tiny(tmp_path_factory.mktemp("serve"), "train.max_steps=40", "train.lr=3e-3")
