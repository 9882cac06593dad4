"""``moevlm export`` of models on pretrained parts: an upcycled Llama as LLaVA-Mixtral (every layer MoE)
or LLaVA-Qwen2-MoE (some dense), an upcycled Qwen3 as LLaVA-Qwen3-MoE, and a dense LM as itself;
each matched against transformers in fp32."""

from __future__ import annotations

import json

import pytest
from export_helpers import assert_export_matches, pretrained_checkpoint, sample_images

from moevlm.export.hf import export_hf
from pretrained_fixtures import llama_tokenizer


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


def test_an_export_reads_back_into_moevlm_and_exports_again_to_the_same_files(pretrained_parts, tmp_path):
    """export -> import -> export is a fixed point, and moevlm captions the export as the checkpoint."""
    from moevlm.generate import caption_files

    checkpoint = pretrained_checkpoint(tmp_path / "ckpt", pretrained_parts["siglip"], pretrained_parts["llama"])
    export_hf(checkpoint, tmp_path / "one")
    export_hf(tmp_path / "one", tmp_path / "two")
    files = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "two").iterdir())
    for name in files:  # the card and the weights included
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name
    image = tmp_path / "image.png"
    sample_images(40)[0].save(image)
    for prompt in ("", "What is it?"):
        ours = list(caption_files(checkpoint, [image], prompt=prompt, device="cpu", max_new_tokens=8))
        exported = list(caption_files(tmp_path / "one", [image], prompt=prompt, device="cpu", max_new_tokens=8))
        assert exported == ours


def test_a_dense_lm_with_lora_exports_merged_as_its_own_architecture(pretrained_parts, tmp_path):
    checkpoint = pretrained_checkpoint(tmp_path / "ckpt", pretrained_parts["clip"], pretrained_parts["llama_tied"],
                                       layers=None, lora_rank=2)
    assert export_hf(checkpoint, tmp_path / "hf").text_model == "llama"
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["text_config"]["architectures"] == ["LlamaForCausalLM"]
    assert config["vision_feature_select_strategy"] == "default"  # CLIP's CLS dropped, as moevlm does
    assert_export_matches(checkpoint, tmp_path / "hf", ("", "What is it?"))
