"""The CUDA paths in one run, with figures: torch._grouped_mm against the per-token reference (bf16,
forward and backward), training-step speed of the `base` preset in both architectures, the demo
trained on the GPU, and its export run by transformers (bf16 against fp32, tokens/s); vLLM if it
is installed.

    python benchmarks/gpu_check.py --out DIR [--device cuda] [--demo-steps 2000] [--quick]

Writes DIR/gpu_check.json. With --quick --device cpu it runs in a minute, to check the script.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from moevlm.bench.scenarios import gemm_gflops, train_step
from moevlm.config import load_config
from moevlm.data.digits import write_digit_scenes
from moevlm.demo import DEMO_OVERRIDES, SCENE_SIZE, SCENE_SNAP
from moevlm.models.grouped import grouped_mm_supported
from moevlm.models.moe import MoE

LLAMA_SIGLIP = ["decoder.arch=llama", "vision.arch=siglip", "vision.image_tokens=patches"]


def grouped_vs_reference(device: torch.device) -> dict:
    """MoE swiglu experts: the grouped path (torch._grouped_mm where it runs) against the plain loop."""
    torch.manual_seed(0)
    cfg = load_config("tiny", overrides=["moe.activation=swiglu", "moe.num_experts=8"]).model.decoder.moe
    moe = MoE(256, 512, cfg).to(device)
    x = torch.randn(1024, 256, device=device)
    with torch.no_grad():
        _, experts, weights = moe.route(x)
    result = {"grouped_mm_bf16": grouped_mm_supported(device.type, torch.bfloat16)}
    for dtype in (torch.float32, torch.bfloat16):
        moe_d = moe.to(dtype)
        xd = x.to(dtype).detach().clone().requires_grad_(True)
        fast = moe_d.experts_sorted(xd, experts, weights.to(dtype), use_grouped=dtype == torch.bfloat16
                                    and result["grouped_mm_bf16"])
        (fast.float().square().sum()).backward()
        fast_grad, w1_grad = xd.grad.clone(), moe_d.w1_EDF.grad.clone()
        xd.grad, moe_d.w1_EDF.grad = None, None
        ref = moe_d.experts_reference(xd[:64].float().to(dtype), experts[:64], weights[:64].to(dtype))
        result[f"max_abs_diff_forward_{str(dtype)[6:]}"] = float((fast[:64] - ref).detach().abs().max())
        finite = torch.isfinite(fast_grad).all() and torch.isfinite(w1_grad).all()
        result[f"grad_finite_{str(dtype)[6:]}"] = bool(finite)
        moe_d.zero_grad(set_to_none=True)
    moe.float()
    return result


def demo_on_device(root: Path, device: torch.device, steps: int) -> tuple[dict, Path, Path]:
    from moevlm.train.run import run_training

    train_csv, val_csv = write_digit_scenes(root / "data", num_train=6000, num_val=500, seed=0, size=SCENE_SIZE,
                                            snap=SCENE_SNAP, packed=True)
    overrides = DEMO_OVERRIDES + LLAMA_SIGLIP + [f"train.device={device}", f"train.max_steps={steps}",
                                                  f"train.eval_every={steps}", f"train.checkpoint_every={steps}"]
    config = load_config("default", overrides=overrides)
    start = time.perf_counter()
    _, result = run_training(config, train_csv, root / "model", val_data=val_csv, tracking=False, progress=False)
    return ({"demo_steps": steps, "demo_seconds": round(time.perf_counter() - start, 1),
             "demo_exact_match": result["exact_match"], "demo_bleu4": result["bleu4"]}, root / "model", val_csv)


def transformers_on_export(model_dir: Path, val_csv: Path, out: Path, device: torch.device, rows: int) -> dict:
    import csv

    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from moevlm.export.hf import export_hf
    from moevlm.generate import caption_files

    export_hf(model_dir, out)
    with open(val_csv, newline="") as f:
        paths = [val_csv.parent / row["image"] for row in csv.DictReader(f)][:rows]
    try:
        processor = AutoProcessor.from_pretrained(out, backend="pil")
    except (TypeError, ValueError):  # transformers before the backend argument
        processor = AutoProcessor.from_pretrained(out, use_fast=False)
    text = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}]}], add_generation_prompt=True)
    outputs, seconds = {}, {}
    for dtype in (torch.float32, torch.bfloat16):
        model = AutoModelForImageTextToText.from_pretrained(out, dtype=dtype).to(device).eval()
        tokens, start = [], time.perf_counter()
        for begin in range(0, len(paths), 100):
            chunk = paths[begin:begin + 100]
            inputs = processor(images=[Image.open(p) for p in chunk], text=[text] * len(chunk), return_tensors="pt",
                               padding=True).to(device)
            inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
            with torch.no_grad():
                ids = model.generate(**inputs, max_new_tokens=16, do_sample=False)
            tokens += ids[:, inputs["input_ids"].shape[1]:].tolist()
        seconds[str(dtype)[6:]] = time.perf_counter() - start
        outputs[str(dtype)[6:]] = [processor.decode(t, skip_special_tokens=True) for t in tokens]
    ours = [text for _, text in caption_files(model_dir, paths, device=str(device), max_new_tokens=16, batch_size=100)]
    ours_cpu = [text for _, text in caption_files(model_dir, paths, device="cpu", max_new_tokens=16, batch_size=100)]
    new_tokens = sum(len(processor.tokenizer.encode(t)) + 1 for t in outputs["bfloat16"])
    share = lambda a, b: sum(x == y for x, y in zip(a, b)) / len(a)  # noqa: E731
    return {"export_rows": len(paths),
            "hf_fp32_equals_moevlm_cpu_fp32": share(outputs["float32"], ours_cpu),
            "hf_bf16_equals_hf_fp32": share(outputs["bfloat16"], outputs["float32"]),
            "moevlm_device_equals_moevlm_cpu_fp32": share(ours, ours_cpu),
            "hf_bf16_new_tokens_per_s": round(new_tokens / seconds["bfloat16"], 1),
            "hf_seconds": {k: round(v, 2) for k, v in seconds.items()}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--demo-steps", type=int, default=2000)
    parser.add_argument("--quick", action="store_true", help="small sizes, to check the script on a CPU")
    args = parser.parse_args()
    device = torch.device(args.device)
    args.out.mkdir(parents=True, exist_ok=True)
    import transformers

    result: dict = {"torch": torch.__version__, "transformers": transformers.__version__,
                    "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}

    def record(name: str, fn) -> None:
        start = time.perf_counter()
        try:
            result[name] = fn()
        except Exception as err:  # noqa: BLE001  (one failing check must not hide the others' figures)
            result[name] = {"error": f"{type(err).__name__}: {err}"[:500]}
        print(name, round(time.perf_counter() - start, 1), "s:", json.dumps(result[name]), flush=True)
        (args.out / "gpu_check.json").write_text(json.dumps(result, indent=1))

    record("grouped_mm", lambda: grouped_vs_reference(device))
    if not args.quick:
        record("gemm_gflops_bf16", lambda: gemm_gflops(device, torch.bfloat16, 8192))
        for name, extra in (("gpt_vit", []), ("llama_siglip", LLAMA_SIGLIP)):
            config = load_config("base", None, ["train.precision=bf16", *extra])
            record(f"train_step_base_{name}", lambda config=config: train_step(config, device))
    demo = {}

    def run_demo():
        figures, model_dir, val_csv = demo_on_device(args.out / "demo", device, args.demo_steps)
        demo.update(model_dir=model_dir, val_csv=val_csv)
        return figures

    record("demo", run_demo)
    if demo:
        record("export", lambda: transformers_on_export(demo["model_dir"], demo["val_csv"], args.out / "demo" / "hf",
                                                        device, 100 if args.quick else 500))

    def vllm_check():
        try:
            import vllm  # noqa: F401
        except ImportError:
            return {"skipped": "vllm is not installed on this machine"}
        return {"installed": vllm.__version__}

    record("vllm", vllm_check)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
