"""Sparse upcycling: right after it, with router noise off (eval), the model computes what the
dense model did; the errors a user can cause name the problem."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PhiConfig, PhiForCausalLM

from moevlm.config import Config, DecoderConfig, MoEConfig, load_config
from moevlm.errors import ConfigError, MoevlmError
from moevlm.models.moe import IMAGE, TEXT, MoE
from moevlm.models.moe_install import MoEMLP, TokenKinds, decoder_layers, install_moe_layers, mlp_activation
from moevlm.models.upcycle import upcycle
from moevlm.models.vlm import VLM

VOCAB = 40
DEPTH = 3


def scramble(model: nn.Module, seed: int = 0) -> nn.Module:
    """Weights far from the 0.02-std init, so a misplaced matrix (gate/up swapped, a missing
    bias, exact GELU for tanh GELU) moves the logits well past assert_close's tolerance."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model


def hf_lm(family: str, **overrides) -> nn.Module:
    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=DEPTH,
                  num_attention_heads=4)
    if family == "llama":
        lm = LlamaForCausalLM(LlamaConfig(**{**common, "num_key_value_heads": 2, **overrides}))
    elif family == "gpt2":
        lm = GPT2LMHeadModel(GPT2Config(**{"vocab_size": VOCAB, "n_embd": 32, "n_inner": 48, "n_layer": DEPTH,
                                           "n_head": 4, "n_positions": 64, "activation_function": "gelu_new",
                                           "bos_token_id": 0, "eos_token_id": 0, **overrides}))
    else:
        lm = PhiForCausalLM(PhiConfig(**{**common, "hidden_act": "gelu_new", **overrides}))
    return scramble(lm).eval()


def lm_decoder_cfg(layers, experts=4, top_k=2, **moe) -> DecoderConfig:
    # pretrained set: moe.layers None would mean "none" (a pretrained LM stays dense)
    return DecoderConfig(width=32, depth=DEPTH, heads=4, pretrained="tiny-hf",
                         moe=MoEConfig(num_experts=experts, top_k=top_k, layers=layers, **moe))


IDS = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("family,activation", [("llama", "swiglu"), ("gpt2", "gelu_tanh"), ("phi", "gelu_tanh")])
@pytest.mark.parametrize("layers,expected", [("all", [0, 1, 2]), ("every-other", [1]), ([0, 2], [0, 2])])
def test_installed_moe_layers_compute_what_the_dense_lm_did(family, activation, layers, expected):
    lm = hf_lm(family)
    with torch.no_grad():
        dense = lm(IDS).logits
    assert mlp_activation(lm, list(range(DEPTH))) == activation
    with pytest.raises(MoevlmError, match=f"MLPs make {activation} experts, but moe.activation is gelu"):
        install_moe_layers(lm, lm_decoder_cfg(layers))  # the default activation does not fit every LM
    install_moe_layers(lm, lm_decoder_cfg(layers, activation=activation))
    blocks = decoder_layers(lm)
    assert [i for i, b in enumerate(blocks) if isinstance(b.mlp, MoEMLP)] == expected
    with torch.no_grad():
        upcycled = lm(IDS).logits
    torch.testing.assert_close(upcycled, dense)
    torch.testing.assert_close(F.cross_entropy(upcycled[:, :-1].reshape(-1, VOCAB), IDS[:, 1:].reshape(-1)),
                               F.cross_entropy(dense[:, :-1].reshape(-1, VOCAB), IDS[:, 1:].reshape(-1)))
    moe = blocks[expected[0]].mlp.moe
    assert moe.cfg.activation == activation and moe.w1_EDF.shape[0] == 4
    # The MLPs matter to the logits: an assert_close above would catch a wrong expert.
    for i in expected:
        blocks[i].mlp.moe.w2_EHD.data.mul_(1.5)
    with torch.no_grad():
        assert (lm(IDS).logits - dense).abs().max() > 1e-2


def test_gpt2_exact_gelu_becomes_gelu_experts_and_pytorch_tanh_gelu_tanh():
    for act, expected in (("gelu", "gelu"), ("gelu_pytorch_tanh", "gelu_tanh")):
        lm = hf_lm("gpt2", activation_function=act)
        with torch.no_grad():
            dense = lm(IDS).logits
        assert mlp_activation(lm, list(range(DEPTH))) == expected
        install_moe_layers(lm, lm_decoder_cfg("all", activation=expected))
        with torch.no_grad():
            torch.testing.assert_close(lm(IDS).logits, dense)


def test_install_is_idempotent():
    lm = hf_lm("llama")
    install_moe_layers(lm, lm_decoder_cfg([1], activation="swiglu"))
    first = decoder_layers(lm)[1].mlp
    install_moe_layers(lm, lm_decoder_cfg("all", activation="swiglu"))  # layer 1 is kept, 0 and 2 are upcycled
    assert decoder_layers(lm)[1].mlp is first
    assert all(isinstance(b.mlp, MoEMLP) for b in decoder_layers(lm))


def test_upcycled_lm_trains_experts_and_router_and_reports_aux_losses():
    lm = hf_lm("llama")
    kinds = TokenKinds()
    install_moe_layers(lm, lm_decoder_cfg("every-other", experts=4, top_k=2, activation="swiglu"), kinds)
    mlp = decoder_layers(lm)[1].mlp
    token_kind = torch.full(IDS.shape, TEXT)
    token_kind[:, :3] = IMAGE
    lm.train()
    with kinds.given(token_kind):
        logits = lm(IDS).logits
    assert set(mlp.moe.aux) == {"balance", "z"}
    assert mlp.moe.last_load.sum(1).tolist() == [2 * 3 * 2, 2 * 6 * 2]  # image, text assignments
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), IDS[:, 1:].reshape(-1))
    (loss + mlp.moe.aux["balance"] + mlp.moe.aux["z"]).backward()
    used = mlp.moe.last_load.sum(0) > 0
    assert (mlp.moe.w1_EDF.grad.abs().sum((1, 2))[used] > 0).all()
    assert mlp.moe.w2_EHD.grad.abs().sum() > 0
    # Identical experts: the main loss cannot tell the router's choices apart; the aux losses can.
    assert mlp.moe.gate.weight.grad.abs().sum() > 0
    lm.eval()
    with torch.no_grad():
        lm(IDS)
    assert mlp.moe.aux == {}


def test_token_kinds_of_another_shape_are_a_bug_not_silently_ignored():
    lm = hf_lm("gpt2")
    kinds = TokenKinds()
    install_moe_layers(lm, lm_decoder_cfg([0], activation="gelu_tanh"), kinds)
    with kinds.given(torch.full((2, 4), TEXT)), pytest.raises(AssertionError, match="token kinds given have shape"):
        lm(IDS)
    lm(IDS)  # outside the call they were given for, every token counts as text


@pytest.mark.parametrize("family,overrides,message", [
    ("llama", {"mlp_bias": True}, "cannot upcycle LlamaMLP: its projections have biases"),
    ("llama", {"hidden_act": "gelu"}, "cannot upcycle LlamaMLP: gated MLP with activation GELUActivation"),
    ("gpt2", {"activation_function": "relu"}, "cannot upcycle GPT2MLP: activation ReLU"),
    ("phi", {"hidden_act": "quick_gelu"}, "cannot upcycle PhiMLP: activation QuickGELUActivation"),
])
def test_unsupported_mlps_are_named_in_one_line(family, overrides, message):
    lm = hf_lm(family, **overrides)
    before = [type(b.mlp) for b in decoder_layers(lm)]
    with pytest.raises(MoevlmError, match=message) as err:
        install_moe_layers(lm, lm_decoder_cfg("all"))
    assert "\n" not in str(err.value)
    assert [type(b.mlp) for b in decoder_layers(lm)] == before  # nothing replaced


def test_unknown_mlp_module_and_out_of_range_layers():
    lm = hf_lm("llama")
    decoder_layers(lm)[2].mlp = nn.Sequential(nn.Linear(32, 32))
    with pytest.raises(MoevlmError, match="cannot upcycle Sequential: unknown MLP layout"):
        install_moe_layers(lm, lm_decoder_cfg("all"))
    assert not any(isinstance(b.mlp, MoEMLP) for b in decoder_layers(lm))
    deeper = DecoderConfig(width=32, depth=6, heads=4, pretrained="tiny-hf",  # a config made for a deeper LM
                           moe=MoEConfig(layers=[0, 5], activation="swiglu"))
    with pytest.raises(MoevlmError, match=r"MoE layers \[5\] are outside the LM's layers 0..2"):
        install_moe_layers(lm, deeper)


# --- the scratch VLM --------------------------------------------------------------------------

def dense_vlm(depth=DEPTH, arch="gpt"):
    config = load_config("tiny", overrides=["moe.layers=none", f"decoder.vocab_size={VOCAB}",
                                            f"decoder.depth={depth}", f"decoder.arch={arch}"])
    model = VLM(config.model)
    with torch.no_grad():  # biases too: the tiny init leaves them zero
        for name, p in model.named_parameters():
            if ".ffn." in name:
                p.copy_(torch.randn(p.shape) * 0.3)
    return model.eval(), config


def vlm_batch(config, B=3, T=8):
    g = torch.Generator().manual_seed(2)
    size = config.model.vision.image_size
    images = torch.rand(B, 3, size, size, generator=g) * 2 - 1
    ids = torch.randint(1, VOCAB, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[0, 6:] = 0  # some padding: pad tokens are routed too, and must not change
    labels = torch.where(mask.bool(), ids.roll(-1, 1), -100)
    return images, ids, mask, labels


@pytest.mark.parametrize("arch,activation", [("gpt", "gelu"), ("llama", "swiglu")])
@pytest.mark.parametrize("layers,expected", [("all", [0, 1, 2]), ("every-other", [1]), ([2, 0], [0, 2])])
def test_upcycled_scratch_vlm_computes_what_the_dense_one_did(layers, expected, arch, activation):
    model, config = dense_vlm(arch=arch)
    batch = vlm_batch(config)
    with torch.no_grad():
        dense = model(*batch)
    new_model, new_config = upcycle(model, config, experts=4, top_k=2, layers=layers)
    moe = new_config.model.decoder.moe
    assert (moe.num_experts, moe.top_k, moe.activation, moe.router_noise) == (4, 2, activation, True)
    assert new_config.model.decoder.moe_layer_indices == expected
    assert [i for i, b in enumerate(new_model.decoder.blocks) if isinstance(b.ffn, MoE)] == expected
    assert not new_model.training
    with torch.no_grad():
        out = new_model(*batch)
    torch.testing.assert_close(out.logits, dense.logits)
    torch.testing.assert_close(out.loss, dense.loss)
    # The config round-trips: a VLM built from it (a checkpoint's reload) has the same shapes.
    rebuilt = VLM(Config.from_dict(new_config.to_dict()).model)
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == \
           {k: v.shape for k, v in new_model.state_dict().items()}


def test_upcycled_vlm_trains_experts_and_router_with_aux_losses():
    model, config = dense_vlm()
    new_model, _ = upcycle(model, config, experts=4, top_k=1, layers="every-other")
    new_model.train()
    out = new_model(*vlm_batch(config))
    assert set(out.aux) == {"balance", "z"}
    out.loss.backward()
    moe = new_model.decoder.blocks[1].ffn
    assert moe.w1_EDF.grad.abs().sum() > 0 and moe.b2_ED.grad.abs().sum() > 0
    assert moe.gate.weight.grad.abs().sum() > 0


def test_upcycling_more_layers_of_a_partly_moe_vlm_keeps_its_moe_layers():
    model, config = dense_vlm()
    once, once_cfg = upcycle(model, config, experts=4, top_k=2, layers=[1])
    batch = vlm_batch(config)
    with torch.no_grad():
        reference = once(*batch).logits
    twice, twice_cfg = upcycle(once, once_cfg, experts=4, top_k=2, layers=[0])
    assert twice_cfg.model.decoder.moe.layers == [0, 1]
    torch.testing.assert_close(twice.decoder.blocks[1].ffn.gate.weight, once.decoder.blocks[1].ffn.gate.weight)
    with torch.no_grad():
        torch.testing.assert_close(twice(*batch).logits, reference)
    with pytest.raises(ConfigError, match=r"upcycle layers \[1\] are MoE layers already"):
        upcycle(once, once_cfg, experts=4, top_k=2, layers="every-other")
    with pytest.raises(ConfigError, match="new MoE layers must match them"):
        upcycle(once, once_cfg, experts=8, top_k=2, layers=[0])


@pytest.mark.parametrize("kwargs,message", [
    ({"experts": 0, "top_k": 1}, "upcycle experts must be an integer >= 1, not 0"),
    ({"experts": 4, "top_k": 5}, "upcycle top_k must be between 1 and experts 4, not 5"),
    ({"experts": 4, "top_k": 0}, "upcycle top_k must be between 1 and experts 4, not 0"),
    ({"experts": 4, "top_k": 2, "layers": [0, 3]}, r"upcycle layers \[3\] are outside the decoder's layers 0..2"),
    ({"experts": 4, "top_k": 2, "layers": "none"}, "upcycle layers must be all, every-other or a non-empty list"),
])
def test_bad_upcycle_arguments_are_one_line_errors(kwargs, message):
    model, config = dense_vlm()
    with pytest.raises(ConfigError, match=message):
        upcycle(model, config, **kwargs)


def test_shared_expert_is_refused():
    model, config = dense_vlm()
    config = config.updated({"model.decoder.moe.shared_expert": True})
    with pytest.raises(ConfigError, match="moe.shared_expert=false"):
        upcycle(model, config, experts=2, top_k=1)


# --- a model with a transformers LM (the PretrainedVLM shape: .lm and .cfg) -----------------------

class LMHolder(nn.Module):
    """Stands in for PretrainedVLM: upcycle only uses .lm, .cfg and .token_kinds."""

    def __init__(self, lm, cfg):
        super().__init__()
        self.lm, self.cfg, self.token_kinds = lm, cfg, TokenKinds()


def test_upcycle_on_a_pretrained_lm_model_installs_in_place_and_describes_it():
    config = Config.from_dict({"model": {"decoder": {"pretrained": "tiny-hf", "width": 32, "depth": DEPTH,
                                                     "heads": 4, "moe": {"router_noise": False}}}})
    assert config.model.decoder.moe_layer_indices == []  # a pretrained LM starts dense
    lm = hf_lm("llama")
    with torch.no_grad():
        dense = lm(IDS).logits
    holder = LMHolder(lm, config.model)
    same, new_config = upcycle(holder, config, experts=3, top_k=2, layers="every-other")
    assert same is holder and holder.cfg is new_config.model
    moe = new_config.model.decoder.moe
    assert (moe.num_experts, moe.top_k, moe.activation, moe.layers, moe.router_noise) == \
           (3, 2, "swiglu", "every-other", False)
    assert new_config.model.decoder.moe_layer_indices == [1]
    assert decoder_layers(lm)[1].mlp.moe.noise is None
    with torch.no_grad():
        torch.testing.assert_close(lm(IDS).logits, dense)
    with pytest.raises(ConfigError, match="are MoE layers already"):
        upcycle(holder, new_config, experts=3, top_k=2, layers=[1])
    # An unsupported MLP fails before the config or the model changes.
    gpt = LMHolder(hf_lm("gpt2", activation_function="relu"), config.model)
    with pytest.raises(MoevlmError, match="cannot upcycle GPT2MLP"):
        upcycle(gpt, config, experts=2, top_k=1)
    assert gpt.cfg is config.model
