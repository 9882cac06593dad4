"""--quantize (models/quantized.py): int8 weights against their float reference within derived
bounds, the CPU fast path against the plain dequantize-then-matmul path, whole models, captions of a
trained model, and the one-line refusals (nf4 without CUDA, unknown kinds, models it cannot cover).

Bounds. Per output channel n, s_n = max_k |w_nk| / 127 rounded up to a bf16 value (at most 2^-7
more) and q = round(w / s), so each dequantized weight is off by at most s_n / 2, and a layer's
output by at most (s_n / 2) * sum_k |x_k|. The fast
path rounds the input to bf16 and returns a bf16 product: against the reference on the same
bf16-rounded input it is off by at most 2^-8 of the largest |output| (plus float32 summation order).
"""

import copy
import random

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from moevlm.checkpoint import load_model
from moevlm.cli import main
from moevlm.config import load_config
from moevlm.errors import ConfigError
from moevlm.generate import caption
from moevlm.models.factory import build_model
from moevlm.models.hf_config import resolve_pretrained
from moevlm.models.moe import MoE
from moevlm.models.quantized import (
    FAST_ROWS,
    Int8Linear,
    Int8MoE,
    dequantize_rows,
    fast_path_applies,
    int8_matmul_fast,
    int8_matmul_reference,
    quantize_model,
    quantize_rows,
)

CPU = torch.device("cpu")


def model_for(*overrides):
    return build_model(resolve_pretrained(load_config("tiny", overrides=["decoder.vocab_size=23", *overrides]).model))


@pytest.mark.parametrize("shape", [(37, 53), (3, 11, 29)])
def test_each_weight_is_within_half_a_scale_of_its_row(shape):
    w = torch.randn(shape) * torch.rand(shape[:-1] + (1,)) * 3  # rows of very different sizes
    q, scale = quantize_rows(w)
    assert q.dtype == torch.int8 and scale.shape == shape[:-1]
    least = w.abs().amax(-1) / 127  # the scale, rounded up to a bf16 value: at most 2^-7 more
    assert bool((scale.float() >= least).all()) and bool((scale.float() <= least * (1 + 2 ** -7)).all())
    error = (dequantize_rows(q, scale) - w).abs()
    assert bool((error <= scale.float().unsqueeze(-1) / 2 * (1 + 1e-6)).all())
    assert int(q.abs().amax()) == 127  # each row's largest weight uses the full range


def test_linear_reference_is_within_the_bound_of_the_float_layer():
    layer = torch.nn.Linear(45, 70)
    x = torch.randn(6, 45)
    int8 = Int8Linear.from_weight(layer.weight, layer.bias)
    bound = (int8.scale.float() / 2) * x.abs().sum(1, keepdim=True)  # (6, 70)
    with torch.no_grad():
        error = (int8.reference(x) - layer(x)).abs()
    assert bool((error <= bound + 1e-5).all())
    assert float(error.max()) > 0  # it is quantized


@pytest.mark.parametrize("rows", [1, 3, FAST_ROWS])
def test_the_cpu_fast_path_equals_the_reference_on_bf16_input(rows):
    w, bias = torch.randn(70, 48), torch.randn(70)
    q, scale = quantize_rows(w)
    x = torch.randn(2, rows, 48)[:1]  # (1, rows, 48): leading dims are kept
    assert fast_path_applies(x)
    fast = int8_matmul_fast(x, q, scale, bias)
    reference = int8_matmul_reference(x.bfloat16().float(), q, scale, bias)
    assert fast.shape == reference.shape == (1, rows, 70)
    assert float((fast - reference).abs().max()) <= 2 ** -8 * float(reference.abs().max()) + 1e-5


def test_many_rows_and_widths_the_kernel_gets_wrong_take_the_reference_path():
    assert fast_path_applies(torch.randn(FAST_ROWS, 16))
    assert not fast_path_applies(torch.randn(1, 45))  # the function path: no padded weight at hand
    layer = Int8Linear.from_weight(torch.randn(20, 16))
    x = torch.randn(FAST_ROWS + 1, 16)
    assert not fast_path_applies(x)
    torch.testing.assert_close(layer(x), layer.reference(x), rtol=0, atol=0)


@pytest.mark.parametrize("width", [5, 45, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
def test_an_int8_linear_takes_the_kernel_at_any_width_within_the_bound(width, dtype, bias, monkeypatch):
    """A width that is not a multiple of 16 goes through the kernel on zero-padded weight and input."""
    calls = []
    kernel = torch._weight_int8pack_mm
    monkeypatch.setattr(torch, "_weight_int8pack_mm", lambda *args: calls.append(args[0].shape) or kernel(*args))
    layer = Int8Linear.from_weight(torch.randn(33, width), torch.randn(33) if bias else None)
    x = torch.randn(2, 3, width).to(dtype)[:1]  # (1, 3, width), a view
    out = layer(x)
    assert calls == [(3, width + (-width % 16))]
    reference = layer.reference(x.float().bfloat16().float())
    assert out.dtype == dtype and out.shape == (1, 3, 33)
    bound = 2 ** -8 * float(reference.abs().max()) * (2 if dtype == torch.bfloat16 else 1) + 1e-5
    assert float((out.float() - reference).abs().max()) <= bound


def make_moe(activation: str, width: int = 24, hidden: int = 40) -> MoE:
    cfg = load_config("tiny", overrides=[f"moe.activation={activation}", "moe.num_experts=4", "moe.top_k=2"])
    moe = MoE(width, hidden, cfg.model.decoder.moe).eval()
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(std=0.3)
    return moe


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_int8_experts_compute_the_dequantized_experts(activation):
    moe = make_moe(activation)
    original = copy.deepcopy(moe)
    int8 = Int8MoE.convert(moe)
    assert int8 is moe and not any(p.dim() == 3 for p in int8.parameters())  # no float expert stack left
    x = torch.randn(12, 24)
    with torch.no_grad():
        _, experts, weights = original.route(x)
        # The float experts with each slice replaced by its dequantized int8 weights: the reference.
        dequantized = copy.deepcopy(original)
        dequantized.w1_EDF.copy_(dequantize_rows(int8.w1_q_EFD, int8.w1_scale_EF).transpose(1, 2))
        dequantized.w2_EHD.copy_(dequantize_rows(int8.w2_q_EDH, int8.w2_scale_ED).transpose(1, 2))
        expected = dequantized.experts_reference(x, experts, weights)
        torch.testing.assert_close(int8.experts_reference(x, experts, weights), expected)
        torch.testing.assert_close(int8.compute_experts(x, experts, weights, None), expected)  # 12 rows: reference
        one = int8.compute_experts(x[:1], experts[:1], weights[:1], None)  # a decoding step: fast path
        scale = float(expected[:1].abs().max())
        assert float((one - expected[:1]).abs().max()) <= 2 ** -6 * scale
        # And the quantization moved the float layer's output by a little only.
        float_out = original.experts_reference(x, experts, weights)
        assert 0 < float((expected - float_out).abs().max()) <= 0.02 * float(float_out.abs().max())


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
@pytest.mark.parametrize("tokens", [1, 3])  # 2 assignments < 4 experts: picked one by one; 6: every expert
def test_the_compiled_steps_int8_experts_take_the_kernel_and_equal_eager_int8(activation, tokens, monkeypatch):
    """``experts_static`` (the compiled decoding step's path) runs each int8 expert through the CPU kernel
    as eager decoding does, so both give the same numbers: greedy tokens need not part on bf16 rounding."""
    calls = []
    kernel = torch._weight_int8pack_mm
    monkeypatch.setattr(torch, "_weight_int8pack_mm", lambda *args: calls.append(args[1].shape) or kernel(*args))
    int8 = Int8MoE.convert(make_moe(activation, width=32, hidden=64))
    x = torch.randn(tokens, 32)
    with torch.no_grad():
        _, experts, weights = int8.route(x)
        static = int8.experts_static(x, experts, weights)
        assert len(calls) == 2 * (2 * tokens if 2 * tokens < 4 else 4)  # two matmuls per expert run
        eager = int8.compute_experts(x, experts, weights, None)
        torch.testing.assert_close(static, eager, rtol=0, atol=0)
        reference = int8.experts_reference(x, experts, weights)
    assert float((static - reference).abs().max()) <= 2 ** -6 * float(reference.abs().max())


def test_the_scratch_decoder_is_quantized_and_the_rest_stays_float():
    model = model_for("decoder.tie_embeddings=true").eval()
    reference = copy.deepcopy(model)
    quantize_model(model, "int8", CPU)
    decoder = model.decoder
    linears = [name for name, m in decoder.named_modules() if type(m) is torch.nn.Linear]
    assert all(name.endswith((".gate", ".noise")) for name in linears)  # routers only
    assert all(type(layer.gate) is torch.nn.Linear for layer in model.moe_layers)  # and they stay float
    assert all(isinstance(layer, Int8MoE) for layer in model.moe_layers) and len(model.moe_layers) == 2
    assert isinstance(decoder.lm_head, Int8Linear) and isinstance(decoder.blocks[0].attn.qkv, Int8Linear)
    # The tied head is an int8 copy of the embedding; the embedding and the vision tower stay float.
    assert torch.equal(decoder.tok_emb.weight, reference.decoder.tok_emb.weight)
    assert torch.equal(decoder.lm_head.weight_q, quantize_rows(reference.decoder.tok_emb.weight)[0])
    assert all(torch.equal(a, b) for a, b in zip(model.vision.parameters(), reference.vision.parameters()))
    images, ids = torch.rand(2, 3, 16, 16) * 2 - 1, torch.randint(0, 23, (2, 9))
    with torch.no_grad():
        ours, theirs = model(images, ids).logits, reference(images, ids).logits
    assert 0 < float((ours - theirs).abs().max()) <= 0.02 * float(theirs.abs().max())


@pytest.mark.parametrize("lm", ["llama_tied", "gpt2"])
def test_a_transformers_lm_with_moe_layers_is_quantized(pretrained_parts, offline, lm):
    model = model_for(f"model.lm=hf:{pretrained_parts[lm]}", "moe.layers=[1]").eval()
    reference = copy.deepcopy(model)
    quantize_model(model, "int8", CPU)
    assert len(model.moe_layers) == 1 and isinstance(model.moe_layers[0], Int8MoE)
    left = [name for name, m in model.lm.named_modules()
            if isinstance(m, torch.nn.Linear) or type(m).__name__ == "Conv1D"]
    assert all(name.endswith((".gate", ".noise")) for name in left), left  # routers only
    assert type(model.moe_layers[0].gate) is torch.nn.Linear
    assert isinstance(model.lm.get_output_embeddings(), Int8Linear)
    ids = torch.randint(3, 250, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = model(None, ids).logits, reference(None, ids).logits
    assert 0 < float((ours - theirs).abs().max()) <= 0.03 * float(theirs.abs().max())


def test_nf4_needs_cuda_and_other_refusals_are_one_line():
    model = model_for()
    with pytest.raises(ConfigError) as err:
        quantize_model(model, "nf4", CPU)
    assert str(err.value) == ("--quantize nf4 needs a CUDA device and bitsandbytes; this run is on cpu "
                              "(--quantize int8 runs anywhere)")
    with pytest.raises(ConfigError, match=r"^--quantize int4: expected one of int8, nf4$"):
        quantize_model(model, "int4", CPU)
    with pytest.raises(ConfigError, match=r"^--quantize int8: covers moevlm's own and transformers-LM models, "
                                          r"not a Linear$"):
        quantize_model(torch.nn.Linear(2, 2), "int8", CPU)
    assert type(model.decoder.lm_head) is torch.nn.Linear  # refused before anything was swapped


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from shapes import train_tiny

    root = tmp_path_factory.mktemp("quantize")
    train_tiny(root, "train.max_steps=40", "train.lr=3e-3")
    return root


def scenes(count: int) -> list[Image.Image]:
    """The training set's coloured squares and bars, shifted and on other greys."""
    from PIL import ImageDraw

    from shapes import COLORS

    rng = random.Random(0)
    names, images = list(COLORS), []
    for i in range(count):
        image = Image.new("RGB", (24, 24), (rng.randint(100, 156),) * 3)
        dx, dy = rng.randint(-2, 2), rng.randint(-2, 2)
        box = (4, 4, 20, 20) if (i // len(names)) % 2 == 0 else (2, 9, 22, 15)
        ImageDraw.Draw(image).rectangle((box[0] + dx, box[1] + dy, box[2] + dx, box[3] + dy),
                                        fill=COLORS[names[i % len(names)]])
        images.append(image)
    return images


def test_greedy_captions_of_a_trained_model_mostly_stay_equal(trained):
    images = scenes(48)
    texts = {}
    for kind in (None, "int8"):
        model, tokenizer, _ = load_model(trained / "run", quantize=kind)
        texts[kind] = caption(model, tokenizer, images, max_new_tokens=12)
    equal = sum(a == b for a, b in zip(texts[None], texts["int8"]))
    assert equal >= 0.9 * len(images), (equal, len(images))


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_the_commands_take_quantize_and_refuse_bad_values_in_one_line(trained, tmp_path, capsys):
    image = tmp_path / "a.png"
    Image.new("RGB", (16, 16), (200, 10, 10)).save(image)
    model = trained / "run"
    for command in (["caption", "--model", model, image], ["eval", "--model", model, "--data", trained / "shapes.csv"],
                    ["serve", "--model", model, "--port", "1"]):
        code, out, err = run_cli(capsys, *command, "--quantize", "int4")
        assert (code, out, err) == (2, "", "moevlm: error: --quantize int4: expected one of int8, nf4\n")
    code, _, err = run_cli(capsys, "caption", "--model", model, image, "--quantize", "nf4")
    assert code == 2 and err == ("moevlm: error: --quantize nf4 needs a CUDA device and bitsandbytes; this run is "
                                 "on cpu (--quantize int8 runs anywhere)\n")
    code, out, _ = run_cli(capsys, "caption", "--model", model, image, "--quantize", "int8", "--max-new-tokens", "4")
    assert code == 0 and out.startswith(f"{image}: ")
    code, out, _ = run_cli(capsys, "eval", "--model", model, "--data", trained / "shapes.csv", "--quantize", "int8",
                           "--json", "--max-new-tokens", "4")
    assert code == 0 and '"exact_match"' in out


def test_a_load_without_quantize_stays_float(trained):
    model, _, _ = load_model(trained / "run")
    assert type(model.decoder.lm_head) is torch.nn.Linear


def test_int8_linear_matches_f_linear_shapes_with_bias():
    layer = torch.nn.Linear(8, 5)
    int8 = Int8Linear.from_weight(layer.weight, layer.bias)
    x = torch.randn(2, 3, 8)
    assert int8(x).shape == F.linear(x, layer.weight, layer.bias).shape == (2, 3, 5)


def test_the_servers_engine_loads_quantized_on_its_own_thread(trained):
    import threading

    from moevlm.serve.engine import Engine

    engine = Engine(trained / "run", device="cpu", max_batch=2, max_queue=2, quantize="int8")
    loader = threading.Thread(target=engine.load)
    loader.start()
    loader.join()
    assert isinstance(engine.model.decoder.lm_head, Int8Linear)
    assert all(isinstance(layer, Int8MoE) for layer in engine.model.moe_layers)
