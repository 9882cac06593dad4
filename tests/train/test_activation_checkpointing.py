"""train.activation_checkpointing (moevlm/train/checkpointing.py): with full and selective
recompute the gradients are those of a run without, for the scratch model and for transformers
towers and LMs with installed MoE layers, with router noise, dropout, capacity drops and padding on;
frozen towers are not recomputed; one process and 2 DDP / FSDP / expert-parallel ranks train as before."""

import pytest
import torch
from ranks import train_ranks
from test_distributed import COMMON, assert_same_history, history, one_process

from moevlm.config import load_config
from moevlm.models.factory import build_model
from moevlm.models.hf_config import resolve_pretrained
from moevlm.train import checkpointing
from moevlm.train.checkpointing import apply_activation_checkpointing, is_checkpointed
from moevlm.train.stages import freeze_for_stage

# The recompute runs the same kernels on the same inputs with the same random draws: on the CPU the
# gradients come out bitwise equal; the bound leaves room for a kernel that sums in another order.
RTOL, ATOL = 1e-6, 1e-8
NOISY = ["moe.router_noise=true", "moe.capacity_factor=1.0"]


def gradients(model, images, ids, mask, labels):
    torch.manual_seed(1)  # the same router noise and dropout draws in every run
    out = model(images, ids, mask, labels)
    out.loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return out.loss.item(), grads


def assert_same_gradients(make, mode, inputs, expected_modules):
    loss, want = gradients(make(), *inputs)
    model = make()
    keys = model.state_dict().keys()
    assert apply_activation_checkpointing(model, mode) == expected_modules
    assert model.state_dict().keys() == keys  # names, checkpoints and DCP keys stay as they are
    got_loss, got = gradients(model, *inputs)
    assert got_loss == loss and got.keys() == want.keys() and len(want) > 10
    for name, grad in want.items():
        torch.testing.assert_close(got[name], grad, rtol=RTOL, atol=ATOL, msg=name)


@pytest.mark.parametrize("mode,expected", [("full", 4), ("selective", 4)])
def test_the_scratch_model_gets_the_gradients_it_gets_without(mode, expected):
    config = load_config("tiny", overrides=["decoder.vocab_size=23", "vision.depth=2", "vision.dropout=0.2",
                                            "decoder.dropout=0.2", *NOISY]).model

    def make():
        torch.manual_seed(0)
        return build_model(config).train()

    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 23, (3, 10), generator=gen)
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[1, :4] = False
    inputs = (torch.rand(3, 3, 16, 16, generator=gen) * 2 - 1, ids, mask, torch.where(mask, ids, -100))
    assert_same_gradients(make, mode, inputs, expected)
    model = make()
    apply_activation_checkpointing(model, mode)
    block = model.decoder.blocks[0]
    assert is_checkpointed(block) == (mode == "full") and is_checkpointed(block.ffn) == (mode == "selective")


@pytest.fixture(scope="module")
def dropout_parts(tmp_path_factory):
    """A SigLIP tower and a Llama with attention dropout (the session's parts have none)."""
    from pretrained_fixtures import tiny_llama, tiny_siglip_vision

    root = tmp_path_factory.mktemp("dropout")
    return (tiny_siglip_vision(root / "siglip", attention_dropout=0.2),
            tiny_llama(root / "llama", attention_dropout=0.2))


def pretrained(parts, *overrides):
    vision, lm = parts
    return load_config("tiny", overrides=[f"model.vision=hf:{vision}", f"model.lm=hf:{lm}", "moe.layers=[0, 1]",
                                          "moe.num_experts=4", "moe.top_k=2", *NOISY, *overrides])


def pretrained_inputs(model):
    """Two rows, the second left-padded: padding must stay padding for the recomputed MoE layers."""
    rows = [[1] + [model.image_token_id] * model.num_image_tokens + text for text in ([40, 41, 42, 43, 44], [50])]
    width = max(map(len, rows))
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[False] * (width - len(r)) + [True] * len(r) for r in rows])
    labels = torch.where(mask & (ids != model.image_token_id), ids, -100)
    return torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1, ids, mask, labels


@pytest.mark.usefixtures("offline")
@pytest.mark.parametrize("mode", ["full", "selective"])
def test_transformers_towers_and_lms_with_moe_layers_get_the_gradients_they_get_without(dropout_parts, mode):
    config = resolve_pretrained(pretrained(dropout_parts).model)

    def make():
        torch.manual_seed(0)
        model = build_model(config).train()
        with torch.no_grad():  # upcycled experts are identical copies: routing would change nothing
            for layer in model.moe_layers:
                for w in (layer.w1_EDF, layer.w2_EHD):
                    w.add_(torch.randn_like(w) * w.std())
        return model

    model = make()
    assert_same_gradients(make, mode, pretrained_inputs(model), 3 + 2)  # the tower's 3 layers, the LM's 2


@pytest.mark.usefixtures("offline")
@pytest.mark.parametrize("stage,recomputed", [("full", 5), ("instruct", 2), ("pretrain", 2)])
def test_a_frozen_tower_with_nothing_trainable_before_it_is_not_recomputed(dropout_parts, monkeypatch, stage,
                                                                          recomputed):
    """instruct and pretrain freeze the tower: no gradient flows through its layers, which then keep
    no activations and run plainly. The frozen LM of pretrain passes the gradient to the projector:
    it is recomputed."""
    config = pretrained(dropout_parts, f"train.stage={stage}")
    model = build_model(resolve_pretrained(config.model)).train()
    freeze_for_stage(model, config.train)
    apply_activation_checkpointing(model, "full")
    calls = []
    real = checkpointing.checkpoint
    monkeypatch.setattr(checkpointing, "checkpoint", lambda *args, **kwargs: calls.append(1) or real(*args, **kwargs))
    images, ids, mask, labels = pretrained_inputs(model)
    model(images, ids, mask, labels).loss.backward()
    assert len(calls) == recomputed
    calls.clear()
    with torch.no_grad():
        model(images, ids, mask)
    assert not calls  # evaluation and generation: nothing to keep for a backward


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from shapes import write_shapes_csv

    return write_shapes_csv(tmp_path_factory.mktemp("data") / "shapes.csv", rows=12)


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    """Today's run: one process, no checkpointing, 8 steps."""
    out = tmp_path_factory.mktemp("one") / "run"
    one_process(data, out, "--set", "train.max_steps=8")
    return out


@pytest.mark.parametrize("settings", [["dist.strategy=ddp", "train.activation_checkpointing=selective"],
                                      ["dist.strategy=fsdp", "train.activation_checkpointing=full"],
                                      ["dist.strategy=fsdp", "dist.expert_parallel=2",
                                       "train.activation_checkpointing=selective"]],
                         ids=["ddp-selective", "fsdp-full", "fsdp-ep-selective"])
def test_two_ranks_with_checkpointing_train_as_one_process_without(data, reference, tmp_path, settings):
    out = tmp_path / "run"
    sets = [arg for setting in settings for arg in ("--set", setting)]
    train_ranks(["--data", str(data), "--out", str(out), *COMMON, "--set", "train.max_steps=8", *sets])
    assert_same_history(history(out), history(reference))


def test_two_fsdp_ranks_with_router_noise_and_dropout_train_as_they_do_without_checkpointing(data, tmp_path):
    """Each rank draws its own noise and dropout (so no split equals one process): the same on 2
    ranks with and without checkpointing."""
    noisy = [*COMMON, "--set", "train.max_steps=4", "--set", "dist.strategy=fsdp", "--set", "moe.router_noise=true",
             "--set", "decoder.dropout=0.1", "--set", "vision.dropout=0.1"]
    train_ranks(["--data", str(data), "--out", str(tmp_path / "plain"), *noisy])
    train_ranks(["--data", str(data), "--out", str(tmp_path / "full"), *noisy,
                 "--set", "train.activation_checkpointing=full"])
    assert_same_history(history(tmp_path / "full"), history(tmp_path / "plain"))


def test_a_checkpointed_run_resumes_as_a_plain_one_and_may_change_its_mode_on_resume(data, tmp_path, monkeypatch):
    """4 steps, then --resume to 8 (train.max_steps moves the schedule), with and without checkpointing."""
    plain, checkpointed = tmp_path / "plain", tmp_path / "checkpointed"
    one_process(data, plain, "--set", "train.max_steps=4")
    one_process(data, plain, "--resume", "--max-steps", "8")
    calls = []
    real = checkpointing.checkpoint
    monkeypatch.setattr(checkpointing, "checkpoint", lambda *args, **kwargs: calls.append(1) or real(*args, **kwargs))
    one_process(data, checkpointed, "--set", "train.max_steps=4", "--set", "train.activation_checkpointing=full")
    one_process(data, checkpointed, "--resume", "--max-steps", "8", "--set", "train.activation_checkpointing=selective")
    assert_same_history(history(checkpointed), history(plain))
    # the trainer applied it: 3 blocks (the ViT's 1, the decoder's 2) in each of 8 steps x 2 micro-batches
    assert len(calls) == 3 * 8 * 2
