"""``moevlm bench``: the scenarios (an MoE layer against a dense FFN and against transformers'
Mixtral block, a training step, generation) timed with ``bench/harness.py`` against this machine's
own matmul rate.
"""

from __future__ import annotations

import base64
import io
import resource
import statistics
import tempfile
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode, flop_registry, register_flop_formula

from moevlm.bench.harness import device_name, gemm_gflops, seconds, time_ratio
from moevlm.config import Config, MoEConfig, load_config
from moevlm.data.records import Sample
from moevlm.data.tokenizer import Tokenizer
from moevlm.data.training_data import dataset_for
from moevlm.generate import generate
from moevlm.models.mlp import FeedForward
from moevlm.models.moe import MoE
from moevlm.models.vlm import VLM
from moevlm.train.tracking import Tracker
from moevlm.train.trainer import Trainer

# (tokens, width, expert hidden, experts, k): a seed-preset decoder layer's batch, and two
# wider layers.
MOE_SHAPES = [(528, 128, 512, 8, 2), (2048, 256, 1024, 8, 2), (4096, 512, 1408, 8, 2)]
GEN_NEW_TOKENS = 128
# --quick: a smoke run in seconds (does everything once, on tiny sizes); its figures mean nothing.
QUICK_SHAPES = [(64, 16, 32, 4, 2)]
QUICK_NEW_TOKENS = 8


def _shape_key(shape: tuple[int, ...]) -> str:
    return "x".join(map(str, shape))


def _forward_backward(module: torch.nn.Module, x: torch.Tensor, grad: torch.Tensor) -> Callable[[], None]:
    def run():
        module.zero_grad(set_to_none=True)
        module(x).backward(grad)
    return run


def moe_vs_dense(device: torch.device, shapes=MOE_SHAPES, rounds: int = 5) -> dict[str, float]:
    """One training-mode MoE layer (gelu experts) / a dense GELU FFN of hidden k*H, fwd+bwd."""
    ratios = {}
    for shape in shapes:
        tokens, width, hidden, experts, k = shape
        torch.manual_seed(0)
        moe = MoE(width, hidden, MoEConfig(num_experts=experts, top_k=k)).to(device).train()
        for param in (moe.w1_EDF, moe.w2_EHD, moe.gate.weight):
            torch.nn.init.normal_(param, std=0.02)
        dense = FeedForward(width, k * hidden).to(device).train()
        x = torch.randn(1, tokens, width, device=device, requires_grad=True)
        grad = torch.randn_like(x)
        ratios[_shape_key(shape)] = time_ratio(_forward_backward(moe, x, grad), _forward_backward(dense, x, grad),
                                               device, rounds)
    return ratios


def _mixtral_block(width: int, hidden: int, experts: int, k: int):
    # Lazy: transformers takes seconds to import.
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    config = MixtralConfig(hidden_size=width, intermediate_size=hidden, num_local_experts=experts,
                           num_experts_per_tok=k, router_jitter_noise=0.0)
    config._experts_implementation = "eager"
    return MixtralSparseMoeBlock(config)


def moe_like_mixtral(block, hidden: int) -> MoE:
    """Our MoE with swiglu experts holding a Mixtral block's weights."""
    experts = block.experts
    E, width = experts.down_proj.shape[:2]
    moe = MoE(width, hidden, MoEConfig(num_experts=E, top_k=block.top_k, activation="swiglu", router_noise=False))
    with torch.no_grad():
        moe.gate.weight.copy_(block.gate.weight)
        moe.w1_EDF.copy_(experts.gate_up_proj.transpose(1, 2))  # (E, 2H, D) -> (E, D, 2H), gate then up
        moe.w2_EHD.copy_(experts.down_proj.transpose(1, 2))  # (E, D, H) -> (E, H, D)
    return moe


def moe_vs_mixtral(device: torch.device, shapes=MOE_SHAPES, rounds: int = 5) -> tuple[dict[str, float], float]:
    """Our swiglu MoE / transformers' MixtralSparseMoeBlock with the same weights, fwd+bwd;
    and the largest difference between their outputs."""
    ratios, worst = {}, 0.0
    for shape in shapes:
        tokens, width, hidden, experts, k = shape
        torch.manual_seed(0)
        block = _mixtral_block(width, hidden, experts, k)
        for param in block.parameters():
            torch.nn.init.normal_(param, std=0.02)
        ours = moe_like_mixtral(block, hidden).to(device).train()
        block = block.to(device).train()
        x = torch.randn(1, tokens, width, device=device, requires_grad=True)
        with torch.no_grad():
            worst = max(worst, float((ours(x) - block(x)).abs().max()))
        grad = torch.randn_like(x)
        ratios[_shape_key(shape)] = time_ratio(_forward_backward(ours, x, grad), _forward_backward(block, x, grad),
                                               device, rounds)
    return ratios, worst


def _random_samples(count: int, size: int, max_chars: int, seed: int = 0) -> list[Sample]:
    rng = np.random.default_rng(seed)
    words = ["red", "blue", "cat", "dog", "a", "on", "the", "small", "big", "tree", "house", "two"]
    samples = []
    for row in range(count):
        image = Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        caption = " ".join(rng.choice(words, 12))[:max_chars].strip()
        samples.append(Sample(base64.b64encode(buffer.getvalue()).decode(), [("", caption)], "bench", row + 1))
    return samples


def train_step(config: Config, device: torch.device, steps: int = 10, warmup: int = 3) -> dict[str, float]:
    """Trainer.train_step on synthetic captions of at most 32 characters, data loading included."""
    vision = config.model.vision
    max_chars = min(32, config.model.decoder.max_text_len - 2)  # <bos> and <eos> count too
    samples = _random_samples(4 * config.train.batch_size, vision.image_size, max_chars)
    tokenizer = Tokenizer.train([s.turns[0][1] for s in samples], config.model.tokenizer.kind,
                                config.model.tokenizer.vocab_size)
    config = config.updated({"model.decoder.vocab_size": tokenizer.vocab_size, "train.device": str(device)})
    torch.manual_seed(0)
    model = VLM(config.model)
    with tempfile.TemporaryDirectory() as out:
        trainer = Trainer(config, model, tokenizer, dataset_for(samples, tokenizer, config, augment=None), None,
                          out, Tracker(out, None, enabled=False), progress=False)
        batches = trainer.batches()
        tokens = []
        times = seconds(lambda: tokens.append(trainer.train_step(batches)["tokens"]), device, steps, warmup)
    step_s = statistics.median(times)
    batch = {name: value.to(device) for name, value in next(batches).items()}
    model.train()
    with FlopCounterMode(display=False) as counter, torch.autocast(
            device.type, dtype=trainer.amp_dtype or torch.float32, enabled=trainer.amp_dtype is not None):
        model(batch["images"], batch["input_ids"], batch["attention_mask"], batch["labels"]).loss.backward()
    model.zero_grad(set_to_none=True)
    return {"train_step_s": step_s, "train_tokens_per_s": statistics.median(tokens) / step_s,
            "train_model_gflop": counter.get_total_flops() / 1e9,
            "train_params_m": sum(p.numel() for p in model.parameters()) / 1e6}


def generation(device: torch.device, preset: str = "seed", new_tokens: int = GEN_NEW_TOKENS,
               compiled: bool = True) -> dict:
    """Greedy decoding of ``new_tokens`` after <bos> (the preset's text length raised to fit),
    with the KV cache and without it, and (``compiled``) with the compiled step (moevlm.compiled),
    whose first call per batch size, compiling included, is timed on its own; all must give the
    same tokens."""
    config = load_config(preset, None, [f"decoder.max_text_len={new_tokens + 2}", "decoder.vocab_size=64"])
    torch.manual_seed(0)
    model = VLM(config.model).to(device).eval()
    vision = config.model.vision
    modes = {"cached": dict(use_cache=True), "uncached": dict(use_cache=False)}
    if compiled:
        modes["compiled"] = dict(compile=True)
    rates, outputs, first_call = {}, {}, {}
    for batch in (1, 8):
        images = torch.randn(batch, vision.channels, vision.image_size, vision.image_size, device=device)
        prompts = [[Tokenizer.bos_id]] * batch
        for mode, options in modes.items():
            def run():
                outputs[batch, mode] = generate(model, images, prompts, eos_id=-1, pad_id=Tokenizer.pad_id,
                                                max_new_tokens=new_tokens, **options)
            if mode == "compiled":
                first_call[batch] = seconds(run, device, repeat=1, warmup=0)[0]
            rates[batch, mode] = batch * new_tokens / statistics.median(
                seconds(run, device, repeat=1 if mode == "uncached" else 3, warmup=1))
    result = {"gen_tokens_per_s": {"batch1": rates[1, "cached"], "batch8": rates[8, "cached"]},
              "gen_cache_speedup": rates[1, "cached"] / rates[1, "uncached"],
              "gen_cached_equals_uncached": all(outputs[b, "cached"] == outputs[b, "uncached"] for b in (1, 8))}
    if compiled:
        result |= {"gen_compiled_tokens_per_s": {f"batch{b}": rates[b, "compiled"] for b in (1, 8)},
                   "gen_compiled_speedup": {f"batch{b}": rates[b, "compiled"] / rates[b, "cached"] for b in (1, 8)},
                   "gen_compile_first_call_s": {f"batch{b}": first_call[b] for b in (1, 8)},
                   "gen_compiled_equals_eager": all(outputs[b, "compiled"] == outputs[b, "cached"] for b in (1, 8))}
    return result


def _grouped_mm_flop(a_shape, b_shape, *args, **kwargs) -> int:
    # (A, I) x (E, I, O) and the weight-gradient form (I, A) x (A, O) both do 2*A*I*O.
    return 2 * int(np.prod(a_shape)) * b_shape[-1]


def count_grouped_mm_flops() -> None:
    """Teach FlopCounterMode the MoE's grouped matmul (torch does not count it), once per process."""
    if torch.ops.aten._grouped_mm not in flop_registry:
        register_flop_formula(torch.ops.aten._grouped_mm)(_grouped_mm_flop)


def run_bench(quick: bool = False) -> dict:
    """CPU figures (fp32, the ``seed`` preset), and bf16 figures on a GPU when there is one."""
    count_grouped_mm_flops()
    device = torch.device("cpu")
    shapes, rounds = (QUICK_SHAPES, 1) if quick else (MOE_SHAPES, 5)
    result: dict = {"device": device_name(device), "torch": torch.__version__}
    result["gemm_gflops"] = gemm_gflops(device, size=256 if quick else 2048)
    config = load_config("tiny" if quick else "seed", None, [])
    result |= train_step(config, device, steps=1 if quick else 10, warmup=1 if quick else 3)
    result["train_flop_util"] = result["train_model_gflop"] / result["train_step_s"] / result["gemm_gflops"]
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
    result["moe_vs_dense"] = moe_vs_dense(device, shapes, rounds)
    result["moe_vs_mixtral"], result["moe_mixtral_max_abs_diff"] = moe_vs_mixtral(device, shapes, rounds)
    # Compiling takes tens of seconds per batch size: not in a --quick run.
    result |= generation(device, "tiny" if quick else "seed", QUICK_NEW_TOKENS if quick else GEN_NEW_TOKENS,
                         compiled=not quick)
    if torch.cuda.is_available() and not quick:
        result["gpu"] = run_gpu_bench(torch.device("cuda"))
    return result


def run_gpu_bench(device: torch.device) -> dict:
    """bf16 figures for the ~100M-parameter ``base`` preset against the card's bf16 matmul rate."""
    result = {"device": device_name(device), "gemm_gflops_bf16": gemm_gflops(device, torch.bfloat16, 8192)}
    result |= train_step(load_config("base", None, ["train.precision=bf16"]), device)
    result["train_mfu"] = result["train_model_gflop"] / result["train_step_s"] / result["gemm_gflops_bf16"]
    result["moe_vs_dense"] = moe_vs_dense(device)
    return result


