"""Training speed on one process against N processes under torchrun (DDP, FSDP, DDP with expert
parallelism), all on the same global batch: step time, tokens/s, scaling efficiency, final loss,
and on a GPU the model FLOPs utilization (MFU).

    python benchmarks/dist_scaling.py [--preset default] [--steps 150] [--log-every 10]
        [--device cpu|cuda] [--nproc N] [--threads T] [--configs single,ddp,fsdp[,ddp-ep]]
        [--peak-tflops 989] [--timeout 900] [--out DIR] [--set KEY=VALUE ...] [--json] [--quick]

Every configuration is the same ``moevlm train`` run: the 1-process baseline is ``python -m moevlm
train``, the others ``torchrun --nproc_per_node=N -m moevlm train --set dist.strategy=...`` with the
same ``train.batch_size`` (the batch over all ranks: each rank takes 1/N of it); ``--configs`` adds
``ddp-ep``, DDP with ``dist.expert_parallel=N`` (each rank holds 1/N of every MoE layer's experts).

The data are digit scenes of exactly three digits (``moevlm.data.digits``, no download) and the
tokenizer is BPE (one token per digit word), so every row, and so every step, holds the same number
of tokens. The model is the preset's but for the tokenizer (and so a vocabulary of about 300) and
router noise, which is off: it draws from each rank's own random stream, so with it N processes make
a different (equally valid) random run; without it every configuration computes the same updates up
to rounding (fp32 on CPU; bf16 on a GPU agrees less). Over the first steps the losses agree to about
1e-7; over a long run the rounding differences grow as they flip routing decisions (default preset,
150 steps: final losses within 0.2 %, up to 3 % apart on the way).

Step time: the trainer logs ``train/tokens_per_s`` every ``train.log_every`` steps, over the steps
since the last log (trainer_state.json's history). The first window is warm-up and is left out; the
median of the others is the run's tokens/s, and its step time is tokens per step / tokens/s.
Validation and the checkpoint come at the last step, after the last window, so they are not timed.

Scaling efficiency: with the global batch fixed, the ideal N-process step is 1/N of one process's,
so efficiency = t1 / (N * tN) (1 = perfect; speed-up = t1 / tN).

Other work on the machine skews the figures: the table gives, for each run, the share of the
machine's CPU time that others took while it ran (/proc/stat's busy time less the run's own).

Threads: on CPU the N processes together get the same threads as the baseline (``--threads``, by
default every core): one process with OMP_NUM_THREADS=T against N processes with T/N each.

MFU (``--device cuda``; bf16, ``--nproc`` the visible GPUs) is an estimate: model FLOPs per step /
step time / (N * ``--peak-tflops``, default 989, the dense bf16 peak of an H100/H200 SXM). Model
FLOPs per step = 6 x active parameters x the tokens they see (the vision tower's parameters every
image patch, the rest every decoder token; an MoE layer's experts count top_k / num_experts of
theirs; embedding look-ups count nothing) + attention, 12 x layers x width x sequence length per
token (PaLM's formula: forward and backward, the whole score matrix, causal masking not halved).
It comes within 10 % of torch.utils.flop_counter's count of a step of the default and base presets.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from moevlm.checkpoint import read_config
from moevlm.config import Config, load_config
from moevlm.data.digits import write_digit_scenes
from moevlm.data.training_data import load_training_data
from moevlm.errors import MoevlmError
from moevlm.models.factory import build_model
from moevlm.models.moe import MoE

CONFIGS = {  # name: (strategy, expert-parallel degree = the number of processes)
    "single": (None, False),
    "ddp": ("ddp", False),
    "fsdp": ("fsdp", False),
    "ddp-ep": ("ddp", True),
}
BATCHES_PER_EPOCH = 8  # training rows = 8 global batches: no short last batch, so every step is alike
LOG_TAIL_LINES = 40


class RunFailed(Exception):
    """A launched training run failed or timed out (its log's tail is printed already)."""


@dataclass
class Run:
    name: str
    processes: int
    strategy: str | None
    expert_parallel: int
    threads_per_process: int
    step_s: float
    tokens_per_s: float
    final_loss: float
    windows_tokens_per_s: list[float]
    wall_s: float
    others_cpu: float | None  # share of the machine's CPU time other work took during the run (Linux)
    speedup: float | None = None
    efficiency: float | None = None
    loss_rel_diff: float | None = None
    model_tflops: float | None = None
    mfu: float | None = None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def busy_cpu_seconds() -> float | None:
    """CPU seconds the whole machine has been busy since boot (/proc/stat); None off Linux."""
    try:
        with open("/proc/stat") as stat:
            ticks = [int(value) for value in stat.readline().split()[1:9]]
    except OSError:
        return None
    idle = ticks[3] + ticks[4]  # idle and iowait; the rest is user, nice, system, irq, softirq, steal
    return (sum(ticks) - idle) / os.sysconf("SC_CLK_TCK")


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)  # torchrun's workers count once it is waited for
    return usage.ru_utime + usage.ru_stime


def launch(name: str, command: list[str], threads: int, log_path: Path, timeout: float) -> tuple[float, float | None]:
    """Run ``command`` with OMP_NUM_THREADS=threads, its output into ``log_path``: its wall seconds, and
    the share of the machine's CPU time that other work took meanwhile (None off Linux)."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    busy, own = busy_cpu_seconds(), children_cpu_seconds()
    start = time.perf_counter()
    with open(log_path, "w") as log:
        # Its own session: on a timeout the whole group (torchrun and its workers) is stopped.
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            code = None
    if code != 0:
        tail = log_path.read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:]
        print("\n".join(tail), file=sys.stderr)
        problem = f"timed out after {timeout:.0f} s" if code is None else f"exit code {code}"
        raise RunFailed(f"run {name!r} failed ({problem}); its log: {log_path}")
    wall = time.perf_counter() - start
    if busy is None:
        return wall, None
    others = busy_cpu_seconds() - busy - (children_cpu_seconds() - own)
    return wall, max(0.0, others) / (wall * (os.cpu_count() or 1))


def windows(run_dir: Path) -> tuple[list[float], float]:
    """The logged tokens/s of every window, and the last logged train loss."""
    history = json.loads((run_dir / "trainer_state.json").read_text())["history"]
    return [value for _, value in history["train/tokens_per_s"]], history["train/loss"][-1][1]


def tokens_per_row(config: Config, train_csv: Path, val_csv: Path, images_in_text: bool) -> int:
    """Tokens the trainer counts for one row (text, plus the image tokens the model prepends),
    built as training builds them; the same for every row by the data's design."""
    data = load_training_data(config, train_csv, val_csv)
    lengths = {len(data.train_set[i]["input_ids"]) for i in range(len(data.train_set))}
    assert len(lengths) == 1, f"rows of different lengths {sorted(lengths)}: tokens per step would vary"
    return lengths.pop() + (0 if images_in_text else config.model.vision.num_image_tokens)


def model_flops_per_step(config: Config, model: torch.nn.Module, rows: int, seq_len: int) -> float:
    """Estimated FLOPs of one training step (forward and backward), as the module docstring says."""
    def params(module: torch.nn.Module) -> int:
        return sum(p.numel() for p in module.parameters())

    inactive = 0.0
    for layer in model.modules():
        if isinstance(layer, MoE):
            experts = sum(p.numel() for p in (layer.w1_EDF, layer.w2_EHD, layer.b1_EF, layer.b2_ED) if p is not None)
            inactive += experts * (1 - layer.cfg.top_k / layer.cfg.num_experts)
    decoder = model.decoder
    lookups = 0 if decoder.lm_head.weight is decoder.tok_emb.weight else decoder.tok_emb.weight.numel()
    if decoder.pos_emb is not None:
        lookups += decoder.pos_emb.weight.numel()
    vision, text = config.model.vision, config.model.decoder
    patches = (vision.image_size // vision.patch_size) ** 2
    vision_flops = 6 * params(model.vision) * patches + 12 * vision.depth * vision.width * patches ** 2
    decoder_active = params(model) - params(model.vision) - inactive - lookups
    decoder_flops = seq_len * (6 * decoder_active + 12 * text.depth * text.width * seq_len)
    return rows * (vision_flops + decoder_flops)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default=None, help="default: default on CPU, base with --device cuda")
    parser.add_argument("--steps", type=int, default=150, help="training steps of each run")
    parser.add_argument("--log-every", type=int, default=10, help="steps per timed window")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--nproc", type=int, default=None, help="processes of the distributed runs "
                        "(default: 2 on CPU, the visible GPUs with --device cuda)")
    parser.add_argument("--threads", type=int, default=None,
                        help="threads of the 1-process run, split evenly over the N processes (default: all cores)")
    parser.add_argument("--configs", default="single,ddp,fsdp",
                        help=f"comma-separated, of {', '.join(CONFIGS)} (ddp-ep: DDP with dist.expert_parallel=N)")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="per GPU, for MFU (bf16 dense H100/H200)")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds each run may take")
    parser.add_argument("--out", type=Path, default=None, help="work folder (default: a temporary one)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config override for every run (repeatable)")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON object")
    parser.add_argument("--quick", action="store_true",
                        help="the tiny preset, 6 steps: checks that the script runs (its figures mean nothing)")
    args = parser.parse_args(argv)
    if args.quick:
        args.preset, args.steps, args.log_every, args.timeout = "tiny", 6, 2, min(args.timeout, 180.0)
    args.preset = args.preset or ("base" if args.device == "cuda" else "default")
    args.threads = args.threads or os.cpu_count() or 1
    if args.nproc is None:
        args.nproc = torch.cuda.device_count() if args.device == "cuda" else 2
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: this machine has no CUDA device")
    if args.nproc < 1:
        parser.error("--nproc must be at least 1")
    args.configs = [name.strip() for name in args.configs.split(",") if name.strip()]
    unknown = [name for name in args.configs if name not in CONFIGS]
    if unknown:
        parser.error(f"--configs: unknown {', '.join(unknown)} (known: {', '.join(CONFIGS)})")
    if args.steps % args.log_every or args.steps < 3 * args.log_every:
        parser.error("--steps must be a multiple of --log-every and at least 3 windows")
    if args.nproc < 2:
        args.configs = [name for name in args.configs if name == "single"]
    return args


def run_overrides(args: argparse.Namespace) -> list[str]:
    fp32 = args.device == "cpu"
    return ["tokenizer.kind=bpe",  # one token per digit word: every row the same length
            "moe.router_noise=false",
            f"train.device={args.device}", f"train.precision={'fp32' if fp32 else 'bf16'}",
            f"train.max_steps={args.steps}", f"train.log_every={args.log_every}",
            f"train.eval_every={args.steps}", f"train.checkpoint_every={args.steps}",
            *args.overrides]


def command_for(name: str, args: argparse.Namespace, train_args: list[str]) -> tuple[list[str], int, int]:
    """The command line of configuration ``name``, its processes and threads per process."""
    strategy, expert_parallel = CONFIGS[name]
    if strategy is None:
        return [sys.executable, "-m", "moevlm", *train_args], 1, args.threads
    dist = ["--set", f"dist.strategy={strategy}"]
    if expert_parallel:
        dist += ["--set", f"dist.expert_parallel={args.nproc}"]
    # An explicit free port per run: concurrent torchrun jobs on the machine all default to 29500.
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", f"--nproc_per_node={args.nproc}",
                "--master-addr=127.0.0.1", f"--master-port={free_port()}"]
    return [*launcher, "-m", "moevlm", *train_args, *dist], args.nproc, max(1, args.threads // args.nproc)


def benchmark(args: argparse.Namespace, root: Path) -> dict:
    load_before = os.getloadavg()[0]
    overrides = run_overrides(args)
    config = load_config(args.preset, overrides=overrides)
    batch = config.train.batch_size
    if batch % args.nproc:
        raise RunFailed(f"train.batch_size={batch} of preset {args.preset!r} is not a multiple of --nproc "
                        f"{args.nproc}; pass --set train.batch_size=...")
    train_csv, val_csv = write_digit_scenes(root / "data", num_train=BATCHES_PER_EPOCH * batch, num_val=batch,
                                            min_digits=3, max_digits=3, size=config.model.vision.image_size)
    train_args = ["train", "--data", str(train_csv), "--val-data", str(val_csv), "--preset", args.preset,
                  "--no-tracking", *[arg for value in overrides for arg in ("--set", value)]]
    runs = []
    for name in args.configs:
        out = root / name
        command, processes, threads = command_for(name, args, [*train_args, "--out", str(out)])
        print(f"[dist_scaling] {name}: {processes} x {threads} threads ...", file=sys.stderr, flush=True)
        wall, others_cpu = launch(name, command, threads, root / f"{name}.log", args.timeout)
        tokens_per_s, loss = windows(out)
        strategy, ep = CONFIGS[name]
        runs.append(Run(name, processes, strategy, args.nproc if ep else 1, threads, math.nan,
                        statistics.median(tokens_per_s[1:]), loss, tokens_per_s, wall, others_cpu))

    # The run's own config (vocabulary size set from its tokenizer) on the meta device: sizes, no weights.
    run_config = read_config(root / args.configs[0])
    with torch.device("meta"):
        model = build_model(run_config.model, load_weights=False)
    row_tokens = tokens_per_row(config, train_csv, val_csv, model.images_in_text)
    step_tokens = batch * row_tokens
    step_flops = model_flops_per_step(run_config, model, batch, row_tokens)
    baseline = runs[0] if runs[0].name == "single" else None
    for run in runs:
        run.step_s = step_tokens / run.tokens_per_s
        run.model_tflops = step_flops / run.step_s / 1e12
        if args.device == "cuda":
            run.mfu = run.model_tflops / (run.processes * args.peak_tflops)
        if baseline is not None:
            run.speedup = baseline.step_s / run.step_s
            run.efficiency = run.speedup / run.processes
            run.loss_rel_diff = abs(run.final_loss - baseline.final_loss) / abs(baseline.final_loss)
    return {"preset": args.preset, "device": args.device, "precision": "fp32" if args.device == "cpu" else "bf16",
            "steps": args.steps, "log_every": args.log_every, "global_batch_size": batch,
            "tokens_per_step": step_tokens, "model_gflop_per_step": step_flops / 1e9,
            "threads_total": args.threads, "nproc": args.nproc,
            "peak_tflops": args.peak_tflops if args.device == "cuda" else None,
            "cpu_count": os.cpu_count(), "load_average_1min": [load_before, os.getloadavg()[0]],
            "runs": [asdict(run) for run in runs]}


def _cell(value, digits: int) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def table(result: dict) -> str:
    cuda = result["device"] == "cuda"
    lines = [f"preset {result['preset']}, {result['device']} {result['precision']}, {result['steps']} steps, global "
             f"batch {result['global_batch_size']} ({result['tokens_per_step']:,} tokens a step), "
             f"load average {result['load_average_1min'][0]:.2f} before, {result['load_average_1min'][1]:.2f} after",
             f"threads: 1 process x {result['threads_total']} against N processes x "
             f"{max(1, result['threads_total'] // result['nproc'])} (OMP_NUM_THREADS)",
             f"step time = tokens a step / median logged tokens/s over the {result['log_every']}-step windows, "
             f"first window (warm-up) left out",
             "efficiency = t1 / (N * tN); loss diff = |loss - loss of 1 process| / loss of 1 process; "
             "others = the share of the machine's CPU time other work took during the run",
             ""]
    header = ["config", "procs x thr", "step s", "tokens/s", "speed-up", "efficiency", "final loss", "loss diff",
              "others"]
    if cuda:
        header.append("MFU")
    rows = [header]
    for run in result["runs"]:
        row = [run["name"], f"{run['processes']} x {run['threads_per_process']}", f"{run['step_s']:.4f}",
               f"{run['tokens_per_s']:,.0f}", _cell(run["speedup"], 2), _cell(run["efficiency"], 2),
               f"{run['final_loss']:.6f}", "-" if run["loss_rel_diff"] is None else f"{run['loss_rel_diff']:.1e}",
               "-" if run["others_cpu"] is None else f"{100 * run['others_cpu']:.0f} %"]
        if cuda:
            row.append("-" if run["mfu"] is None else f"{100 * run['mfu']:.1f} %")
        rows.append(row)
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines += ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
              for row in rows]
    if cuda:
        lines.append(f"MFU: estimated model FLOPs ({result['model_gflop_per_step']:,.1f} GFLOP a step) / step time / "
                     f"(N x {result['peak_tflops']:g} TFLOP/s)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    root = args.out or Path(tempfile.mkdtemp(prefix="moevlm-dist-scaling-"))
    try:
        result = benchmark(args, root)
    except (RunFailed, MoevlmError) as err:  # a bad --set is a MoevlmError, from load_config
        print(f"dist_scaling: {err}", file=sys.stderr)
        return 1
    print(json.dumps(result) if args.json else table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
