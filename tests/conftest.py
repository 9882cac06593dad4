import pytest
import torch

from moevlm.config import load_config
from shapes import write_shapes_csv


@pytest.fixture
def tiny_config():
    """The tiny preset with a small fixed vocabulary, for model-level tests."""
    return load_config("tiny", overrides=["decoder.vocab_size=23"])


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def shapes_csv(tmp_path):
    return write_shapes_csv(tmp_path / "shapes.csv")


@pytest.fixture(scope="session")
def pretrained_parts(tmp_path_factory):
    """Tiny random transformers models saved like hub folders (tests/pretrained_fixtures.py),
    built once per session. Tests that change one copy it first."""
    from pretrained_fixtures import tiny_clip_vision, tiny_gpt2, tiny_llama, tiny_llava, tiny_siglip_vision

    root = tmp_path_factory.mktemp("pretrained")
    return {"clip": tiny_clip_vision(root / "clip"), "siglip": tiny_siglip_vision(root / "siglip"),
            "llama": tiny_llama(root / "llama"), "gpt2": tiny_gpt2(root / "gpt2"),
            "llama_tied": tiny_llama(root / "llama_tied", tie_word_embeddings=True),
            "llava": tiny_llava(root / "llava"), "llava_full": tiny_llava(root / "llava_full", strategy="full")}


@pytest.fixture
def offline(monkeypatch):
    """HF_HUB_OFFLINE=1, also for huggingface_hub, which read the variable when first imported."""
    import huggingface_hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
