"""Peak memory per process when FSDP ranks start from a billion-parameter LM: today's start-up (every
rank builds and loads the whole model, then shards it) against the meta-device start-up
(``dist.meta_init``: each rank allocates and reads only its shards), and one process holding the
whole model; with the losses of each run.

The sources are random weights in real shapes, built from configs once and saved as safetensors
(reused from ``--root`` when there): an LM shaped like TinyLlama-1.1B (hidden 2048, 22 layers, 32
heads, 4 KV heads, intermediate 5632, vocabulary 32,000, untied: about 4.4 GB of float32 weights)
and a SigLIP-base-patch16-224 tower. Each configuration trains stage pretrain (the projector learns;
the frozen LM still runs forward and backward) for ``--steps`` steps on LLaVA-style rows, in its own
process tree, so its peak is its own: the largest resident set of any of its processes.

    python benchmarks/fsdp_startup_memory.py [--root /tmp/tinyllama-shape] [--steps 2]
        [--configs one,today,meta] [--ranks 2]

Peaks are resident sets, so they count what glibc keeps of freed memory: by default it raises its
mmap threshold (up to 32 MiB) as large blocks are freed and then keeps freed blocks below it in its
heap. Run with ``MALLOC_MMAP_THRESHOLD_=65536`` (every run inherits it) for peaks of live memory;
the table says which was used.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

# The model builders and the data writer are the tests' own.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from pretrained_fixtures import SIGLIP_BASE_224, TINYLLAMA_1_1B  # noqa: E402

os.environ["HF_HUB_OFFLINE"] = "1"

CONFIGS = {"one": (1, None), "today": (None, "false"), "meta": (None, "true")}

# Runs the command given in argv and prints the largest resident set of any process in its tree
# (ru_maxrss of the children it waited for, KiB on Linux).
_PEAK = ("import resource, subprocess, sys; code = subprocess.run(sys.argv[1:]).returncode; "
         "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(code)")


def sources(root: Path) -> tuple[Path, Path, dict]:
    """The LM and tower folders and the data under ``root``, built on the first call."""
    from pretrained_fixtures import tiny_llama, tiny_siglip_vision
    from shapes import write_llava_data

    lm, vision = root / "lm", root / "siglip"
    if not (lm / "config.json").is_file():
        began = time.perf_counter()
        tiny_llama(lm, **TINYLLAMA_1_1B)
        print(f"built and saved the LM in {time.perf_counter() - began:.0f} s: {lm}", flush=True)
    if not (vision / "config.json").is_file():
        tiny_siglip_vision(vision, **SIGLIP_BASE_224)
    (root / "data").mkdir(exist_ok=True)
    return lm, vision, write_llava_data(root / "data", rows=8)


def measure(name: str, ranks: int, meta_init: str | None, root: Path, lm: Path, vision: Path, data: dict,
            steps: int, extra: list[str]) -> dict:
    out = root / "runs" / name
    if out.exists():
        import shutil

        shutil.rmtree(out)
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"] if ranks > 1 else []
    sets = [f"model.vision=hf:{vision}", f"model.lm=hf:{lm}", "train.batch_size=2", "train.checkpoint_every=1000",
            "train.eval_every=1000", "train.val_generate=0", "train.log_every=1", "data.val_fraction=0.25",
            "data.num_workers=0", "dist.strategy=fsdp", *([f"dist.meta_init={meta_init}"] if meta_init else []), *extra]
    command = [sys.executable, *launcher, "-m", "moevlm", "train", "--preset", "llava", "--stage", "pretrain",
               "--data", str(data["captions"]), "--out", str(out), "--no-tracking", "--max-steps", str(steps),
               *[arg for setting in sets for arg in ("--set", setting)]]
    began = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", _PEAK, *command], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    if done.returncode != 0:
        sys.exit(f"{name} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    history = json.loads((out / "trainer_state.json").read_text())["history"]
    return {"config": name, "processes": ranks, "peak_mib": int(done.stdout.split()[-1]) // 1024,
            "seconds": round(time.perf_counter() - began), "losses": [v for _, v in history["train/loss"]]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path("/tmp/tinyllama-shape"),
                        help="where the sources are built once and the runs write (default /tmp/tinyllama-shape)")
    parser.add_argument("--steps", type=int, default=2, help="training steps per run (default 2)")
    parser.add_argument("--configs", default="one,today,meta",
                        help="one (a single process), today (FSDP ranks, dist.meta_init=false), meta "
                             "(FSDP ranks, dist.meta_init=true); comma-separated, run one after the other")
    parser.add_argument("--ranks", type=int, default=2, help="FSDP ranks of today and meta (default 2)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a config setting for every run, e.g. train.activation_checkpointing=full")
    args = parser.parse_args()
    lm, vision, data = sources(args.root)
    results = []
    for name in args.configs.split(","):
        if name not in CONFIGS:
            sys.exit(f"--configs: unknown configuration {name!r} (one, today, meta)")
        ranks, meta_init = CONFIGS[name]
        result = measure(name, ranks or args.ranks, meta_init, args.root, lm, vision, data, args.steps, args.set)
        print(json.dumps(result), flush=True)
        results.append(result)
    print(f"MALLOC_MMAP_THRESHOLD_={os.environ.get('MALLOC_MMAP_THRESHOLD_', 'unset (glibc default)')}")
    print("| start-up | processes | peak memory per process | wall time | losses |\n|---|---|---|---|---|")
    for r in results:
        print(f"| {r['config']} | {r['processes']} | {r['peak_mib']:,} MiB | {r['seconds']} s | "
              f"{', '.join(f'{v:.6f}' for v in r['losses'])} |")


if __name__ == "__main__":
    main()
