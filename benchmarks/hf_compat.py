"""An export read by transformers 4.57 and by transformers 5 (this environment): the same logits
and the same greedy tokens?

transformers 4.x reads some keys of a config differently from 5.x (``rope_theta``, the tokenizer
class, ``torch_dtype``); an export that 5.x reads right can load in 4.x without a word and compute
something else. This builds, from configs and offline, tiny models with perturbed routers and
experts (the tests' builders):

- scratch: ``decoder.arch=llama`` + ``vision.arch=siglip``, every layer MoE (LLaVA-Mixtral) and
  every other layer MoE with a shared expert (LLaVA-Qwen2-MoE);
- upcycled: a random SigLIP tower + a random Llama, every layer MoE (Mixtral) and one of two
  (Qwen2-MoE);

exports each, and runs the same script in both environments on it: ``AutoProcessor`` +
``AutoModelForImageTextToText`` in float32, a left-padded batch of two images with two prompts,
the logits at every position and 8 greedy tokens. transformers 4.57 lives in its own virtual
environment (created once: ``python -m venv`` + ``pip install torch==2.13.0 transformers==4.57.*``;
reused afterwards).

    python benchmarks/hf_compat.py [--venv DIR] [--transformers '4.57.*']

Prints one row per export: input_ids equal, max |logits 4.57 - logits 5|, greedy tokens equal.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

DEFAULT_VENV = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "moevlm" / "hf-compat-4.57"
PROMPTS = ["", "What is it?"]


def worker(folder: str, images: list[str], result: str) -> None:
    """Runs in either environment: only torch, transformers and Pillow."""
    import torch
    import transformers
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    five = int(transformers.__version__.split(".")[0]) >= 5
    # transformers 5 picks torchvision's image processor when it is installed; 4.57 loads the
    # Pillow one the export names.
    processor = AutoProcessor.from_pretrained(folder, **({"backend": "pil"} if five else {}))
    model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32).eval()
    texts = [processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}] + ([{"type": "text", "text": p}] if p else [])}],
        add_generation_prompt=True) for p in PROMPTS]
    batch = processor(images=[Image.open(p) for p in images], text=texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = model(**batch).logits
        tokens = model.generate(**batch, max_new_tokens=8, do_sample=False)[:, batch["input_ids"].shape[1]:]
    torch.save({"version": transformers.__version__, "input_ids": batch["input_ids"],
                "pixel_values": batch["pixel_values"], "logits": logits[batch["attention_mask"].bool()],
                "tokens": tokens}, result)


def make_venv(venv: Path, transformers: str) -> Path:
    python = venv / "bin" / "python"
    if python.is_file():
        return python
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", "torch==2.13.0", f"transformers=={transformers}",
                    "pillow", "safetensors"], check=True)
    return python


def build_exports(root: Path) -> dict[str, Path]:
    sys.path[:0] = [str(Path(__file__).resolve().parents[1] / "tests"),
                    str(Path(__file__).resolve().parents[1] / "tests" / "export")]
    from export_helpers import pretrained_checkpoint, sample_images, scratch_checkpoint

    from moevlm.export.hf import export_hf
    from pretrained_fixtures import tiny_llama, tiny_siglip_vision

    siglip, llama = tiny_siglip_vision(root / "siglip"), tiny_llama(root / "llama")
    checkpoints = {
        "scratch, Mixtral": scratch_checkpoint(root / "s-mixtral", ["decoder.kv_heads=1"]),
        "scratch, Qwen2-MoE + shared expert": scratch_checkpoint(
            root / "s-qwen", ["moe.layers=every-other", "moe.shared_expert=true", "moe.top_k=1"]),
        "upcycled Llama, Mixtral": pretrained_checkpoint(root / "p-mixtral", siglip, llama),
        "upcycled Llama, Qwen2-MoE": pretrained_checkpoint(root / "p-qwen", siglip, llama, layers=[1]),
    }
    for i, image in enumerate(sample_images(40)):
        image.save(root / f"image{i}.png")
    exports = {}
    for name, checkpoint in checkpoints.items():
        exports[name] = root / (checkpoint.name + "-hf")
        export_hf(checkpoint, exports[name])
    return exports


def main() -> None:
    if sys.argv[1:2] == ["--worker"]:
        folder, result, *images = sys.argv[2:]
        worker(folder, images, result)
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--venv", type=Path, default=DEFAULT_VENV, help="the transformers 4.x environment")
    parser.add_argument("--transformers", default="4.57.*", help="the transformers version to install there")
    args = parser.parse_args()
    import torch

    old_python = make_venv(args.venv, args.transformers)
    worst = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        exports = build_exports(root)
        images = [str(root / "image0.png"), str(root / "image1.png")]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
        print("| export | input_ids equal | pixels equal | max abs logit diff | greedy tokens equal |")
        print("|---|---|---|---|---|")
        for name, folder in exports.items():
            results = {}
            for label, python in (("old", str(old_python)), ("new", sys.executable)):
                path = root / f"{folder.name}-{label}.pt"
                subprocess.run([python, __file__, "--worker", str(folder), str(path), *images], check=True, env=env)
                results[label] = torch.load(path)
            old, new = results["old"], results["new"]
            same_ids = old["input_ids"].equal(new["input_ids"])
            same_pixels = old["pixel_values"].equal(new["pixel_values"])
            diff = float((old["logits"] - new["logits"]).abs().max()) if same_ids else float("inf")
            worst = max(worst, diff)
            same_tokens = old["tokens"].equal(new["tokens"])
            print(f"| {name} | {same_ids} | {same_pixels} | {diff:.2e} | {same_tokens} |", flush=True)
        print(json.dumps({"transformers_old": old["version"], "transformers_new": new["version"],
                          "max_abs_logit_diff": worst}))


if __name__ == "__main__":
    main()
