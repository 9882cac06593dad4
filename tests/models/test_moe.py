import math

import pytest
import torch

from moevlm.config import MoEConfig
from moevlm.models import grouped
from moevlm.models.moe import IMAGE, PAD, TEXT, MoE


def make_moe(width=8, hidden=16, **kw):
    cfg = MoEConfig(**{"num_experts": 4, "top_k": 2, **kw})
    moe = MoE(width, hidden, cfg)
    for p in (moe.w1_EDF, moe.w2_EHD, moe.b1_EF, moe.b2_ED):
        if p is not None:
            torch.nn.init.normal_(p, std=0.3)
    return moe


def expert_grads(moe, x_ND, experts_NK, weights_NK, fn):
    moe.zero_grad()
    x_ND = x_ND.clone().requires_grad_()
    out = fn(x_ND, experts_NK, weights_NK)
    out.backward(torch.linspace(-1, 1, out.numel()).view_as(out))
    params = [p for p in (moe.w1_EDF, moe.b1_EF, moe.w2_EHD, moe.b2_ED) if p is not None]
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
    assert {"w1_EDF", "w2_EHD", "b1_EF", "b2_ED"} <= fp32_grads.keys()
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


def plain_capacity_rule(experts_NK, real_N, capacity_factor, num_experts):
    """Per expert, the first ceil(factor * real tokens * K / E) real assignments in flattened
    order (token, then slot) keep their slot; pads never do."""
    N, K = experts_NK.shape
    capacity = math.ceil(int(real_N.sum()) * (capacity_factor * K / num_experts))
    taken = [0] * num_experts
    kept = torch.zeros(N, K, dtype=torch.bool)
    for n in range(N):
        for k in range(K):
            e = int(experts_NK[n, k])
            if real_N[n] and taken[e] < capacity:
                kept[n, k] = True
                taken[e] += 1
    return kept


@pytest.mark.parametrize("factor", [0.3, 0.5, 1.0, 1.25, 4.0])
def test_capacity_keeps_the_first_real_assignments_of_each_expert(factor):
    moe = make_moe(num_experts=4, top_k=2, capacity_factor=factor)
    g = torch.Generator().manual_seed(3)
    experts_NK = torch.stack([torch.randperm(4, generator=g)[:2] for _ in range(40)])
    real_N = torch.rand(40, generator=g) < 0.6
    kept = moe.within_capacity(experts_NK, real_N)
    assert torch.equal(kept, plain_capacity_rule(experts_NK, real_N, factor, 4))
    assert not kept[~real_N].any()


def test_capacity_factor_drops_overflow_and_keeps_the_rest_exact():
    moe = make_moe(num_experts=2, top_k=1, capacity_factor=0.5)
    x_ND = torch.randn(8, 8)
    experts_NK = torch.zeros(8, 1, dtype=torch.long)  # all to expert 0; capacity = ceil(0.5*8/2) = 2
    weights_NK = torch.ones(8, 1)
    kept_NK = moe.within_capacity(experts_NK, torch.ones(8, dtype=torch.bool))
    out = moe.experts_sorted(x_ND, experts_NK, weights_NK, kept_NK)
    ref = moe.experts_reference(x_ND, experts_NK, weights_NK)
    torch.testing.assert_close(out[:2], ref[:2])  # the first two tokens are kept
    assert torch.count_nonzero(out[2:]) == 0


def moe_and_reference_grads(moe, x, kind, fn):
    """Output and the gradients of input, router and experts for one forward ``fn(x_ND)``."""
    moe.zero_grad()
    x = x.clone().requires_grad_()
    out = fn(x)
    out.backward(torch.linspace(-1, 1, out.numel()).view_as(out))
    params = [p for p in (moe.gate.weight, moe.w1_EDF, moe.b1_EF, moe.w2_EHD, moe.b2_ED) if p is not None]
    return [out.detach(), x.grad] + [p.grad.clone() for p in params]


@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh", "swiglu"])
@pytest.mark.parametrize("capacity_factor", [None, 0.6])
@pytest.mark.parametrize("use_grouped", [True, False])
def test_moe_forward_matches_per_token_reference_including_router_gradient(activation, capacity_factor,
                                                                           use_grouped, monkeypatch):
    monkeypatch.setattr(grouped, "grouped_mm_supported", lambda device, dtype: use_grouped)
    moe = make_moe(activation=activation, num_experts=4, top_k=2, capacity_factor=capacity_factor,
                   router_noise=False).train()
    torch.nn.init.normal_(moe.gate.weight, std=1.0)  # a router whose choices matter
    x = torch.randn(2, 13, 8)
    kind = torch.full((2, 13), TEXT)
    kind[:, :3], kind[0, 10:] = IMAGE, PAD

    def reference(x):
        x_ND = x.reshape(-1, 8)
        _, experts_NK, weights_NK = moe.route(x_ND)
        kept_NK = None
        if capacity_factor is not None:
            kept_NK = plain_capacity_rule(experts_NK, kind.reshape(-1) != PAD, capacity_factor, 4)
            assert not kept_NK.reshape(-1)[kind.reshape(-1).repeat_interleave(2) != PAD].all()  # some real dropped
        return moe.experts_reference(x_ND, experts_NK, weights_NK, kept_NK).view_as(x)

    fast = moe_and_reference_grads(moe, x, kind, lambda x: moe(x, kind))
    slow = moe_and_reference_grads(moe, x, kind, reference)
    for got, want in zip(fast, slow):
        torch.testing.assert_close(got, want)
    assert fast[2].abs().sum() > 0  # the router gradient is compared, not two zeros


def test_pads_never_take_capacity_from_real_tokens():
    """Row 0's padding, routed where row 1's tokens go, pushes none of them out: the padded
    batch keeps exactly the real assignments the pad-free one keeps."""
    moe = hand_moe(capacity_factor=0.5)  # router logits = input; capacity = ceil(real tokens / 4)
    real = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]], [[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]]])
    pads = torch.tensor([[[3.0, 0.0]] * 4, [[3.0, 0.0]] * 4])  # to expert 0, like most real tokens
    padded = torch.cat([real, pads], 1)
    kind = torch.cat([torch.full((2, 3), TEXT), torch.full((2, 4), PAD)], 1)
    plain_out = moe(real)
    plain_load, plain_dropped = moe.last_load.clone(), int(moe.last_dropped)
    padded_out = moe(padded, kind)
    # 6 real tokens, capacity 2: expert 0 keeps the first token of each row, expert 1 both of its own.
    assert plain_dropped == int(moe.last_dropped) == 2
    assert moe.last_load.tolist() == plain_load.tolist() == [[0, 0], [2, 2]]
    torch.testing.assert_close(padded_out[:, :3], plain_out)
    assert torch.count_nonzero(padded_out[:, 3:]) == 0  # padding computes nothing


def test_capacity_applies_in_training_only_and_eval_counts_what_training_would_drop():
    moe = hand_moe(capacity_factor=0.5)
    x = torch.tensor([[[1.0, 0.0], [2.0, 0.0], [3.0, 0.0], [0.0, 1.0]]])  # 3 tokens to expert 0, capacity 1
    trained = moe(x)
    assert int(moe.last_dropped) == 2 and moe.last_load.tolist() == [[0, 0], [1, 1]]
    assert torch.count_nonzero(trained[0, 1:3]) == 0
    moe.eval()
    with torch.no_grad():
        for rows in (x, x[:, :1], x[:, 1:2]):  # the few-token decoding path too: nothing is dropped
            _, experts_NK, weights_NK = moe.route(rows[0])
            torch.testing.assert_close(moe(rows)[0], moe.experts_reference(rows[0], experts_NK, weights_NK))
        moe(x)
    assert int(moe.last_dropped) == 2 and moe.last_load.tolist() == [[0, 0], [3, 1]]


def hand_moe(**kw):
    # Training mode (aux losses are computed only there); no noise, so routing is exact.
    moe = MoE(2, 4, MoEConfig(num_experts=2, top_k=1, router_noise=False, **kw)).train()
    with torch.no_grad():
        moe.gate.weight.copy_(torch.eye(2))  # router logits equal the input
        for p in (moe.w1_EDF, moe.b1_EF, moe.w2_EHD, moe.b2_ED):
            torch.nn.init.normal_(p, std=0.3)
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
    assert (moe.w1_EDF.grad.abs().sum(dim=(1, 2)) > 0).all()
