"""The vocabulary-parallel LM head under FSDP2 (train/vocab_parallel.py) on 2 CPU processes over gloo:
the loss and every parameter's gradient equal one process's on the whole batch, for the scratch
decoder and a transformers Llama, with the head frozen and learning, vocabularies split unevenly
and label smoothing on; the head is never gathered whole in training, and evaluation and
generation still see the whole logits. A run on 2 ranks resumes exactly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from ranks import torchrun_worker, train_ranks

from moevlm.checkpoint import load_model
from moevlm.cli import main

pytestmark = pytest.mark.usefixtures("offline")
WORKER = Path(__file__).with_name("vocab_parallel_worker.py")
TIMEOUT_S = 240
CASES = ["scratch-frozen", "scratch-learning", "hf-frozen", "hf-learning", "hf-odd-vocabulary",
         "scratch-nothing-labelled-on-rank-1", "hf-learning-bf16"]


@pytest.fixture(scope="module")
def ranks_ran(pretrained_parts, tmp_path_factory) -> Path:
    from pretrained_fixtures import tiny_llama

    out = tmp_path_factory.mktemp("vocab_parallel")
    odd = tiny_llama(out / "llama_odd", vocab_size=261)
    torchrun_worker(WORKER, [pretrained_parts["siglip"], pretrained_parts["llama"], odd, str(out)], TIMEOUT_S,
                    "the 2-process comparison", HF_HUB_OFFLINE="1")
    return out


@pytest.mark.parametrize("case", CASES)
def test_two_ranks_with_the_head_split_by_vocabulary_give_one_process_loss_and_gradients(ranks_ran, case):
    result = torch.load(ranks_ran / f"{case}.pt", weights_only=False)
    bf16 = case.endswith("bf16")  # dist.mixed_precision=bf16 against one process in fp32: bf16 rounding
    assert result["loss"] == pytest.approx(result["ref_loss"], rel=1e-3 if bf16 else 1e-6)
    head = next(name for name in result["grads"] if name.endswith("lm_head.weight"))
    vocab = result["vocab"]
    assert result["local_rows"] == (vocab + 1) // 2 < vocab  # rank 0's rows only
    learns = case != "scratch-frozen" and case != "hf-frozen"
    assert (result["ref_grads"][head] is not None) == learns
    for name, want in result["ref_grads"].items():
        got = result["grads"][name]
        if want is None:
            assert got is None, name
            continue
        assert got is not None, name
        if bf16:
            assert float((got - want).abs().max()) <= 0.05 * float(want.abs().max()) + 1e-6, name
        else:
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=name)
    # eval mode (moevlm eval, validation) and generation: the whole logits, the head gathered there
    close = {"rtol": 2e-2, "atol": 2e-2} if bf16 else {"rtol": 1e-5, "atol": 1e-6}
    torch.testing.assert_close(result["logits"].float(), result["ref_logits"], **close)
    assert result["logits"].shape[-1] == vocab
    torch.testing.assert_close(result["prefill"].float(), result["ref_prefill"], **close)


COMMON = ["--preset", "tiny", "--no-tracking", "--set", "moe.router_noise=false", "--set", "train.log_every=1",
          "--set", "decoder.tie_embeddings=false", "--set", "train.checkpoint_every=4", "--set", "train.eval_every=4",
          "--set", "train.val_generate=2", "--set", "train.label_smoothing=0.1", "--set", "data.val_fraction=0.1"]
COMPARED = ("train/loss", "train/lm_loss", "train/grad_norm", "val/loss")


def history(folder: Path) -> dict:
    return json.loads((folder / "trainer_state.json").read_text())["history"]


def test_two_ranks_resume_exactly_and_train_as_one_process(tmp_path):
    """The untied scratch decoder (every weight learns): 4 steps on 2 FSDP ranks, then --resume to 8
    on 2 ranks, equals the same in one process (train.max_steps moves the schedule); the sharded
    checkpoint holds the head one process trained."""
    from shapes import write_shapes_csv

    data = write_shapes_csv(tmp_path / "shapes.csv", rows=12)
    one = ["--data", str(data), "--out", str(tmp_path / "one")]
    assert main(["train", *one, *COMMON, "--set", "train.max_steps=4"]) == 0
    assert main(["train", *one, "--resume", "--max-steps", "8", "--no-tracking"]) == 0
    two = ["--data", str(data), "--out", str(tmp_path / "two")]
    train_ranks([*two, *COMMON, "--set", "dist.strategy=fsdp", "--set", "train.max_steps=4"])
    train_ranks([*two, "--resume", "--max-steps", "8", "--no-tracking"])
    got, want = history(tmp_path / "two"), history(tmp_path / "one")
    for key in COMPARED:
        assert [s for s, _ in got[key]] == [s for s, _ in want[key]], key
        assert [v for _, v in got[key]] == pytest.approx([v for _, v in want[key]], rel=1e-5, abs=1e-6), key
    sharded, plain = load_model(tmp_path / "two")[0].state_dict(), load_model(tmp_path / "one")[0].state_dict()
    assert sharded.keys() == plain.keys() and "decoder.lm_head.weight" in plain
    for name, tensor in plain.items():
        torch.testing.assert_close(sharded[name], tensor, rtol=1e-4, atol=1e-5, msg=name)
