"""FSDP2 on the CPU (``distributed.gather_one_unit_at_a_time``): each unit is gathered while it
computes and at no other time (no all-gather buffer kept for the next unit, no unit gathered ahead
in backward), with the same losses as FSDP2's defaults; on 2 gloo ranks
(tests/train/gather_worker.py), a pretrained tower and untied LM in stage pretrain."""

import json
from pathlib import Path

import pytest
from ranks import torchrun_worker

pytestmark = pytest.mark.usefixtures("offline")
WORKER = Path(__file__).with_name("gather_worker.py")
TIMEOUT_S = 180


def test_on_the_cpu_each_unit_is_gathered_only_while_it_computes(pretrained_parts, tmp_path):
    torchrun_worker(WORKER, [str(pretrained_parts["siglip"]), str(pretrained_parts["llama"]), str(tmp_path)],
                    TIMEOUT_S, "the 2-process run", HF_HUB_OFFLINE="1")
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    ours, default = [rank["cpu"] for rank in ranks], [rank["default"] for rank in ranks]
    for rank in ours:
        # the untied head is split by vocabulary rows outside FSDP2 (tests/train/test_vocab_parallel.py);
        # on the CPU a layer's feed-forward matrices are units inside the layer's
        assert {"lm.model.embed_tokens", "lm.model.layers.0", "lm.model.layers.0.mlp.gate_proj",
                "lm.model.layers.0.mlp.up_proj", "lm.model.layers.0.mlp.down_proj"} <= set(rank["units"])
        assert "lm.lm_head" not in rank["units"] and "lm.model.layers.0.self_attn.q_proj" not in rank["units"]
        backward = [name for when, name, _, _ in rank["events"] if when == "backward"]
        # the frozen LM's backward, the last layer's matrices first
        assert backward[:4] == ["lm.model.layers.1.mlp.down_proj", "lm.model.layers.1.mlp.up_proj",
                                "lm.model.layers.1.mlp.gate_proj", "lm.model.layers.1"], backward[:6]
        for when, name, gathered, kept in rank["events"]:
            # the computing unit, and the units it is part of (a layer while its matrices compute)
            enclosing = sorted(unit for unit in rank["units"] if f"{name}.".startswith(f"{unit}."))
            assert gathered == enclosing and not kept, (when, name, gathered, kept)
    # FSDP2's defaults (made for CUDA streams) keep a buffer in forward and gather ahead in backward.
    events = default[0]["events"]
    assert any(kept for when, _, _, kept in events if when == "forward")
    assert any(len(gathered) > 1 for when, _, gathered, _ in events if when == "backward")
    assert ours[0]["losses"] == ours[1]["losses"] == default[0]["losses"]
