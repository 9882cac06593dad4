import math

import pytest
import torch

from moevlm.config import MoEConfig
from moevlm.models import grouped
from moevlm.models.moe import IMAGE, PAD, TEXT, MoE


def make_moe(width=8, hidden=16, **kw):
    cfg = MoEConfig(**{"num_experts": 4, "top_k": 2, **kw})
    moe = MoE(width, hidden, cfg)
    for p in (moe.w1_EDH, moe.w2_EHD, moe.b1_EH, moe.b2_ED):
        if p is not None:
            torch.nn.init.normal_(p, std=0.3)
    return moe


def expert_grads(moe, x_ND, experts_NK, weights_NK, fn):
    moe.zero_grad()
    x_ND = x_ND.clone().requires_grad_()
    out = fn(x_ND, experts_NK, weights_NK)
    out.backward(torch.linspace(-1, 1, out.numel()).view_as(out))
    params = [p for p in (moe.w1_EDH, moe.b1_EH, moe.w2_EHD, moe.b2_ED) if p is not None]
    return out.detach(), [x_ND.grad] + [p.grad.clone() for p in params]


@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh", "swiglu"])
@pytest.mark.parametrize("use_grouped", [True, False])
@pytest.mark.parametrize("gather_bias", [True, False])
def test_grouped_experts_match_reference_values_and_gradients(activation, use_grouped, gather_bias, monkeypatch):
    monkeypatch.setattr(grouped, "_gather_bias", lambda t: gather_bias)  # large-tensor bias path too
    moe = make_moe(activation=activation, num_experts=8, top_k=2).eval()
    torch.manual_seed(1)
    x_ND = torch.randn(37, 8)
    experts_NK = torch.randint(0, 6, (37, 1))  # experts 6 and 7 get nothing in slot 0
    experts_NK = torch.cat([experts_NK, (experts_NK + 1) % 6], dim=1)
    weights_NK = torch.rand(37, 2).softmax(-1)
    fast = expert_grads(moe, x_ND, experts_NK, weights_NK,
                        lambda *a: moe.experts_sorted(*a, use_grouped=use_grouped))
    slow = expert_grads(moe, x_ND, experts_NK, weights_NK, moe.experts_reference)
    torch.testing.assert_close(fast[0], slow[0])
    for got, want in zip(fast[1], slow[1]):
        torch.testing.assert_close(got, want)
    assert torch.count_nonzero(fast[1][1][6:]) == 0  # unused experts get exactly zero gradient


@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh", "swiglu"])
def test_decoding_path_for_a_few_tokens_matches_sorted_dispatch(activation):
    moe = make_moe(activation=activation, num_experts=8, top_k=2).eval()
    x = torch.randn(1, 3, 8)  # 3 tokens x 2 experts <= 8 experts: the few-token path
    with torch.no_grad():
        few = moe(x)
        _, experts_NK, weights_NK = moe.route(x[0])
        torch.testing.assert_close(few[0], moe.experts_sorted(x[0], experts_NK, weights_NK))
    assert int(moe.last_load.sum()) == 3 * 2


def test_gelu_tanh_experts_use_the_tanh_approximation_with_biases():
    tanh, exact = make_moe(activation="gelu_tanh").eval(), make_moe(activation="gelu").eval()
    tanh.load_state_dict(exact.state_dict())  # same weights, biases included
    x_ND = torch.linspace(-3, 3, 5 * 8).view(5, 8)
    experts_NK, weights_NK = torch.tensor([[0, 1]] * 5), torch.full((5, 2), 0.5)
    got = tanh.experts_sorted(x_ND, experts_NK, weights_NK)
    torch.testing.assert_close(got, tanh.experts_reference(x_ND, experts_NK, weights_NK))
    # GELU's tanh form differs from the exact one by up to ~5e-4 per unit: visibly, not by rounding.
    assert (got - exact.experts_sorted(x_ND, experts_NK, weights_NK)).abs().max() > 1e-5


def test_grouped_experts_under_bf16_autocast_keep_fp32_gradients():
    moe = make_moe(router_noise=False).train()
    x = torch.randn(2, 16, 8)
    upstream = torch.linspace(-1, 1, x.numel()).view_as(x)
    reference = moe(x)
    (reference * upstream).sum().backward()
    fp32_grads = {name: p.grad.clone() for name, p in moe.named_parameters()}
    moe.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = moe(x)
    (out.float() * upstream).sum().backward()
    torch.testing.assert_close(out.float(), reference, atol=0.05, rtol=0.05)
    # Every weight, fp32, gets an fp32 gradient with the fp32 gradient's values up to bf16 rounding
    # (about 3 significant digits): the gradients reach the weights through the casts.
    assert fp32_grads.keys() == {name for name, p in moe.named_parameters() if p.grad is not None}
    assert {"w1_EDH", "w2_EHD", "b1_EH", "b2_ED"} <= fp32_grads.keys()
    for name, p in moe.named_parameters():
        assert p.dtype == p.grad.dtype == torch.float32, name
        assert fp32_grads[name].abs().max() > 0, name
        torch.testing.assert_close(p.grad, fp32_grads[name], atol=0.02 * fp32_grads[name].abs().max().item(),
                                   rtol=0.05, msg=name)


@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_sorted_dispatch_equals_naive_per_token_loop(top_k):
    moe = make_moe(top_k=top_k).eval()
    x_ND = torch.randn(37, 8)
    _, experts_NK, weights_NK = moe.route(x_ND)
    fast = moe.experts_sorted(x_ND, experts_NK, weights_NK)
    torch.testing.assert_close(fast, moe.experts_reference(x_ND, experts_NK, weights_NK))


def test_dispatch_handles_experts_that_get_no_tokens():
    moe = make_moe().eval()
    x_ND = torch.randn(5, 8)
    experts_NK = torch.tensor([[0, 1]] * 5)
    weights_NK = torch.full((5, 2), 0.5)
    torch.testing.assert_close(moe.experts_sorted(x_ND, experts_NK, weights_NK),
                               moe.experts_reference(x_ND, experts_NK, weights_NK))


def test_each_token_goes_to_exactly_k_distinct_experts_with_weights_summing_to_one():
    moe = make_moe(num_experts=8, top_k=3).train()
    _, experts_NK, weights_NK = moe.route(torch.randn(50, 8))
    assert experts_NK.shape == (50, 3)
    assert all(len(set(row)) == 3 for row in experts_NK.tolist())
    torch.testing.assert_close(weights_NK.sum(-1), torch.ones(50))
    moe(torch.randn(2, 25, 8))
    assert int(moe.last_load.sum()) == 50 * 3


def test_router_noise_only_while_training():
    moe = make_moe()
    torch.nn.init.normal_(moe.noise.weight, std=1.0)
    x = torch.randn(1, 64, 8)
    moe.eval()
    torch.testing.assert_close(moe(x), moe(x))
    moe.train()
    assert not torch.equal(moe(x), moe(x))


def test_capacity_factor_drops_overflow_and_keeps_the_rest_exact():
    moe = make_moe(num_experts=2, top_k=1, capacity_factor=0.5).eval()
    x_ND = torch.randn(8, 8)
    experts_NK = torch.zeros(8, 1, dtype=torch.long)  # all to expert 0; capacity = ceil(0.5*8/2) = 2
    weights_NK = torch.ones(8, 1)
    out = moe.experts_sorted(x_ND, experts_NK, weights_NK)
    ref = moe.experts_reference(x_ND, experts_NK, weights_NK)
    torch.testing.assert_close(out[:2], ref[:2])  # stable sort: the first two tokens are kept
    assert torch.count_nonzero(out[2:]) == 0


def hand_moe():
    # Training mode (aux losses are computed only there); no noise, so routing is exact.
    moe = MoE(2, 4, MoEConfig(num_experts=2, top_k=1, router_noise=False)).train()
    with torch.no_grad():
        moe.gate.weight.copy_(torch.eye(2))  # router logits equal the input
    return moe


def test_aux_losses_on_hand_computed_balanced_case():
    moe = hand_moe()
    moe(torch.tensor([[[1.0, 0.0], [0.0, 1.0]]]))
    # f = (1/2, 1/2), P = (1/2, 1/2) -> E * sum f P = 1; z = logsumexp(1, 0)^2 for both tokens
    assert moe.aux["balance"].item() == pytest.approx(1.0)
    assert moe.aux["z"].item() == pytest.approx(math.log(math.e + 1) ** 2)


def test_aux_losses_on_hand_computed_unbalanced_case_ignore_padding():
    moe = hand_moe()
    x = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [0.0, 5.0]]])
    moe(x, token_kind=torch.tensor([[IMAGE, TEXT, PAD]]))
    p0 = math.e / (math.e + 1)
    # both real tokens pick expert 0: f = (1, 0), P = (p0, 1 - p0) -> 2 * p0
    assert moe.aux["balance"].item() == pytest.approx(2 * p0)
    assert moe.aux["z"].item() == pytest.approx(math.log(math.e + 1) ** 2)
    assert moe.last_load.tolist() == [[1, 0], [1, 0]]  # image row, text row; pad not counted


def test_eval_mode_counts_load_but_computes_no_aux_losses():
    moe = hand_moe().eval()
    moe(torch.tensor([[[1.0, 0.0], [0.0, 1.0]]]))
    assert moe.aux == {}
    assert moe.last_load.tolist() == [[0, 0], [1, 1]]


def test_shared_expert_adds_dense_path():
    moe = make_moe(shared_expert=True).eval()
    x = torch.randn(1, 6, 8)
    _, experts_NK, weights_NK = moe.route(x.reshape(-1, 8))
    routed = moe.experts_sorted(x.reshape(-1, 8), experts_NK, weights_NK)
    torch.testing.assert_close(moe(x).reshape(-1, 8), routed + moe.shared(x.reshape(-1, 8)))


def test_moe_backward_reaches_every_routed_expert():
    moe = make_moe(num_experts=4, top_k=4).train()
    moe(torch.randn(2, 5, 8)).sum().backward()
    assert (moe.w1_EDH.grad.abs().sum(dim=(1, 2)) > 0).all()
