import json

import torch

from moevlm.bench.scenarios import _mixtral_block, moe_like_mixtral
from moevlm.cli import main

REQUIRED = {"gemm_gflops", "train_step_s", "train_tokens_per_s", "train_flop_util", "moe_vs_dense", "moe_vs_mixtral",
            "gen_tokens_per_s", "gen_cache_speedup", "peak_rss_mb"}


def test_swiglu_moe_computes_what_the_mixtral_block_computes_forward_and_backward():
    torch.manual_seed(0)
    block = _mixtral_block(width=16, hidden=24, experts=4, k=2)
    for param in block.parameters():
        torch.nn.init.normal_(param, std=0.2)
    ours = moe_like_mixtral(block, hidden=24)
    x = torch.randn(2, 10, 16)
    x_theirs, x_ours = x.clone().requires_grad_(), x.clone().requires_grad_()
    theirs_out, ours_out = block(x_theirs), ours(x_ours)
    torch.testing.assert_close(ours_out, theirs_out)
    grad = torch.randn_like(x)
    theirs_out.backward(grad)
    ours_out.backward(grad)
    torch.testing.assert_close(x_ours.grad, x_theirs.grad)
    torch.testing.assert_close(ours.w2_EHD.grad, block.experts.down_proj.grad.transpose(1, 2))
    torch.testing.assert_close(ours.w1_EDF.grad, block.experts.gate_up_proj.grad.transpose(1, 2))  # [gate | up]
    torch.testing.assert_close(ours.gate.weight.grad, block.gate.weight.grad)
    assert ours.gate.weight.grad.abs().sum() > 0


def test_bench_quick_prints_every_figure_as_json(capsys):
    assert main(["bench", "--quick", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert REQUIRED <= result.keys()
    assert set(result["gen_tokens_per_s"]) == {"batch1", "batch8"}
    assert list(result["moe_vs_dense"]) == list(result["moe_vs_mixtral"]) == ["64x16x32x4x2"]
    assert result["moe_mixtral_max_abs_diff"] < 1e-5
    assert result["gen_cached_equals_uncached"] is True
    assert result["train_step_s"] > 0 and result["gemm_gflops"] > 0 and result["train_model_gflop"] > 0
