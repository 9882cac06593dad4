"""Meta-device start-up under FSDP2 (train/materialize.py) on 2 CPU processes over gloo: each rank's
shards equal the slices of the model one process builds from the same seed and sources (pretrained
tower and LM, upcycled experts, fresh projector, routers and a scratch vision encoder), no rank
creates a whole pretrained tensor, and training goes on exactly as after today's start-up.

One torchrun launch (meta_init_worker.py) measures the start-up; the training tests start real
``moevlm train`` ranks (tests/train/ranks.py)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from ranks import finish, start, torchrun_worker

from moevlm.checkpoint import fingerprint, load_model
from moevlm.config import load_config
from moevlm.train.run import fresh_model
from moevlm.train.stages import freeze_for_stage, still_from_source

pytestmark = pytest.mark.usefixtures("offline")
WORKER = Path(__file__).with_name("meta_init_worker.py")
TIMEOUT_S = 180


def cases(parts: dict) -> dict[str, list[str]]:
    return {
        # stage moe on a dense LM: every layer's MLP upcycled to 4 experts, routers with noise
        "upcycled": [f"model.vision=hf:{parts['siglip']}", f"model.lm=hf:{parts['llama']}", "train.stage=moe"],
        # tied embeddings, a scratch vision encoder beside the pretrained LM
        "scratch_tower": [f"model.lm=hf:{parts['llama_tied']}", "train.stage=instruct", "train.seed=3"],
    }


@pytest.fixture(scope="module")
def started(pretrained_parts, tmp_path_factory) -> dict[str, list[dict]]:
    out = tmp_path_factory.mktemp("meta_init")
    (out / "cases.json").write_text(json.dumps(cases(pretrained_parts)))
    torchrun_worker(WORKER, [str(out), str(out / "cases.json")], TIMEOUT_S, "the 2-process start-up",
                    HF_HUB_OFFLINE="1")
    return {case: [torch.load(out / f"{case}-rank{rank}.pt", weights_only=False) for rank in range(2)]
            for case in cases(pretrained_parts)}


def one_process(parts: dict, case: str):
    """The model today's start-up gives one process, its from_source names, and the RNG after it."""
    config = load_config("tiny", overrides=cases(parts)[case])
    prepared = fresh_model(config)
    rng = torch.random.get_rng_state()
    freeze_for_stage(prepared.model, prepared.config.train)
    return prepared.model, still_from_source(prepared.from_source, prepared.model), rng


@pytest.mark.parametrize("case", ["upcycled", "scratch_tower"])
def test_each_rank_holds_the_slices_of_the_model_one_process_builds(pretrained_parts, started, case):
    model, from_source, rng = one_process(pretrained_parts, case)
    ranks = started[case]
    whole = dict(model.named_parameters())
    assert set(ranks[0]["shards"]) == set(whole)
    for name, param in whole.items():
        (first, start0, stop0), (second, start1, stop1) = ranks[0]["shards"][name], ranks[1]["shards"][name]
        rows = param.shape[0] if param.dim() else 0
        assert (start0, stop1) == (0, rows) and stop0 == start1, name  # the two shards split the rows
        assert stop0 == math.ceil(rows / 2), name  # each rank holds its half, not the whole
        assert torch.equal(first, param.detach()[start0:stop0]), name
        assert torch.equal(second, param.detach()[start1:stop1]), name
    for rank in ranks:
        assert rank["meta_left"] == []
        assert rank["buffers"].keys() == dict(model.named_buffers()).keys()
        for name, buffer in model.named_buffers():
            assert torch.equal(rank["buffers"][name], buffer), name
        # router noise and dropout go on from where one process's build leaves the RNG
        assert torch.equal(rank["rng"], rng)
    assert ranks[0]["from_source"] == sorted(from_source)
    assert ranks[0]["fingerprint"] == fingerprint(model, from_source)
    if case == "upcycled":
        layer = "lm.model.layers.1.mlp.moe."
        assert {name for name in whole if name.startswith(layer)} == {
            layer + name for name in ("gate.weight", "noise.weight", "w1_EDF", "w2_EHD")}


@pytest.mark.parametrize("case", ["upcycled", "scratch_tower"])
def test_no_rank_creates_a_whole_pretrained_tensor(pretrained_parts, started, case):
    """Every read from the files covers at most one rank's rows, and (but for the fresh weights,
    drawn whole one module at a time: the scratch tower's patch embedding is the largest tensor
    of that case) the largest storage any operation creates during start-up is smaller than the
    LM's embedding table, its largest tensor."""
    model, _, _ = one_process(pretrained_parts, case)
    embedding = model.lm.get_input_embeddings().weight
    shapes = {name.removeprefix("lm.").removeprefix("vision.model."): param.shape
              for name, param in model.named_parameters()}
    for rank in started[case]:
        if case == "upcycled":
            assert 0 < rank["largest_storage"] < embedding.numel() * embedding.element_size()
        assert rank["reads"], "nothing read from the sources"
        for name, rows in rank["reads"]:
            assert rows <= math.ceil(shapes[name][0] / 2) if shapes[name] else rows == 1, name


NOTING_MATERIALIZE = """
import sys
from moevlm.cli import main
from moevlm.train import trainer

materialize = trainer.materialize
def noting(*args):
    print("materialized")
    return materialize(*args)
trainer.materialize = noting
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from shapes import write_llava_data

    return write_llava_data(tmp_path_factory.mktemp("data"), rows=12)


def test_training_after_meta_start_up_equals_training_after_todays(pretrained_parts, data, tmp_path):
    """Stage moe on the dense LM (the experts upcycled on the shards), 4 steps on 2 FSDP ranks with a
    checkpoint at step 2: the same losses, gradient norms and checkpointed weights with
    dist.meta_init true and false; the checkpoint's fingerprint of the frozen tower checks out
    when one process loads it."""
    runs = {}
    for meta_init in ("true", "false"):
        out = tmp_path / meta_init
        sets = ["train.stage=moe", "train.batch_size=4", "train.max_steps=4", "train.warmup_steps=1",
                "train.eval_every=100", "train.checkpoint_every=2", "train.log_every=1", "moe.router_noise=false",
                "decoder.max_text_len=96", "dist.strategy=fsdp", f"dist.meta_init={meta_init}",
                f"model.vision=hf:{pretrained_parts['siglip']}", f"model.lm=hf:{pretrained_parts['llama']}"]
        args = ["--data", str(data["conversations"]), "--out", str(out), "--preset", "tiny", "--no-tracking",
                *[arg for setting in sets for arg in ("--set", setting)]]
        ranks = finish(start(args, drivers={0: NOTING_MATERIALIZE, 1: NOTING_MATERIALIZE}))
        for rank in ranks:
            assert rank.code == 0, rank.output[-3000:]
            assert ("materialized" in rank.output) == (meta_init == "true")
        runs[meta_init] = out
    got, want = (json.loads((runs[k] / "trainer_state.json").read_text())["history"] for k in ("true", "false"))
    for key in ("train/loss", "train/grad_norm"):
        assert len(got[key]) == 4
        assert got[key] == want[key], key  # the same weights, the same operations: bit for bit
    assert (runs["true"] / "pretrained.json").read_text() == (runs["false"] / "pretrained.json").read_text()
    meta_weights, today = load_model(runs["true"])[0].state_dict(), load_model(runs["false"])[0].state_dict()
    for name, tensor in today.items():
        torch.testing.assert_close(meta_weights[name], tensor, rtol=1e-6, atol=1e-7, msg=name)
