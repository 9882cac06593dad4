"""resolve_pretrained, build_model and PretrainedVLM: sizes, user errors, checkpoint-style
rebuilds, cached generation and MoE token kinds (tiny offline models, CPU)."""

import json
import shutil

import pytest
import torch

from moevlm.config import Config, load_config
from moevlm.errors import MoevlmError
from moevlm.models.factory import build_model
from moevlm.models.hf_config import resolve_pretrained
from moevlm.models.hf_lm import PretrainedVLM
from moevlm.models.hf_vision import HFVisionTower
from moevlm.models.vit import ViT
from moevlm.models.vlm import VLM
from pretrained_fixtures import NUM_PATCHES

pytestmark = pytest.mark.usefixtures("offline")


def resolved(*overrides):
    return resolve_pretrained(load_config("tiny", overrides=list(overrides)).model)


def test_resolve_fills_the_sizes_from_the_sources(pretrained_parts):
    cfg = resolved(f"model.vision=hf:{pretrained_parts['clip']}", f"model.lm=hf:{pretrained_parts['llama']}")
    v, d = cfg.vision, cfg.decoder
    assert (v.image_size, v.patch_size, v.width, v.depth, v.heads, v.channels) == (32, 8, 32, 3, 2, 3)
    assert (v.image_tokens, v.num_image_tokens) == ("patches", NUM_PATCHES)
    assert v.hf_config["model_type"] == "clip_vision_model"
    assert (d.width, d.depth, d.heads, d.kv_heads, d.ffn_hidden, d.vocab_size) == (32, 2, 4, 2, 64, 260)
    assert (d.image_token_id, d.max_text_len, d.moe_layer_indices, cfg.tokenizer.kind) == (260, 24, [], "hf")
    assert d.hf_config["model_type"] == "llama"
    # decoder.heads=4: the LM's 2 heads replace it, and its key/value heads the kv_heads derived from it.
    gpt2 = resolved(f"model.lm=hf:{pretrained_parts['gpt2']}", "vision.keep_cls=true", "decoder.heads=4").decoder
    assert (gpt2.width, gpt2.depth, gpt2.heads, gpt2.kv_heads, gpt2.ffn_hidden, gpt2.vocab_size,
            gpt2.tie_embeddings) == (32, 2, 2, 2, 128, 257, True)  # GPT-2: n_inner None means 4 x width
    siglip = resolved(f"model.vision=hf:{pretrained_parts['siglip']}").vision
    assert (siglip.num_image_tokens, siglip.hf_config["model_type"]) == (NUM_PATCHES, "siglip_vision_model")
    assert resolved(f"model.vision=hf:{pretrained_parts['clip']}", "vision.keep_cls=true").vision.num_image_tokens == 17


def test_a_llava_source_gives_its_parts_and_its_image_token(pretrained_parts):
    cfg = resolved(f"model.vision=hf:{pretrained_parts['llava']}", f"model.lm=hf:{pretrained_parts['llava']}")
    assert (cfg.vision.hf_config["model_type"], cfg.decoder.hf_config["model_type"]) == ("clip_vision_model", "llama")
    assert cfg.decoder.image_token_id == 3


def test_a_resolved_config_rebuilds_without_the_source(pretrained_parts, tmp_path):
    """What a checkpoint does: config.json holds hf_config; the architecture comes back offline."""
    llama = shutil.copytree(pretrained_parts["llama"], tmp_path / "llama")
    cfg = resolved(f"model.vision=hf:{pretrained_parts['clip']}", f"model.lm=hf:{llama}", "moe.layers=[1]")
    model = build_model(cfg).eval()
    saved = json.loads(Config(model=cfg).to_json())["model"]
    shutil.rmtree(llama)
    again = resolve_pretrained(Config.from_dict({"model": saved}).model)
    assert again == cfg
    rebuilt = build_model(again, load_weights=False).eval()
    assert isinstance(rebuilt, PretrainedVLM) and len(rebuilt.moe_layers) == 1
    assert set(rebuilt.state_dict()) == set(model.state_dict())
    rebuilt.load_state_dict(model.state_dict())
    ids = torch.tensor([[1] + [260] * NUM_PATCHES + [70, 80]])
    images = torch.rand(1, 3, 32, 32) * 2 - 1
    torch.testing.assert_close(rebuilt(images, ids).logits, model(images, ids).logits)


def test_vlm_with_a_pretrained_tower(pretrained_parts):
    cfg = resolved(f"model.vision=hf:{pretrained_parts['siglip']}", "decoder.vocab_size=23")
    model = build_model(cfg)
    assert type(model) is VLM and isinstance(model.vision, HFVisionTower)
    assert (model.images_in_text, model.image_token_id, model.num_image_tokens) == (False, None, NUM_PATCHES)
    assert len(model.moe_layers) == cfg.decoder.depth  # scratch decoder: MoE everywhere by default
    out = model(torch.rand(2, 3, 32, 32) * 2 - 1, torch.randint(0, 23, (2, 5)))
    assert out.logits.shape == (2, 5, 23)
    plain = VLM(cfg)  # without build_model: the same architecture, random tower weights
    assert isinstance(plain.vision, HFVisionTower) and set(plain.state_dict()) == set(model.state_dict())
    assert plain.vision.pixel_mean.tolist() == [0.5, 0.5, 0.5]


def test_pretrained_lm_with_a_scratch_vit(pretrained_parts):
    model = build_model(resolved(f"model.lm=hf:{pretrained_parts['gpt2']}"))  # tiny preset: 1 pooled image token
    assert isinstance(model.vision, ViT) and model.num_image_tokens == 1 and model.images_in_text
    ids = torch.tensor([[model.image_token_id, 10, 11, 12]])
    assert model(torch.zeros(1, 3, 16, 16), ids).logits.shape == (1, 4, 257)


def error_of(*overrides) -> str:
    with pytest.raises(MoevlmError) as info:
        resolved(*overrides)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_user_errors_are_one_line_and_name_the_source(pretrained_parts, tmp_path):
    message = error_of(f"model.lm=hf:{tmp_path / 'nowhere'}")
    assert message == f"model.lm.pretrained {str(tmp_path / 'nowhere')!r}: no such folder"
    message = error_of("model.vision=hf:nobody/no-such-model")
    assert message.startswith("model.vision.pretrained 'nobody/no-such-model': not found")
    (tmp_path / "empty").mkdir()
    assert "the folder has no config.json" in error_of(f"model.lm=hf:{tmp_path / 'empty'}")
    assert error_of(f"model.lm=hf:{pretrained_parts['clip']}") == (
        f"model.lm.pretrained {pretrained_parts['clip']!r}: a clip_vision_model model, not a causal LM "
        "(AutoModelForCausalLM cannot load it)")
    assert error_of(f"model.vision=hf:{pretrained_parts['llama']}") == (
        f"model.vision.pretrained {pretrained_parts['llama']!r}: a llama model, not a CLIP or SigLIP vision model")
    assert error_of(f"model.vision=hf:{pretrained_parts['siglip']}", "vision.keep_cls=true") == (
        f"model.vision.pretrained {pretrained_parts['siglip']!r}: vision.keep_cls needs a CLIP tower; "
        "a siglip_vision_model has no CLS token")
    assert error_of(f"model.vision=hf:{pretrained_parts['clip']}", "vision.feature_layer=4") == (
        f"model.vision.pretrained {pretrained_parts['clip']!r}: vision.feature_layer 4 is out of range: "
        "the tower has 4 hidden states (-4..3)")


def prompts_batch(model, prompts):
    """Left-padded ids / mask for prompts given as text ids; each gets <s> + image ids in front."""
    rows = [[1] + [model.image_token_id] * model.num_image_tokens + p for p in prompts]
    width = max(map(len, rows))
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[False] * (width - len(r)) + [True] * len(r) for r in rows])
    return ids, mask


def decode(model, images, ids, mask, steps=5):
    """Greedy cached decoding; checks every step against recomputing without a cache and
    returns the logits of every step (steps, B, V)."""
    cache = model.new_cache(ids.size(0), ids.size(1) + steps)
    out = []
    with torch.no_grad():
        logits, key_mask = model.prefill(images, ids, mask, cache)
        for _ in range(steps):
            full, _ = model.prefill(images, ids, mask)  # no cache: the whole sequence again
            torch.testing.assert_close(logits, full, rtol=1e-4, atol=1e-5)
            out.append(logits)
            token = logits.argmax(-1)
            ids = torch.cat([ids, token[:, None]], 1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
            key_mask = torch.cat([key_mask, torch.ones_like(key_mask[:, :1])], 1)
            logits = model.step(token, key_mask, cache)
    return torch.stack(out)


@pytest.mark.parametrize("lm,moe,capacity", [("llama", "none", "null"), ("gpt2", "all", "null"), ("gpt2", "all", 1.0)])
def test_cached_decoding_equals_recomputing_and_rows_decode_as_alone(pretrained_parts, lm, moe, capacity):
    model = build_model(resolved(f"model.vision=hf:{pretrained_parts['clip']}", f"model.lm=hf:{pretrained_parts[lm]}",
                                 f"moe.layers={moe}", f"moe.capacity_factor={capacity}")).eval()
    assert len(model.moe_layers) == (2 if moe == "all" else 0)
    with torch.no_grad():  # upcycled experts are identical copies: routing would change nothing
        for layer in model.moe_layers:
            for w in (layer.w1_EDF, layer.w2_EHD):
                w.add_(torch.randn_like(w) * w.std())
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    prompts = [[40, 41, 42, 43, 44], [50], [60, 61]]
    together = decode(model, images, *prompts_batch(model, prompts))
    for row, prompt in enumerate(prompts):  # left padding changes nothing for a row
        alone = decode(model, images[row:row + 1], *prompts_batch(model, [prompt]))
        torch.testing.assert_close(together[:, row:row + 1], alone, rtol=1e-4, atol=1e-5)


def test_moe_layers_see_which_tokens_are_image_text_or_padding(pretrained_parts):
    cfg = resolved(f"model.vision=hf:{pretrained_parts['clip']}", f"model.lm=hf:{pretrained_parts['llama']}",
                   "moe.layers=[0, 1]", "moe.num_experts=4", "moe.top_k=2")
    model = build_model(cfg).eval()
    assert cfg.decoder.moe.activation == "swiglu"  # install_moe_layers reads it off Llama's MLP
    assert [type(layer).__name__ for layer in model.moe_layers] == ["MoE", "MoE"]
    ids, mask = prompts_batch(model, [[40, 41, 42], [50]])
    model(torch.zeros(2, 3, 32, 32), ids, mask)
    load = model.expert_load()  # (layers, [image, text], experts)
    assert load.shape == (2, 2, 4)
    assert load[:, 0].sum(-1).tolist() == [2 * NUM_PATCHES * 2] * 2  # 2 rows x 16 image tokens x top-2
    assert load[:, 1].sum(-1).tolist() == [(4 + 2) * 2] * 2  # text: <s> + 3 and <s> + 1; padding not counted
    assert model.token_kinds.for_positions(torch.Size([3, 1])) is None  # handed over for that call only
    model.train()
    assert set(model(torch.zeros(2, 3, 32, 32), ids, mask).aux) == {"balance", "z"}


def test_generate_runs_a_pretrained_vlm_with_and_without_the_cache(pretrained_parts):
    from moevlm.generate import generate

    model = build_model(resolved(f"model.vision=hf:{pretrained_parts['clip']}",
                                 f"model.lm=hf:{pretrained_parts['llama']}", "decoder.max_text_len=40"))
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(2)) * 2 - 1
    image_ids = [model.image_token_id] * model.num_image_tokens
    prompts = [[1] + image_ids + [40, 41, 42], [1] + image_ids]
    cached = generate(model, images, prompts, eos_id=2, pad_id=0, max_new_tokens=6)
    assert cached == generate(model, images, prompts, eos_id=2, pad_id=0, max_new_tokens=6, use_cache=False)
    assert [len(row) for row in cached] == [6, 6]  # with these weights no row reaches </s>
