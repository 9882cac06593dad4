"""Expert parallelism (train/expert_parallel.py) on 2 CPU processes over gloo (4 for one test)
against the single-process MoE layer, in float64: forward rows, input, gate and every expert
gradient, with uneven loads (expert 3 never chosen; ranks with different token counts, one with
none).

One torchrun launch (expert_parallel_worker.py) measures everything; the tests read what each
process wrote. The launch runs in its own session and is killed whole past TIMEOUT_S, so a hang
fails the tests instead of stalling them.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name("expert_parallel_worker.py")
SRC = Path(__file__).resolve().parents[2] / "src"
TIMEOUT_S = 180
EXACT = 1e-12  # float64: only the order of the sums differs


def launch(out: Path, processes: int) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")]))}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
               str(WORKER), str(out)]
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)
    try:
        log, _ = process.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)  # torchrun and every worker
        process.communicate()
        pytest.fail(f"the {processes}-process run did not finish in {TIMEOUT_S} s")
    assert process.returncode == 0, log[-4000:]
    return [json.loads((out / f"rank{rank}.json").read_text()) for rank in range(processes)]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    return launch(tmp_path_factory.mktemp("expert_parallel"), 2)


def assert_matches_single_process(result: dict) -> None:
    for key in ["forward", "input_grad", "gate_grad"] + [f"grad {name}" for name in result["names"]]:
        assert result[key] < EXACT, (key, result[key])


@pytest.mark.parametrize("activation,names", [
    ("gelu", ["moe.b1_EF", "moe.b2_ED", "moe.w1_EDF", "moe.w2_EHD"]), ("swiglu", ["moe.w1_EDF", "moe.w2_EHD"])])
def test_training_step_equals_the_single_process_layer_with_uneven_loads(ranks, activation, names):
    for result in (rank[f"train {activation}"] for rank in ranks):
        assert result["names"] == names
        assert all(shape[0] == 2 for shape in result["shapes"].values())  # 4 experts, 2 here
        assert_matches_single_process(result)
    load_E = ranks[0][f"train {activation}"]["load"]
    assert sum(load_E) == (7 + 3) * 2 and load_E[3] == 0 and load_E[0] > load_E[1]


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_training_step_with_no_token_on_one_process(ranks, activation):
    for rank in ranks:
        assert_matches_single_process(rank[f"train {activation} zero tokens"])
    assert sum(ranks[1][f"train {activation} zero tokens"]["load"]) == 5 * 2


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_eval_without_grad_with_empty_and_single_token_calls(ranks, activation):
    for rank in ranks:
        assert rank[f"eval {activation}"]["forward"] < EXACT
    # The calls had (6, 2), (1, 0), (0, 0) and (0, 4) tokens on ranks (0, 1), the last under
    # inference_mode: each rank's own load.
    assert [sum(load) for load in ranks[0][f"eval {activation}"]["loads"]] == [12, 2, 0, 0]
    assert [sum(load) for load in ranks[1][f"eval {activation}"]["loads"]] == [4, 0, 0, 8]


def test_bf16_autocast_exchanges_bf16_rows_and_matches_to_bf16_rounding(ranks):
    for result in (rank["train bf16"] for rank in ranks):
        # The experts compute both processes' rows in one bf16 matmul, the reference part by
        # part: the results may differ by a few bf16 roundings (2^-8 relative), no more.
        for key in ["forward", "input_grad", "gate_grad"] + [f"grad {name}" for name in result["names"]]:
            assert result[key] <= 0.02 * result[f"largest {key}"], key


def test_capacity_drops_per_process_as_the_layer_does_on_each_part(ranks):
    for rank in ranks:
        assert_matches_single_process(rank["train capacity"])
    assert ranks[0]["train capacity"]["dropped"] > 0


def test_degree_one_keeps_every_expert_and_averages_over_the_replicas(ranks):
    assert ranks[0]["sizes"] == {"ep2": [2, True], "ep1": [1, 2]}  # ep2: no replica group
    for rank in ranks:
        result = rank["train degree 1"]
        assert all(shape[0] == 4 for shape in result["shapes"].values())
        assert_matches_single_process(result)


def test_whole_expert_tensors_slice_to_what_each_rank_holds(ranks):
    for rank in ranks:
        assert rank["checkpoint"] == {"keys_unchanged": True, "local_equal": True,
                                      "names": ["moe.b1_EF", "moe.b2_ED", "moe.w1_EDF", "moe.w2_EHD"]}


def test_the_tiny_vlm_under_ddp_keeps_its_logits_every_gradient_and_the_gradient_norm(ranks):
    for rank in ranks:
        result = rank["model"]
        assert result["names"] == [f"decoder.blocks.{i}.ffn.{w}" for i in (0, 1) for w in ("w1_EDF", "w2_EHD")]
        assert result["state_dict_has_names"] and result["other_count"] > 10
        assert result["logits"] < EXACT and result["expert_grads"] < EXACT and result["other_grads"] < EXACT
        # What the trainer clips by: the single process's norm, on both processes (the norm of
        # one process's own parameters misses the other's experts).
        assert result["grad_norm"] == pytest.approx(result["single_process_grad_norm"], rel=1e-12)
        assert result["local_grad_norm"] < result["grad_norm"] * (1 - 1e-6)
    assert ranks[0]["model"]["local_grad_norm"] != pytest.approx(ranks[1]["model"]["local_grad_norm"], rel=1e-6)


def test_one_line_errors_name_the_setting(ranks):
    assert ranks[0]["errors"] == {"world": "dist.expert_parallel=3 must divide the number of processes (2)",
                                  "experts": "dist.expert_parallel=2 must divide moe.num_experts (5)"}


def test_four_processes_shard_over_one_dimension_and_replicate_over_the_other(tmp_path):
    ranks = launch(tmp_path, 4)
    assert ranks[0]["sizes"] == {"ep2": [2, 2], "ep4": [4, True]}
    for rank in ranks:
        for degree in (2, 4):
            result = rank[f"train {degree}"]
            assert all(shape[0] == 4 // degree for shape in result["shapes"].values())
            assert_matches_single_process(result)
            assert rank[f"eval {degree}"]["forward"] < EXACT
    assert ranks[0]["train 2"]["load"][3] == 0
