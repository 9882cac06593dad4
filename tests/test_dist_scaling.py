"""benchmarks/dist_scaling.py --quick: every configuration trains, on one process and on two under
torchrun, to the same loss; a failing run ends the script with its log's tail and one line."""

import json
import math
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "dist_scaling.py"


def run_script(*args: str, tmp_path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), "--quick", "--out", str(tmp_path), *args],
                          capture_output=True, text=True, timeout=300)


def test_quick_run_reports_every_configuration_with_agreeing_losses(tmp_path):
    done = run_script("--json", tmp_path=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)
    runs = {run["name"]: run for run in result["runs"]}
    assert list(runs) == ["single", "ddp", "fsdp"]
    single = runs["single"]
    assert (single["processes"], single["threads_per_process"]) == (1, result["threads_total"])
    for run in runs.values():
        assert math.isfinite(run["step_s"]) and run["step_s"] > 0, run
        assert len(run["windows_tokens_per_s"]) == result["steps"] // result["log_every"]
        assert math.isclose(run["step_s"] * run["tokens_per_s"], result["tokens_per_step"], rel_tol=1e-9)
        # Same global batch, no router noise, fp32: the same updates up to summation order.
        assert math.isclose(run["final_loss"], single["final_loss"], rel_tol=1e-4), (run["name"], run["final_loss"])
        assert math.isclose(run["efficiency"], single["step_s"] / (run["processes"] * run["step_s"]), rel_tol=1e-9)
        assert 0 <= run["others_cpu"] <= 1
    for name in ("ddp", "fsdp"):
        assert runs[name]["processes"] == 2
        assert runs[name]["threads_per_process"] == max(1, result["threads_total"] // 2)
    # tiny preset: 8 rows a step, each <bos>, three digit words, <eos> and one image token.
    assert result["tokens_per_step"] == 8 * 6


def test_a_failing_run_prints_its_log_tail_and_one_line(tmp_path):
    done = run_script("--configs", "single", "--set", "dist.expert_parallel=3", tmp_path=tmp_path)
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert lines[-1] == f"dist_scaling: run 'single' failed (exit code 2); its log: {tmp_path / 'single.log'}"
    assert any("dist.expert_parallel=3 needs 3" in line for line in lines[:-1])  # the run's own message
