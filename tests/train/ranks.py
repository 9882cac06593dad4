"""Starting ``moevlm train`` as the ranks of a torchrun world, by hand: the environment torchrun
gives each worker (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT), one process per rank, so a
test sees each rank's own exit code and output. Every launch is bounded: past its timeout every
rank is killed and the test fails, so a hang cannot stall the suite."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src"


@dataclass
class Rank:
    code: int
    output: str


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def environment(rank: int, size: int, port: int) -> dict[str, str]:
    return {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(size), "LOCAL_RANK": str(rank),
            "LOCAL_WORLD_SIZE": str(size), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
            "OMP_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")]))}


def start(args: list[str], size: int = 2, drivers: dict[int, str] | None = None) -> list[subprocess.Popen]:
    """``drivers``: rank -> Python source run instead of ``python -m moevlm`` for that rank (it
    gets the same arguments in sys.argv)."""
    port = free_port()
    commands = {rank: [sys.executable, "-c", source, "train", *args] for rank, source in (drivers or {}).items()}
    return [subprocess.Popen(commands.get(rank, [sys.executable, "-m", "moevlm", "train", *args]),
                             env=environment(rank, size, port), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True, start_new_session=True)
            for rank in range(size)]


def finish(processes: list[subprocess.Popen], timeout: float = 180) -> list[Rank]:
    """Wait for every rank; past ``timeout`` seconds in all, kill them and fail."""
    deadline = time.monotonic() + timeout
    ranks = []
    for process in processes:
        try:
            output, _ = process.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for other in processes:
                if other.poll() is None:
                    os.killpg(other.pid, signal.SIGKILL)
            raise AssertionError(f"the ranks did not finish in {timeout} s (a hang)") from None
        ranks.append(Rank(process.returncode, output))
    return ranks


def train_ranks(args: list[str], size: int = 2, timeout: float = 180, check: bool = True) -> list[Rank]:
    ranks = finish(start(args, size), timeout)
    if check:
        for number, rank in enumerate(ranks):
            assert rank.code == 0, f"rank {number} exited {rank.code}:\n{rank.output[-3000:]}"
    return ranks


def torchrun_worker(worker: Path, args: list[str], timeout_s: float, what: str, **env: str) -> str:
    """Runs the script ``worker`` with ``args`` as 2 ranks under torchrun, bounded by ``timeout_s``
    (then every rank is killed and the test fails naming ``what``); its output, once both exited 0."""
    import pytest

    env = {**os.environ, "OMP_NUM_THREADS": "1", **env,
           "PYTHONPATH": os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")]))}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(worker), *args]
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)
    try:
        log, _ = process.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        pytest.fail(f"{what} did not finish in {timeout_s} s")
    assert process.returncode == 0, log[-4000:]
    return log
