"""benchmarks/peer.py: both stacks get the same weights and inputs, so their greedy tokens agree."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from peer import demo_checkpoint, export_hf, hf_generate, load_pair, moevlm_generate  # noqa: E402


def test_both_stacks_generate_the_same_tokens_without_stopping(tmp_path):
    checkpoint = demo_checkpoint(tmp_path / "checkpoint", ("decoder.depth=2",))
    export_hf(checkpoint, tmp_path / "hf")
    pair = load_pair(checkpoint, tmp_path / "hf")
    with torch.inference_mode():
        ours = moevlm_generate(pair, 3, 12, compiled=False)
        theirs = hf_generate(pair, 3, 12, compiled=False)
    assert ours.shape == theirs.shape == (3, 12)  # no early stop on either side
    assert ours.equal(theirs)
    assert len(set(ours[0].tolist())) > 1  # not one token over and over: the check has teeth
