"""The whole staged recipe once, on random weights in real shapes: pretrain -> instruct -> moe ->
caption and eval -> export to transformers, through the command line, with wall time and peak memory
of each step; then transformers' computation of the export against moevlm's.

Tiny test models hide what real shapes show (tied embeddings, grouped-query attention, hundreds of
image tokens, long texts). This builds, from configs and offline:

- a vision tower shaped like SigLIP-base-patch16-224 (width 768, 12 layers, 196 image tokens);
- an LM shaped like SmolLM2-135M (width 576, 30 layers, 9 heads with 3 KV heads, vocabulary 49,152,
  tied embeddings; the tests' byte tokenizer with a chat template, so texts are long in tokens);

saves both to a folder and runs each stage for a few steps on 16 LLaVA-style rows. The weights are
random, so losses and captions mean nothing; what counts is that every step runs and what it costs.

    python benchmarks/real_shapes_chain.py [--out DIR] [--steps N] [--tied false] [--ranks 2 --strategy fsdp]

With ``--ranks 2`` the three training stages run on two processes (torchrun, gloo on CPU) and
write sharded checkpoints, which caption, eval and export then read in one process.

The export check (tests/export/export_helpers.py, as the tests run it) compares the processor's
input_ids and pixel values, image features, logits (to 1e-4 here: 30 layers of float32) and
greedy tokens on a left-padded batch of two.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# The model builders and the data writer are the tests' own.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
os.environ["HF_HUB_OFFLINE"] = "1"

from pretrained_fixtures import SIGLIP_BASE_224, SMOLLM2_135M, tiny_llama, tiny_siglip_vision  # noqa: E402
from shapes import write_llava_data  # noqa: E402


def run(label: str, args: list[str], ranks: int = 1) -> None:
    """One moevlm command in its own process (``ranks`` > 1: its ranks under torchrun), so its peak
    memory is its own (the largest of its processes)."""
    began = time.perf_counter()
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"] if ranks > 1 else []
    done = subprocess.run([sys.executable, *launcher, "-m", "moevlm", *args], capture_output=True, text=True)
    seconds = time.perf_counter() - began
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    if done.returncode != 0:
        sys.exit(f"{label} failed (exit {done.returncode}):\n{done.stderr.strip()}")
    # ru_maxrss of children is the largest of any child so far (KiB on Linux).
    memory = f"{peak / 1024:,.0f} MiB" if peak > before else f"<= {before / 1024:,.0f} MiB"
    print(f"| {label} | {seconds:,.1f} s | {memory} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="working folder (default: a temporary one)")
    parser.add_argument("--steps", type=int, default=3, help="training steps per stage (default 3)")
    parser.add_argument("--tied", default="true", choices=["true", "false"], help="tie the LM's embeddings")
    parser.add_argument("--ranks", type=int, default=1, help="train each stage on this many processes (torchrun)")
    parser.add_argument("--strategy", default="fsdp", choices=["ddp", "fsdp"], help="with --ranks > 1")
    args = parser.parse_args()
    root = args.out or Path(tempfile.mkdtemp(prefix="moevlm-real-shapes-"))
    root.mkdir(parents=True, exist_ok=True)
    tied = args.tied == "true"
    began = time.perf_counter()
    vision = tiny_siglip_vision(root / "siglip", **SIGLIP_BASE_224)
    lm = tiny_llama(root / "lm", **{**SMOLLM2_135M, "tie_word_embeddings": tied})
    data = write_llava_data(root, rows=16)
    print(f"built and saved the random sources in {time.perf_counter() - began:.1f} s: {root}")
    common = ["--preset", "llava", "--no-tracking", "--max-steps", str(args.steps),
              "--set", "train.batch_size=4", "--set", "train.checkpoint_every=1000", "--set", "train.eval_every=1000",
              "--set", "train.val_generate=4", "--set", "data.val_fraction=0.25", "--set", "data.num_workers=0",
              "--set", f"dist.strategy={args.strategy}"]
    print("| step | wall time | peak memory |\n|---|---|---|")
    run("pretrain", ["train", "--stage", "pretrain", "--data", str(data["captions"]), "--out", str(root / "pretrain"),
                     "--set", f"model.vision=hf:{vision}", "--set", f"model.lm=hf:{lm}", *common], args.ranks)
    run("instruct --from pretrain", ["train", "--stage", "instruct", "--data", str(data["conversations"]),
                                     "--from", str(root / "pretrain"), "--out", str(root / "instruct"), *common],
        args.ranks)
    run("moe --from instruct (4 experts, top-2, every other layer)",
        ["train", "--stage", "moe", "--data", str(data["conversations"]), "--from", str(root / "instruct"),
         "--out", str(root / "moe"), "--set", "moe.num_experts=4", "--set", "moe.top_k=2",
         "--set", "moe.layers=every-other", *common], args.ranks)
    run("caption (2 images)", ["caption", "--model", str(root / "moe"), "--max-new-tokens", "8",
                               str(root / "000.png"), str(root / "001.png")])
    run("eval (16 rows)", ["eval", "--model", str(root / "moe"), "--data", str(data["conversations"]), "--json"])
    run("export --to hf (LLaVA with a Qwen2-MoE LM: MoE on every other layer)",
        ["export", "--model", str(root / "moe"), "--to", "hf", "--out", str(root / "hf")])
    run("caption of the export (2 images)", ["caption", "--model", str(root / "hf"), "--max-new-tokens", "8",
                                             str(root / "000.png"), str(root / "001.png")])
    compare_with_transformers(root / "moe", root / "hf")


def compare_with_transformers(checkpoint: Path, exported: Path) -> None:
    check = ("import sys, json; sys.path.insert(0, sys.argv[3]); from export_helpers import assert_export_matches; "
             "print(json.dumps(assert_export_matches(sys.argv[1], sys.argv[2], ('', 'What is in the image?'), "
             "atol=1e-4)))")
    began = time.perf_counter()
    helpers = Path(__file__).resolve().parents[1] / "tests" / "export"
    done = subprocess.run([sys.executable, "-c", check, str(checkpoint), str(exported), str(helpers)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        print(done.stderr[-3000:], file=sys.stderr)
        raise SystemExit("transformers does not compute what moevlm does on the export")
    print(f"transformers on the export: {done.stdout.strip().splitlines()[-1]} "
          f"({time.perf_counter() - began:.1f} s)")


if __name__ == "__main__":
    main()
