"""``moevlm plan --device cpu`` against the measured peak memory of real training steps on this machine.

Each shape trains in a fresh process: random weights (pretrained parts built from their config.json
alone), its stage's parameters frozen, fp32 AdamW as the trainer builds it, rows of the planned length,
two steps (forward, backward, clipping, optimizer step; the second one runs with the optimizer state
in place). Its peak is the peak resident size (VmHWM, which ``resource.getrusage`` reports as maxrss)
minus the resident size after the imports, the peak mark reset there (``resident_baseline``); the plan's figure
is the one-process, no-checkpointing row of ``make_plan(..., device="cpu")``.

    flock /tmp/moevlm-heavy.lock timeout 1800 python benchmarks/plan_check.py [--shapes tiny default smollm2]
        [--checkpointing none full selective]

Shapes: ``tiny`` and ``default`` (their presets, at their own batch and longest row) and ``smollm2``: a
SmolLM2-360M-shaped Llama (960 wide, 32 layers, 15 heads, 5 key/value heads, MLP 2,560, vocabulary
49,152, tied) with a SigLIP-base-patch16-224-shaped tower, stage instruct, rows of 1,024 tokens.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the real shapes
from pretrained_fixtures import SIGLIP_BASE_224, SMOLLM2_360M  # noqa: E402


def write_sources(folder: Path) -> tuple[str, str]:
    """config.json-only folders of the two pretrained parts (no weights: the plan never reads any)."""
    from transformers import LlamaConfig, SiglipVisionConfig

    LlamaConfig(**SMOLLM2_360M).save_pretrained(folder / "lm")
    SiglipVisionConfig(**SIGLIP_BASE_224).save_pretrained(folder / "vision")
    return str(folder / "lm"), str(folder / "vision")


def shapes(sources: tuple[str, str], batch: int) -> dict[str, dict]:
    lm, vision = sources
    return {
        # Not a check: what the plan's CPU_RUNTIME constant comes from (it has next to no tensors).
        "runtime": {"preset": "tiny", "seq_len": None,
                    "overrides": ["decoder.width=8", "decoder.heads=1", "decoder.depth=1", "vision.width=8",
                                  "vision.heads=1", "train.batch_size=1", "decoder.max_text_len=4"]},
        "tiny": {"preset": "tiny", "overrides": [], "seq_len": None},
        "default": {"preset": "default", "overrides": [], "seq_len": None},
        "smollm2": {"preset": "llava", "seq_len": 1024,
                    "overrides": [f"model.lm=hf:{lm}", f"model.vision=hf:{vision}", "train.stage=instruct",
                                  f"train.batch_size={batch}", "decoder.max_text_len=828"]},
    }


def recompute(model, mode: str) -> None:
    """``train.activation_checkpointing`` as the plan counts it: every block of every stack (full) or each
    block's feed-forward (selective) runs under non-reentrant ``torch.utils.checkpoint`` where a
    gradient passes through it."""
    import torch
    from torch.utils.checkpoint import checkpoint

    from moevlm.train.distributed import repeated_blocks

    blocks = repeated_blocks(model)
    modules = blocks if mode == "full" else [getattr(b, "mlp", None) or b.ffn for b in blocks]
    for module in modules if mode != "none" else []:
        def forward(*args, _forward=module.forward, **kwargs):
            if torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in args):
                return checkpoint(_forward, *args, use_reentrant=False, **kwargs)
            return _forward(*args, **kwargs)

        module.forward = forward


def measure(preset: str, overrides: list[str], seq_len: int | None, checkpointing: str = "none",
            steps: int = 2) -> dict:
    """Peak resident memory above the imports' of ``steps`` training steps (run in a fresh process)."""
    import torch

    from moevlm.config import load_config
    from moevlm.models.factory import build_model
    from moevlm.plan.activations import row_shape
    from moevlm.plan.memory import planned_config
    from moevlm.train.optimizer import build_optimizer
    from moevlm.train.stages import freeze_for_stage

    torch.set_num_threads(1)
    config = planned_config(load_config(preset, overrides=overrides + ["train.device=cpu"]))
    import torch.utils.checkpoint  # noqa: F401  (imported before the baseline: its import is not the step's)
    baseline = resident_baseline()
    torch.manual_seed(0)
    model = build_model(config.model, load_weights=False)
    model.train()
    recompute(model, checkpointing)
    optimizer = build_optimizer(freeze_for_stage(model, config.train), config.train)
    shape = row_shape(config, seq_len)
    batch, n_image = config.train.batch_size, shape.image_tokens
    text = shape.decoder_tokens - (0 if model.images_in_text else n_image)
    vocab = config.model.decoder.vocab_size
    size = config.model.vision.image_size
    for _ in range(steps):
        ids = torch.randint(0, vocab, (batch, text))
        labels = ids.clone()
        if model.images_in_text:
            ids[:, :n_image] = config.model.decoder.image_token_id
            labels[:, :n_image] = -100
        images = torch.rand(batch, config.model.vision.channels, size, size) * 2 - 1
        out = model(images, ids, torch.ones_like(ids, dtype=torch.bool), labels)
        out.loss.backward()
        del out
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return {"measured": (status_kib("VmHWM") - baseline) * 1024}


def status_kib(key: str) -> int:
    with open("/proc/self/status") as status:
        return int(next(line for line in status if line.startswith(key + ":")).split()[1])


def resident_baseline() -> int:
    """Resident KiB after the imports, with the peak mark reset to it: free heap handed back first, and
    the mark (VmHWM, what ru_maxrss reports) moved down to the present, or the steps would first refill
    memory the imports once touched and the peak would not show them."""
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")  # Linux: reset the peak resident size to the current one
    return status_kib("VmRSS")


def planned(preset: str, overrides: list[str], seq_len: int | None, checkpointing: str = "none") -> dict:
    from moevlm.config import load_config
    from moevlm.plan import make_plan

    plan = make_plan(load_config(preset, overrides=overrides), 1, 1 << 50, device="cpu", seq_len=seq_len)
    row = next(r for r in plan.rows if r.checkpointing == checkpointing)
    return {"planned": row.peak, "params": plan.counts.params, "trainable": plan.counts.trainable,
            "batch": plan.batch_per_rank, "seq_len": plan.seq_len}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", default=["runtime", "tiny", "default", "smollm2"])
    parser.add_argument("--smollm2-batch", type=int, default=2, help="rows per step at the SmolLM2 shape")
    parser.add_argument("--checkpointing", nargs="+", default=["none"], choices=["none", "full", "selective"],
                        help="activation checkpointing modes to check (emulated here with torch.utils.checkpoint "
                             "on every block or every feed-forward, as train.activation_checkpointing applies it)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(**json.loads(args.child))))
        return
    with tempfile.TemporaryDirectory() as folder:
        table = shapes(write_sources(Path(folder)), args.smollm2_batch)
        print("| shape | parameters (trainable) | rows x tokens | checkpointing | planned GiB | measured GiB | error |")
        print("|---|---|---|---|---|---|---|")
        for name, mode in [(name, mode) for name in args.shapes for mode in args.checkpointing]:
            spec = table[name] | {"checkpointing": mode}
            plan = planned(**spec)
            done = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True,
                                  text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
            if done.returncode != 0:
                sys.exit(f"{name} failed:\n{done.stderr.strip()}")
            measured = json.loads(done.stdout.strip().splitlines()[-1])["measured"]
            error = plan["planned"] / measured - 1
            print(f"| {name} | {plan['params']:,} ({plan['trainable']:,}) | {plan['batch']} x {plan['seq_len']} | "
                  f"{mode} | {plan['planned'] / 2**30:.3f} | {measured / 2**30:.3f} | {error:+.0%} |", flush=True)


if __name__ == "__main__":
    main()
