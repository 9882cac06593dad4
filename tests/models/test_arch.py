"""decoder.arch=llama and vision.arch=siglip: the parts compute what transformers' own do, the
model generates the same with and without its cache, left padding stays invisible, and the
parameters carry the names the export maps."""

import pytest
import torch
from transformers import LlamaConfig, MixtralConfig, MixtralForCausalLM, SiglipVisionConfig, SiglipVisionModel
from transformers.models.llama.modeling_llama import LlamaRMSNorm, LlamaRotaryEmbedding, apply_rotary_pos_emb
from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter

from moevlm.config import Config, MoEConfig, load_config
from moevlm.errors import ConfigError
from moevlm.generate import generate
from moevlm.models.attention import SelfAttention
from moevlm.models.moe import MoE
from moevlm.models.norm import RMSNorm
from moevlm.models.rope import apply_rope, rope_cos_sin
from moevlm.models.vit import ViT
from moevlm.models.vlm import VLM

MODERN = ["decoder.arch=llama", "vision.arch=siglip", "vision.image_tokens=patches", "decoder.vocab_size=23"]


def modern_config(*overrides):
    return load_config("tiny", overrides=[*MODERN, "vision.patch_size=8", "decoder.heads=4", "decoder.kv_heads=2",
                                          *overrides])


def scrambled(model):
    """Weights far from the init, so greedy decoding varies per step and routing matters."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.3)
    return model.eval()


def test_rope_matches_transformers_llama():
    hf = LlamaRotaryEmbedding(LlamaConfig(hidden_size=64, num_attention_heads=4, rope_theta=500.0))
    positions = torch.tensor([[0, 0, 0, 1, 2, 3, 40], [0, 1, 2, 3, 4, 5, 6]])  # a left-padded row first
    q, k = torch.randn(2, 4, 7, 16), torch.randn(2, 2, 7, 16)
    hf_cos, hf_sin = hf(q, positions)
    cos, sin = rope_cos_sin(positions, 16, 500.0, q.dtype)
    torch.testing.assert_close(cos, hf_cos, atol=1e-6, rtol=0)
    torch.testing.assert_close(sin, hf_sin, atol=1e-6, rtol=0)
    hf_q, _ = apply_rotary_pos_emb(q, q, hf_cos, hf_sin)
    _, hf_k = apply_rotary_pos_emb(k, k, hf_cos, hf_sin)
    torch.testing.assert_close(apply_rope(q, cos, sin), hf_q, atol=1e-6, rtol=0)
    torch.testing.assert_close(apply_rope(k, cos, sin), hf_k, atol=1e-6, rtol=0)
    assert not torch.allclose(apply_rope(q, cos, sin), q)  # position 0 alone would not rotate


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rmsnorm_matches_transformers_llama(dtype):
    ours, hf = RMSNorm(32), LlamaRMSNorm(32, eps=1e-5)
    with torch.no_grad():
        ours.weight.copy_(torch.randn(32))
        hf.weight.copy_(ours.weight)
    x = (torch.randn(3, 5, 32) * 4 + 1).to(dtype)
    ours, hf = ours.to(dtype), hf.to(dtype)
    torch.testing.assert_close(ours(x), hf(x), atol=1e-6, rtol=0)


def test_grouped_query_attention_equals_attention_with_repeated_kv_heads():
    """kv head j serves query heads j*g .. j*g+g-1 (transformers' repeat_kv), rows [q | k | v]."""
    heads, kv_heads, hs = 4, 2, 8
    grouped = SelfAttention(heads * hs, heads, kv_heads=kv_heads, bias=False)
    full = SelfAttention(heads * hs, heads, bias=False)
    q_w, k_w, v_w = grouped.qkv.weight.split([heads * hs, kv_heads * hs, kv_heads * hs])

    def repeated(w):
        return w.view(kv_heads, hs, -1).repeat_interleave(heads // kv_heads, dim=0).reshape(heads * hs, -1)

    with torch.no_grad():
        full.qkv.weight.copy_(torch.cat([q_w, repeated(k_w), repeated(v_w)]))
        full.proj.weight.copy_(grouped.proj.weight)
    x = torch.randn(2, 6, heads * hs)
    rope = rope_cos_sin(torch.arange(6).expand(2, 6), hs, 10000.0, x.dtype)
    torch.testing.assert_close(grouped(x, is_causal=True, rope=rope), full(x, is_causal=True, rope=rope))
    assert grouped.qkv.weight.shape == ((heads + 2 * kv_heads) * hs, heads * hs) and grouped.qkv.bias is None


def test_parameter_names_are_the_export_contract():
    model = VLM(modern_config("decoder.moe.layers=[1]", "decoder.moe.shared_expert=true").model)
    shapes = {name: tuple(p.shape) for name, p in model.state_dict().items()}
    P, W, D, H, E = 4, 32, 32, 128, 4
    expected = {
        "vision.patch_embed.weight": (W, 3, 8, 8), "vision.patch_embed.bias": (W,), "vision.pos": (1, P, W),
        "vision.blocks.0.ln1.weight": (W,), "vision.blocks.0.ln1.bias": (W,),
        "vision.blocks.0.attn.qkv.weight": (3 * W, W), "vision.blocks.0.attn.qkv.bias": (3 * W,),
        "vision.blocks.0.attn.proj.weight": (W, W), "vision.blocks.0.attn.proj.bias": (W,),
        "vision.blocks.0.ln2.weight": (W,), "vision.blocks.0.ln2.bias": (W,),
        "vision.blocks.0.mlp.fc.weight": (4 * W, W), "vision.blocks.0.mlp.fc.bias": (4 * W,),
        "vision.blocks.0.mlp.proj.weight": (W, 4 * W), "vision.blocks.0.mlp.proj.bias": (W,),
        "decoder.tok_emb.weight": (23, D), "decoder.ln_f.weight": (D,), "decoder.lm_head.weight": (23, D),
        "decoder.blocks.0.ffn.fc.weight": (2 * H, D), "decoder.blocks.0.ffn.proj.weight": (D, H),
        "decoder.blocks.1.ffn.gate.weight": (E, D), "decoder.blocks.1.ffn.noise.weight": (E, D),
        "decoder.blocks.1.ffn.w1_EDF": (E, D, 2 * H), "decoder.blocks.1.ffn.w2_EHD": (E, H, D),
        "decoder.blocks.1.ffn.shared.fc.weight": (2 * H, D), "decoder.blocks.1.ffn.shared.proj.weight": (D, H),
    }
    for i in (0, 1):
        expected |= {f"decoder.blocks.{i}.ln1.weight": (D,), f"decoder.blocks.{i}.ln2.weight": (D,),
                     f"decoder.blocks.{i}.attn.qkv.weight": ((4 + 2 * 2) * 8, D),
                     f"decoder.blocks.{i}.attn.proj.weight": (D, D)}
    assert shapes == {**expected, **{k: v for k, v in shapes.items() if k.startswith("projector.")}}
    assert model.decoder.lm_head.weight is model.decoder.tok_emb.weight
    assert model.cfg.decoder.moe.activation == "swiglu"  # derived from the arch


def test_llama_init_is_gpt2_style_with_unit_rms_norms():
    model = VLM(load_config("tiny", overrides=[*MODERN, "decoder.depth=8", "decoder.width=64"]).model)
    params = dict(model.named_parameters())
    assert params["decoder.blocks.0.ln1.weight"].eq(1).all() and params["decoder.ln_f.weight"].eq(1).all()
    assert params["decoder.blocks.0.attn.qkv.weight"].std().item() == pytest.approx(0.02, rel=0.1)
    residual_std = 0.02 / 4  # 1 / sqrt(2 * depth)
    assert params["decoder.blocks.0.attn.proj.weight"].std().item() == pytest.approx(residual_std, rel=0.1)
    assert params["decoder.blocks.0.ffn.w2_EHD"].std().item() == pytest.approx(residual_std, rel=0.1)


def batch(config, B=2, T=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    size = config.model.vision.image_size
    return torch.rand(B, 3, size, size, generator=g) * 2 - 1, torch.randint(5, 23, (B, T), generator=g)


def test_cached_decoding_logits_equal_recomputation():
    config = modern_config()
    model = scrambled(VLM(config.model))
    images, ids = batch(config)
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[0, :2] = False  # left padding in the first row
    cache = model.new_cache(2, model.num_image_tokens + ids.size(1) + 4)
    assert cache.keys.shape[2] == 2  # kv_heads, not heads
    logits, key_mask = model.prefill(images, ids, mask, cache)
    for _ in range(4):
        token = logits.argmax(-1)
        ids, mask = torch.cat([ids, token[:, None]], 1), torch.cat([mask, mask.new_ones(2, 1)], 1)
        key_mask = torch.cat([key_mask, key_mask.new_ones(2, 1)], 1)
        logits = model.step(token, key_mask, cache)
        recomputed, _ = model.prefill(images, ids, mask)
        torch.testing.assert_close(logits, recomputed, atol=1e-5, rtol=1e-5)


def test_left_padded_batch_equals_each_row_alone():
    config = modern_config()
    model = scrambled(VLM(config.model))
    images, _ = batch(config)
    prompts = [[1], [1, 7, 9, 4]]
    together = generate(model, images, prompts, eos_id=2, pad_id=0, max_new_tokens=8)
    alone = [generate(model, images[i:i + 1], [p], eos_id=2, pad_id=0, max_new_tokens=8)[0]
             for i, p in enumerate(prompts)]
    assert together == alone and max(map(len, together)) > 3
    padded = torch.tensor([[0, 0, 0, 1], [1, 7, 9, 4]])
    logits, _ = model.prefill(images, padded, padded != 0)
    short, _ = model.prefill(images[:1], torch.tensor([[1]]), torch.ones(1, 1, dtype=torch.bool))
    torch.testing.assert_close(logits[:1], short, atol=1e-5, rtol=1e-5)


def test_forward_backward_reaches_every_parameter():
    config = modern_config("decoder.moe.layers=[1]", "decoder.moe.shared_expert=true")
    model = VLM(config.model).train()
    images, ids = batch(config, B=3, T=7)
    labels = ids.roll(-1, 1)
    out = model(images, ids, labels=labels)
    # Given labels, the logits are those of the labelled positions only, row by row.
    assert out.logits.shape == (int((labels != -100).sum()), 23) and set(out.aux) == {"balance", "z"}
    out.loss.backward()
    no_grad = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert no_grad == []


def test_routing_breaks_near_ties_as_transformers_does():
    """Rows of logits within a few float32 steps of each other: the experts and weights equal
    Mixtral's router's, including rows where top-k of the logits would pick another expert."""
    E, K, N = 4, 2, 2000
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(N, 1, generator=g) * 3).expand(N, E).clone()
    logits[:, 1:3] += torch.randn(N, 2, generator=g) * 2e-7  # experts 0, 1, 2 nearly tied
    logits[:, 3] += torch.randn(N, generator=g) * 3
    moe = MoE(E, 8, MoEConfig(num_experts=E, top_k=K, router_noise=False)).eval()
    hf = MixtralTopKRouter(MixtralConfig(hidden_size=E, num_local_experts=E, num_experts_per_tok=K))
    with torch.no_grad():
        moe.gate.weight.copy_(torch.eye(E))
        hf.weight.copy_(torch.eye(E))
    _, experts, weights = moe.route(logits)
    _, hf_weights, hf_experts = hf(logits)
    assert torch.equal(experts, hf_experts)
    torch.testing.assert_close(weights, hf_weights, atol=1e-6, rtol=0)
    logit_order = logits.topk(K, dim=-1).indices  # top-k of the logits first: another choice on some rows
    assert not torch.equal(experts.sort(-1).values, logit_order.sort(-1).values)


@pytest.mark.parametrize("overrides,message", [
    (["decoder.heads=4", "decoder.kv_heads=3"], "decoder.kv_heads 3 must divide decoder.heads 4"),
    (["vision.arch=siglip", "vision.image_tokens=pooled"],
     "vision.arch siglip gives patch tokens only, not image_tokens pooled: set vision.image_tokens=patches"),
    (["vision.arch=siglip", "vision.image_tokens=cls"], "a larger vision.patch_size gives fewer tokens"),
    (["decoder.arch=mamba"], "decoder.arch must be gpt or llama, not 'mamba'"),
])
def test_config_mistakes_are_one_line(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config("tiny", overrides=overrides)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_a_config_without_the_new_keys_is_the_gpt_vit_model_it_always_was():
    values = load_config("tiny", overrides=["decoder.vocab_size=23", "decoder.arch=gpt", "vision.arch=vit",
                                            "moe.activation=gelu"]).to_dict()
    for section, keys in (("decoder", ("arch", "rope_theta", "kv_heads")), ("vision", ("arch",))):
        for key in keys:
            del values["model"][section][key]
    config = Config.from_dict(values)
    assert (config.model.decoder.arch, config.model.vision.arch, config.model.decoder.kv_heads) == ("gpt", "vit", 2)
    names = set(VLM(config.model).state_dict())
    assert {"decoder.pos_emb.weight", "decoder.ln_f.bias", "vision.cls", "vision.ln.weight",
            "decoder.blocks.0.attn.qkv.bias", "decoder.blocks.0.ffn.b1_EF"} <= names


def test_llama_decoder_equals_transformers_mixtral_on_the_same_weights():
    """The renaming the export does (fused qkv split into q/k/v rows, experts transposed) gives
    Mixtral exactly this decoder: RoPE, RMSNorm, GQA, SwiGLU experts and routing all agree."""
    config = modern_config("decoder.ffn_hidden=48", "decoder.rope_theta=300.0", "decoder.tie_embeddings=false")
    ours = scrambled(VLM(config.model)).decoder
    hf = MixtralForCausalLM(MixtralConfig(
        vocab_size=23, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, rope_theta=300.0, rms_norm_eps=1e-5,
        tie_word_embeddings=False)).eval()
    sd = ours.state_dict()
    state = {"model.embed_tokens.weight": sd["tok_emb.weight"], "model.norm.weight": sd["ln_f.weight"],
             "lm_head.weight": sd["lm_head.weight"]}
    for i in range(2):
        ours_, theirs = f"blocks.{i}.", f"model.layers.{i}."
        q, k, v = sd[ours_ + "attn.qkv.weight"].split([32, 16, 16])
        state |= {theirs + "self_attn.q_proj.weight": q, theirs + "self_attn.k_proj.weight": k,
                  theirs + "self_attn.v_proj.weight": v,
                  theirs + "self_attn.o_proj.weight": sd[ours_ + "attn.proj.weight"],
                  theirs + "input_layernorm.weight": sd[ours_ + "ln1.weight"],
                  theirs + "post_attention_layernorm.weight": sd[ours_ + "ln2.weight"],
                  theirs + "mlp.gate.weight": sd[ours_ + "ffn.gate.weight"],
                  theirs + "mlp.experts.gate_up_proj": sd[ours_ + "ffn.w1_EDF"].transpose(1, 2),
                  theirs + "mlp.experts.down_proj": sd[ours_ + "ffn.w2_EHD"].transpose(1, 2)}
    hf.load_state_dict(state, strict=True)
    ids = torch.randint(3, 23, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        logits = ours.lm_head(ours(ours.tok_emb(ids), torch.arange(9).expand(2, 9)))
        torch.testing.assert_close(logits, hf(ids).logits, atol=1e-5, rtol=0)


def test_siglip_encoder_equals_transformers_siglip_on_the_same_weights():
    """Image tokens are the last hidden state before SigLIP's post_layernorm (what LLaVA takes)."""
    vision = modern_config("vision.depth=2", "vision.heads=4").model.vision
    ours = scrambled(ViT(vision))
    W = vision.width
    hf = SiglipVisionModel(SiglipVisionConfig(
        hidden_size=W, intermediate_size=4 * W, num_hidden_layers=2, num_attention_heads=4, image_size=16,
        patch_size=8, hidden_act="gelu", layer_norm_eps=1e-5, vision_use_head=False)).eval()
    sd = ours.state_dict()
    state = {"embeddings.patch_embedding.weight": sd["patch_embed.weight"],
             "embeddings.patch_embedding.bias": sd["patch_embed.bias"],
             "embeddings.position_embedding.weight": sd["pos"][0]}
    for i in range(2):
        ours_, theirs = f"blocks.{i}.", f"encoder.layers.{i}."
        for kind in ("weight", "bias"):
            q, k, v = sd[ours_ + "attn.qkv." + kind].split(W)
            state |= {theirs + "self_attn.q_proj." + kind: q, theirs + "self_attn.k_proj." + kind: k,
                      theirs + "self_attn.v_proj." + kind: v,
                      theirs + "self_attn.out_proj." + kind: sd[ours_ + "attn.proj." + kind],
                      theirs + "layer_norm1." + kind: sd[ours_ + "ln1." + kind],
                      theirs + "layer_norm2." + kind: sd[ours_ + "ln2." + kind],
                      theirs + "mlp.fc1." + kind: sd[ours_ + "mlp.fc." + kind],
                      theirs + "mlp.fc2." + kind: sd[ours_ + "mlp.proj." + kind]}
    assert set(hf.load_state_dict(state, strict=False).missing_keys) == {"post_layernorm.weight", "post_layernorm.bias"}
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(4)) * 2 - 1
    with torch.no_grad():
        expected = hf(pixel_values=images, output_hidden_states=True).hidden_states[-1]
        torch.testing.assert_close(ours(images), expected, atol=1e-5, rtol=0)
