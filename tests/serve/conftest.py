"""A tiny trained checkpoint for the serve tests (helpers: serve_helpers.py)."""

import pytest

from moevlm.cli import main
from shapes import write_shapes_csv


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    data = write_shapes_csv(root / "shapes.csv")
    assert main(["train", "--data", str(data), "--preset", "tiny", "--out", str(root / "run"), "--no-tracking",
                 "--set", "train.max_steps=40", "--set", "train.lr=3e-3"]) == 0
    return root / "run"
