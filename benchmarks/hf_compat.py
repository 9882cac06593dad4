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

    python benchmarks/hf_compat.py [--venv DIR] [--transformers '4.57.*'] [--real-shapes]

Prints one row per export: input_ids equal, max |logits 4.57 - logits 5|, greedy tokens equal.
``--real-shapes`` instead exports one upcycled model in real shapes (a SigLIP-base-patch16-224-shaped
tower and a SmolLM2-135M-shaped Llama with tied embeddings, random weights from configs, every layer
4 experts top-2: LLaVA-Mixtral) and reports each step's wall time and peak memory: the export,
moevlm against transformers 5 (input_ids, pixels, image features, logits to 1e-2 and their largest
difference, greedy tokens) and
the two transformers versions against each other.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
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
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    torch.save({"version": transformers.__version__, "peak_mib": peak, "input_ids": batch["input_ids"],
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


TESTS = Path(__file__).resolve().parents[1] / "tests"


def build_exports(root: Path) -> dict[str, Path]:
    sys.path[:0] = [str(TESTS), str(TESTS / "export")]
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


def real_shapes(root: Path) -> Path:
    """The real-shape sources, two images and an upcycled checkpoint on them (returned) in ``root``."""
    sys.path[:0] = [str(TESTS), str(TESTS / "export")]
    from export_helpers import pretrained_checkpoint, sample_images

    from pretrained_fixtures import tiny_llama, tiny_siglip_vision
    from real_shapes_chain import SIGLIP_BASE_224, SMOLLM2_135M

    began = time.perf_counter()
    vision = tiny_siglip_vision(root / "siglip", **SIGLIP_BASE_224)
    lm = tiny_llama(root / "lm", **SMOLLM2_135M, tie_word_embeddings=True)
    checkpoint = pretrained_checkpoint(root / "ckpt", vision, lm)
    for i, image in enumerate(sample_images(240)):
        image.save(root / f"image{i}.png")
    print(f"built the sources and the upcycled checkpoint in {time.perf_counter() - began:.1f} s", flush=True)
    return checkpoint


def timed(label: str, args: list[str], env: dict) -> str:
    """One step in its own process, which prints its peak memory (MiB) on its last line."""
    began = time.perf_counter()
    done = subprocess.run(args, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        sys.exit(f"{label} failed:\n{done.stderr[-3000:]}")
    *said, peak = done.stdout.strip().splitlines() or ["?"]
    print(f"| {label} | {time.perf_counter() - began:,.1f} s | {float(peak):,.0f} MiB |", flush=True)
    return "\n".join(said)


_PEAK = "import resource; print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)"


def main_real_shapes(old_python: Path, env: dict) -> None:
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        checkpoint = real_shapes(root)
        out = root / "hf"
        images = [str(root / "image0.png"), str(root / "image1.png")]
        print("| step | wall time | peak memory |\n|---|---|---|")
        timed("moevlm export (LLaVA-Mixtral, 30 layers x 4 experts)",
              [sys.executable, "-c", f"from moevlm.export.hf import export_hf; import sys; "
               f"print(export_hf(sys.argv[1], sys.argv[2])); {_PEAK}", str(checkpoint), str(out)], env)
        compared = timed("transformers 5 against moevlm (fp32)",
                         [sys.executable, "-c", "import sys, json; sys.path.insert(0, sys.argv[3]); "
                          "from export_helpers import assert_export_matches; print(json.dumps(assert_export_matches("
                          f"sys.argv[1], sys.argv[2], ('', 'What is in the image?'), atol=1e-2))); {_PEAK}",
                          str(checkpoint), str(out), str(TESTS / "export")], env)
        results = {}
        for label, python in (("old", str(old_python)), ("new", sys.executable)):
            path = root / f"{label}.pt"
            began = time.perf_counter()
            subprocess.run([python, __file__, "--worker", str(out), str(path), *images], check=True, env=env)
            results[label] = torch.load(path)
            print(f"| transformers {results[label]['version']}: load, 2 prompts' logits, 8 greedy tokens | "
                  f"{time.perf_counter() - began:,.1f} s | {results[label]['peak_mib']:,.0f} MiB |", flush=True)
        old, new = results["old"], results["new"]
        print(json.dumps({"moevlm_vs_transformers_5": json.loads(compared),
                          "input_ids_equal": bool(old["input_ids"].equal(new["input_ids"])),
                          "pixels_equal": bool(old["pixel_values"].equal(new["pixel_values"])),
                          "max_abs_logit_diff_4_vs_5": float((old["logits"] - new["logits"]).abs().max()),
                          "greedy_tokens_equal": bool(old["tokens"].equal(new["tokens"]))}))


def main() -> None:
    if sys.argv[1:2] == ["--worker"]:
        folder, result, *images = sys.argv[2:]
        worker(folder, images, result)
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--venv", type=Path, default=DEFAULT_VENV, help="the transformers 4.x environment")
    parser.add_argument("--transformers", default="4.57.*", help="the transformers version to install there")
    parser.add_argument("--real-shapes", action="store_true", help="one export in real shapes, timed")
    args = parser.parse_args()
    import torch

    old_python = make_venv(args.venv, args.transformers)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    if args.real_shapes:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        main_real_shapes(old_python, env)
        return
    worst = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        exports = build_exports(root)
        images = [str(root / "image0.png"), str(root / "image1.png")]
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
