"""Given labels, both model families compute logits at the labelled positions only: the loss and
every gradient are those of the whole (B, T, V) logits with the unlabelled positions ignored."""

import pytest
import torch
import torch.nn.functional as F

from moevlm.config import load_config
from moevlm.models.factory import build_model
from moevlm.models.hf_config import resolve_pretrained
from moevlm.models.vlm import VLM
from pretrained_fixtures import NUM_PATCHES

pytestmark = pytest.mark.usefixtures("offline")


def scratch(pretrained_parts):
    cfg = load_config("tiny", overrides=["decoder.vocab_size=23"]).model
    model = VLM(cfg)
    ids = torch.randint(0, 23, (3, 9))
    return model, ids, torch.ones_like(ids)


def pretrained(pretrained_parts):
    cfg = resolve_pretrained(load_config("tiny", overrides=[f"model.vision=hf:{pretrained_parts['clip']}",
                                                             f"model.lm=hf:{pretrained_parts['llama']}",
                                                             "moe.layers=[1]"]).model)
    model = build_model(cfg)
    text = torch.randint(3, 250, (3, 6))
    ids = torch.cat([text[:, :1], torch.full((3, NUM_PATCHES), cfg.decoder.image_token_id), text[:, 1:]], 1)
    mask = torch.ones_like(ids)
    mask[2, -2:] = 0  # a right-padded row
    return model, ids, mask


@pytest.mark.parametrize("family", [scratch, pretrained])
def test_logits_at_the_labelled_positions_give_the_loss_and_gradients_of_all_logits(pretrained_parts, family):
    torch.manual_seed(0)
    model, ids, mask = family(pretrained_parts)
    model.train()
    images = torch.rand(3, 3, 32 if family is pretrained else 16, 32 if family is pretrained else 16) * 2 - 1
    labels = torch.full_like(ids, -100)
    labels[0, -4:-1] = ids[0, -3:]  # rows labelled at different positions
    labels[1, -2:-1] = ids[1, -1:]
    labels[2, -5:-3] = ids[2, -4:-2]
    labelled = labels != -100

    torch.manual_seed(1)  # router noise draws alike in both
    whole = model(images, ids, mask)
    reference = F.cross_entropy(whole.logits.reshape(-1, whole.logits.size(-1)), labels.reshape(-1))
    reference.backward()
    expected = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)

    torch.manual_seed(1)
    out = model(images, ids, mask, labels)
    assert out.logits.shape == (int(labelled.sum()), whole.logits.size(-1))
    torch.testing.assert_close(out.logits, whole.logits[labelled])
    torch.testing.assert_close(out.lm_loss, reference)
    out.lm_loss.backward()
    got = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    assert set(got) == set(expected) and len(got) > 10
    for name, grad in got.items():
        torch.testing.assert_close(grad, expected[name], msg=name)


@pytest.mark.parametrize("family", [scratch, pretrained])
def test_a_batch_without_labels_to_learn_gives_no_logits_and_a_graph_to_backward_through(pretrained_parts, family):
    """A rank whose part of the batch has no answer token (trainer: its share is the NaN loss's 0 x 0)."""
    model, ids, mask = family(pretrained_parts)
    size = 32 if family is pretrained else 16
    out = model(torch.rand(3, 3, size, size) * 2 - 1, ids, mask, torch.full_like(ids, -100))
    assert out.logits.shape == (0, model.cfg.decoder.vocab_size)
    assert out.lm_loss.isnan()
    (out.lm_loss.nan_to_num(0.0) * 0.0).backward()
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())
