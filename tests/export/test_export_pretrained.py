"""``moevlm export`` of models on pretrained parts: an upcycled Llama as LLaVA-Mixtral (every layer MoE)
or LLaVA-Qwen2-MoE (some dense), an upcycled Qwen3 as LLaVA-Qwen3-MoE, and a dense LM as itself;
each matched against transformers in fp32."""

from __future__ import annotations

import json

import pytest
from export_helpers import assert_export_matches, pretrained_checkpoint
from pretrained_fixtures import llama_tokenizer

from moevlm.export.hf import export_hf


@pytest.fixture(scope="module")
def tiny_qwen3(tmp_path_factory):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    folder = tmp_path_factory.mktemp("qwen3")
    tokenizer = llama_tokenizer()
    config = Qwen3Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=256,
                         tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    Qwen3ForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.mark.parametrize("layers, target", [("all", "mixtral"), ([1], "qwen2_moe")])
def test_upcycled_llama_exports_as_a_moe_llava_that_transformers_computes_the_same(
        pretrained_parts, tmp_path, layers, target):
    checkpoint = pretrained_checkpoint(tmp_path / "ckpt", pretrained_parts["siglip"], pretrained_parts["llama"],
                                       layers=layers)
    result = export_hf(checkpoint, tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert result.text_model == config["text_config"]["model_type"] == target
    assert config["text_config"]["architectures"] == [{"mixtral": "MixtralForCausalLM",
                                                       "qwen2_moe": "Qwen2MoeForCausalLM"}[target]]
    assert config["vision_config"]["vision_use_head"] is False
    compared = assert_export_matches(checkpoint, tmp_path / "hf", ("", "What is it?"))
    assert any(compared["tokens"])


def test_upcycled_qwen3_exports_as_qwen3_moe(pretrained_parts, tiny_qwen3, tmp_path):
    checkpoint = pretrained_checkpoint(tmp_path / "ckpt", pretrained_parts["clip"], tiny_qwen3, layers=[0])
    assert export_hf(checkpoint, tmp_path / "hf").text_model == "qwen3_moe"
    assert_export_matches(checkpoint, tmp_path / "hf", ("Describe it.", "What is it?"))
