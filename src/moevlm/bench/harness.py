"""Timing for ``moevlm bench``: medians over repeats after warm-up, ratios timed in alternating
rounds, the machine's own matmul rate, and the table printer.

On a shared virtual machine the figures move by 10-20 % from run to run; a ratio whose two sides
alternate is steadier, since a drifting clock or a busy neighbour affects both alike.
"""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Callable

import torch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds(fn: Callable[[], object], device: torch.device, repeat: int = 5, warmup: int = 2) -> list[float]:
    """Wall time of each of ``repeat`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return times


def time_ratio(fn_a: Callable, fn_b: Callable, device: torch.device, rounds: int = 5) -> float:
    """median time of fn_a / median time of fn_b. They alternate, each timed call right after
    an untimed one of its own, so both are measured warm and under the same conditions."""
    a, b = [], []
    for _ in range(rounds):
        a += seconds(fn_a, device, repeat=1, warmup=1)
        b += seconds(fn_b, device, repeat=1, warmup=1)
    return statistics.median(a) / statistics.median(b)


def gemm_gflops(device: torch.device, dtype: torch.dtype = torch.float32, size: int = 2048) -> float:
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    best = min(seconds(lambda: a @ b, device, repeat=10))
    return 2 * size ** 3 / best / 1e9


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_model()}, {torch.get_num_threads()} threads"


def format_table(result: dict, indent: str = "") -> str:
    lines = []
    for key, value in result.items():
        if isinstance(value, dict):
            lines.append(f"{indent}{key}")
            lines.append(format_table(value, indent + "  "))
        elif isinstance(value, float):
            lines.append(f"{indent}{key:<28} {value:,.3f}" if value < 100 else f"{indent}{key:<28} {value:,.0f}")
        else:
            lines.append(f"{indent}{key:<28} {value}")
    return "\n".join(lines)
