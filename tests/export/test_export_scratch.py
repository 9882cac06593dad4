"""``moevlm export`` of models trained from scratch with decoder.arch=llama and vision.arch=siglip:
LLaVA-Mixtral when every layer is MoE, LLaVA-Qwen2-MoE with dense layers or a shared expert;
matched against transformers in fp32 (processor, image features, logits, greedy generation)."""

from __future__ import annotations

import json

import pytest
from export_helpers import assert_export_matches, scratch_checkpoint

from moevlm.export.hf import export_hf


@pytest.mark.parametrize("overrides, target", [
    (["decoder.kv_heads=1"], "mixtral"),
    (["moe.layers=every-other", "moe.shared_expert=true", "moe.top_k=1"], "qwen2_moe"),
    (["moe.layers=[0]"], "qwen2_moe"),
])
def test_a_scratch_llama_siglip_model_exports_and_transformers_computes_the_same(tmp_path, overrides, target):
    checkpoint = scratch_checkpoint(tmp_path / "ckpt", overrides)
    assert export_hf(checkpoint, tmp_path / "hf").text_model == target
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["vision_feature_layer"] == -1 and config["vision_feature_select_strategy"] == "full"
    assert_export_matches(checkpoint, tmp_path / "hf", ("", "What is it?"))


def test_a_bpe_tokenizer_exports_too(tmp_path):
    checkpoint = scratch_checkpoint(tmp_path / "ckpt", [], kind="bpe")
    export_hf(checkpoint, tmp_path / "hf")
    assert_export_matches(checkpoint, tmp_path / "hf", ("Describe it.", "What is it?"))
