"""Compiled decoding (moevlm.compiled): the compiled step gives the eager path's greedy tokens for
both model families, MoE and dense, batched with left-padded prompts and a batch padded up to its
bucket; later calls reuse the compiled graphs; where compiling fails, one line and eager decoding.

Each compiled graph takes 10-30 s to build on a small CPU, so every model is compiled once per
module (module-scoped fixtures) at one batch bucket (4) and one length bucket (32)."""

import pytest
import torch

from moevlm import compiled
from moevlm.compiled import bucket, compiled_decoder
from moevlm.config import MoEConfig, load_config
from moevlm.generate import generate, generate_stream
from moevlm.models.factory import build_model
from moevlm.models.hf_config import resolve_pretrained
from moevlm.models.moe import MoE
from moevlm.models.quantized import Int8Linear, Int8MoE

NEVER = 10_000  # an eos id no model here generates: every row decodes all its tokens
NEW = 12


def scrambled(model):
    """Random weights far from the init, so greedy tokens vary from step to step and row to row
    (the tiny init repeats its last input token), and a wrong cache slot or mask shows."""
    torch.manual_seed(3)
    for param in model.parameters():
        if param.dim() > 1:
            torch.nn.init.normal_(param, std=0.5)
    return model.eval()


def scratch(*overrides):
    return scrambled(build_model(load_config("tiny", overrides=["decoder.vocab_size=40", *overrides]).model))


def images_for(model, rows):
    size = model.cfg.vision.image_size
    return torch.randn(rows, 3, size, size, generator=torch.Generator().manual_seed(rows))


def prompts_for(model, lengths):
    """Prompts of the given text lengths (bucket padding and left padding), image ids first for a
    model that takes them in the text."""
    image = [model.image_token_id] * model.num_image_tokens if model.images_in_text else []
    return [image + [1] + [(5 + 7 * row + i) % 30 + 4 for i in range(n)] for row, n in enumerate(lengths)]


def compiled_and_eager(model, lengths):
    images, prompts = images_for(model, len(lengths)), prompts_for(model, lengths)
    options = dict(eos_id=NEVER, pad_id=0, max_new_tokens=NEW)
    return generate(model, images, prompts, compile=True, **options), generate(model, images, prompts, **options)


@pytest.fixture(scope="module")
def moe_model():
    model = scratch()  # llama arch, MoE layers 0 and 1, swiglu experts
    return model, compiled_and_eager(model, [5, 1, 3])


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory):
    from pretrained_fixtures import tiny_llama

    folder = tiny_llama(tmp_path_factory.mktemp("compiled") / "llama")
    config = load_config("tiny", overrides=[f"model.lm=hf:{folder}", "moe.layers=all"])
    model = scrambled(build_model(resolve_pretrained(config.model)))
    return model, compiled_and_eager(model, [2, 6, 4])


def test_scratch_moe_compiled_tokens_equal_eager_with_left_padding_and_a_padded_bucket(moe_model):
    model, (fast, eager) = moe_model
    assert fast == eager
    assert all(len(row) == NEW for row in fast) and len({tuple(row) for row in fast}) == 3
    assert len(set(fast[0])) > 3  # the tokens change from step to step
    assert set(compiled_decoder(model).compile_seconds) == {(4, 32)}  # 3 rows padded to the bucket of 4
    assert compiled_decoder(model).eager_reason is None
    assert compiled_decoder(model).prefill_graph is not None  # it compiled (a failure leaves it None)


def test_later_calls_in_the_same_buckets_reuse_the_compiled_graph(moe_model):
    model, _ = moe_model
    decoder = compiled_decoder(model)
    before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    fast, eager = compiled_and_eager(model, [2, 7, 1, 4])  # 4 rows, prompts 8 wide not 6: the same buckets
    assert fast == eager
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == before
    assert compiled_decoder(model) is decoder and set(decoder.compile_seconds) == {(4, 32)}


def test_greedy_runs_several_steps_per_call_and_stops_rows_at_their_end_token(moe_model, monkeypatch):
    model, (_, eager) = moe_model
    decoder = compiled_decoder(model)
    calls = []
    for name in ("run_greedy", "run_argmax"):
        method = getattr(decoder, name)
        monkeypatch.setattr(decoder, name,
                            lambda buffers, name=name, method=method: calls.append(name) or method(buffers))
    images, prompts = images_for(model, 3), prompts_for(model, [5, 1, 3])
    fast = generate(model, images, prompts, eos_id=NEVER, pad_id=0, max_new_tokens=NEW, compile=True)
    # The first token comes with the prefill, the next 8 four per call, the last 3 one per call.
    assert decoder.steps_per_call == compiled.GREEDY_STEPS == 4
    assert fast == eager and calls == ["run_greedy"] * 2 + ["run_argmax"] * 3
    end = eager[1][4]  # a token that ends row 1 at its fifth token and the other rows where they have it
    options = dict(eos_id=end, pad_id=0, max_new_tokens=NEW)
    fast, slow = generate(model, images, prompts, compile=True, **options), generate(model, images, prompts, **options)
    assert fast == slow and len(fast[1]) <= 4 and len({len(row) for row in fast}) > 1
    # The streams themselves: pad_id after a row's end token, and no step once every row has ended.
    fast = torch.stack(list(generate_stream(model, images, prompts, compile=True, **options)))
    slow = torch.stack(list(generate_stream(model, images, prompts, **options)))
    assert fast.equal(slow) and int((fast == 0).sum()) > 0


def test_sampling_calls_the_one_step_graph_and_top_1_is_greedy(moe_model):
    model, (_, eager) = moe_model
    images, prompts = images_for(model, 3), prompts_for(model, [5, 1, 3])
    sampled = generate(model, images, prompts, eos_id=NEVER, pad_id=0, max_new_tokens=NEW, compile=True,
                       temperature=1.0, top_k=1, seed=0)
    assert sampled == eager and compiled_decoder(model).eager_reason is None


def test_a_dense_gpt_decoder_compiled_tokens_equal_eager(monkeypatch):
    # As a model of SMALL_MODEL parameters or more: greedy decoding calls the one-step graph, no other.
    monkeypatch.setattr(compiled, "SMALL_MODEL", 1)
    model = scratch("decoder.arch=gpt", "moe.layers=none")  # LayerNorm, learned positions, GELU MLPs
    fast, eager = compiled_and_eager(model, [4, 2, 6])
    assert fast == eager and len({tuple(row) for row in fast}) == 3
    decoder = compiled_decoder(model)
    assert decoder.eager_reason is None and decoder.steps_per_call == 1 and decoder.greedy_steps is None


def test_one_row_picks_its_experts_in_place_and_equals_eager():
    # One row: 2 assignments < 4 experts, so each picked expert's weights are read in place at an index
    # the graph reads with .item() (MoE.expert_weights); gpt arch: GELU experts with biases.
    model = scratch("decoder.arch=gpt")
    fast, eager = compiled_and_eager(model, [5])
    assert fast == eager and len(set(fast[0])) > 3
    decoder = compiled_decoder(model)
    assert decoder.eager_reason is None and set(decoder.compile_seconds) == {(1, 32)}


def test_a_transformers_lm_with_moe_layers_compiled_tokens_equal_eager(hf_model):
    model, (fast, eager) = hf_model
    assert model.moe_layers and fast == eager
    assert compiled_decoder(model).prefill_graph is None  # transformers LMs prefill eagerly
    assert len({tuple(row) for row in fast}) == 3 and len(set(fast[0])) > 3
    assert compiled_decoder(model).eager_reason is None
    fast, eager = compiled_and_eager(model, [1, 3, 5, 2])  # the same graph, its cache reused
    assert fast == eager and set(compiled_decoder(model).compile_seconds) == {(4, 32)}


def test_int8_weights_compiled_tokens_equal_eager_int8():
    from moevlm.models.quantized import quantize_model

    model = quantize_model(scratch("moe.layers=[1]"), "int8", torch.device("cpu"))
    # Both run every int8 layer and expert through the same CPU kernel on bf16-rounded activations; only
    # the float work around them (norms, attention) is fused, as in float compiled decoding.
    for lengths in ([3, 1], [4]):  # 2 rows: every expert on every row; 1 row: the experts picked
        fast, eager = compiled_and_eager(model, lengths)
        assert fast == eager and len(set(fast[0])) > 3
    assert compiled_decoder(model).eager_reason is None and set(compiled_decoder(model).compile_seconds) == {
        (2, 32), (1, 32)}


def test_int8_layers_stay_one_kernel_call_each_in_the_compiled_graph():
    """Inductor keeps ``_weight_int8pack_mm`` as a call on the int8 weights (not a dequantize + matmul),
    for a padded Int8Linear and for Int8MoE's static paths (experts picked in place at 1 row, all at 3)."""
    from torch._inductor.utils import run_and_get_code

    moe = MoE(32, 64, MoEConfig(num_experts=4, top_k=2)).eval()
    for param in moe.parameters():
        torch.nn.init.normal_(param, std=0.3)
    moe = Int8MoE.convert(moe)
    linear = Int8Linear.from_weight(torch.randn(48, 40))  # width 40: padded to 48

    def step(x_ND):
        y = torch.cat([moe.experts_static(x, *moe.route(x)[1:]) for x in (x_ND[:1], x_ND)])
        return linear(torch.cat([y, y[:, :8]], 1))

    x = torch.randn(3, 32)
    with torch.inference_mode():
        out, (code,) = run_and_get_code(torch.compile(step, fullgraph=True, dynamic=False), x)
        torch.testing.assert_close(out, step(x))
    assert code.count("extern_kernels._weight_int8pack_mm(") == 2 * 2 + 2 * 4 + 1
    assert "bmm(" not in code and code.count("extern_kernels.mm(") == 2  # the two float router calls
    # The row's two picked experts read in place, at an index the graph reads (no copy of their int8 rows).
    assert code.count(".item()") == 2


def test_graphs_of_many_layers_build_the_cpp_wrapper_apart(monkeypatch):
    """More than SEPARATE_WRAPPER_LAYERS layers in a graph (a greedy graph counts each layer once per step):
    the C++ wrapper is built apart at -O1, as gcc's -O3 on a long wrapper takes minutes."""
    seen = []
    monkeypatch.setattr(torch, "compile", lambda step, **kw: seen.append(
        (step.__name__, kw["options"]["cpp_wrapper_build_separate"])) or step)
    most = compiled.SEPARATE_WRAPPER_LAYERS // compiled.GREEDY_STEPS
    for depth in (most, most + 1):
        compiled.CompiledDecoder(scratch("decoder.arch=gpt", "moe.layers=none", f"decoder.depth={depth}"))
    assert seen == [("decode_step", False), ("_greedy_steps", False), ("prefill", False),
                    ("decode_step", False), ("_greedy_steps", True), ("prefill", False)]


def test_a_wrapper_built_apart_gives_the_same_tokens(monkeypatch):
    monkeypatch.setattr(compiled, "SEPARATE_WRAPPER_LAYERS", 0)  # every graph of this small model
    model = scratch("moe.layers=[1]")
    fast, eager = compiled_and_eager(model, [5])  # one row: its experts picked in place
    assert fast == eager and len(set(fast[0])) > 3 and compiled_decoder(model).eager_reason is None


def test_buckets_are_powers_of_two_at_or_above_the_floor():
    assert [bucket(n) for n in (1, 2, 3, 4, 5, 8, 9)] == [1, 2, 4, 4, 8, 8, 16]
    assert bucket(5, 32) == 32 and bucket(33, 32) == 64


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
@pytest.mark.parametrize("tokens", [1, 5])  # 2 assignments < 4 experts: picked one by one; 10: all experts
def test_static_experts_equal_the_per_token_reference(activation, tokens):
    moe = MoE(8, 16, MoEConfig(num_experts=4, top_k=2, activation=activation)).eval()
    for param in moe.parameters():
        torch.nn.init.normal_(param, std=0.3)
    x = torch.randn(tokens, 8)
    _, experts, weights = moe.route(x)
    torch.testing.assert_close(moe.experts_static(x, experts, weights), moe.experts_reference(x, experts, weights))
    int8 = Int8MoE.convert(moe)
    static = int8.experts_static(x, experts, weights)
    # Each matmul as eager int8 decoding takes it: swiglu's second one (width 16) through the bf16 CPU kernel.
    torch.testing.assert_close(static, int8.compute_experts(x, experts, weights, None), rtol=0, atol=0)
    reference = int8.experts_reference(x, experts, weights)
    assert float((static - reference).abs().max()) <= 2 ** -7 * float(reference.abs().max())


def failing_compile(step, device, layers):
    def compiled_step(*args):
        raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found in torch._inductor.config.cpp.cxx\n"
                           "(more detail on the next lines)")
    return compiled_step


@pytest.mark.parametrize("where", ["first call", "torch.compile"])
def test_without_a_compiler_it_says_so_in_one_line_and_decodes_eagerly(where, monkeypatch, capsys):
    def refused(step, device, layers):
        raise RuntimeError("torch.compile is not supported on this platform")

    monkeypatch.setattr(compiled, "_compile", failing_compile if where == "first call" else refused)
    model = scratch("moe.layers=[1]")
    fast, eager = compiled_and_eager(model, [3, 1, 2])
    assert fast == eager
    reason = ("RuntimeError: InvalidCxxCompiler: No working C++ compiler found in torch._inductor.config.cpp.cxx"
              if where == "first call" else "RuntimeError: torch.compile is not supported on this platform")
    assert capsys.readouterr().err == f"moevlm: compiled decoding unavailable ({reason}); decoding eagerly\n"
    assert compiled_and_eager(model, [2, 2])[0] == compiled_and_eager(model, [2, 2])[1]
    assert capsys.readouterr().err == ""  # said once per model


def test_caption_and_eval_pass_compile_on(tmp_path, monkeypatch):
    from moevlm import checkpoint
    from moevlm import evaluate as evaluate_module
    from moevlm import generate as generate_module
    from moevlm.cli import main

    seen = []
    monkeypatch.setattr(checkpoint, "resolve_checkpoint", lambda model, which: (model, None))
    monkeypatch.setattr(generate_module, "caption_files",
                        lambda *args, **kwargs: seen.append(("caption", kwargs)) or [])
    monkeypatch.setattr(evaluate_module, "evaluate_file",
                        lambda *args, **kwargs: seen.append(("eval", kwargs)) or {"num_samples": 0})
    for flags in ([], ["--compile"]):
        assert main(["caption", "--model", str(tmp_path), str(tmp_path / "a.png"), *flags]) == 0
        assert main(["eval", "--model", str(tmp_path), "--data", str(tmp_path / "a.csv"), "--json", *flags]) == 0
    assert [(command, kwargs["compile"]) for command, kwargs in seen] == [
        ("caption", False), ("eval", False), ("caption", True), ("eval", True)]
