import pytest
import torch

from moevlm.config import load_config
from moevlm.generate import generate
from moevlm.models.vlm import VLM


def batch(config, B=3, T=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    size = config.model.vision.image_size
    images = torch.rand(B, 3, size, size, generator=g) * 2 - 1
    ids = torch.randint(5, config.model.decoder.vocab_size, (B, T), generator=g)
    return images, ids


@pytest.mark.parametrize("image_tokens,expected", [("cls", 1), ("patches", 4), ("pooled", 1)])
def test_shapes(image_tokens, expected):
    tiny_config = load_config("tiny", overrides=[f"vision.image_tokens={image_tokens}", "decoder.vocab_size=23",
                                                 "vision.arch=vit", "vision.patch_size=8", "vision.pooled_tokens=1"])
    model = VLM(tiny_config.model)
    images, ids = batch(tiny_config)
    assert model.encode_images(images).shape == (3, expected, tiny_config.model.decoder.width)
    assert model(images, ids).logits.shape == (3, 7, 23)
    out = model(images, ids, labels=ids)
    assert out.logits.shape == (3 * 7, 23)  # every position labelled
    assert out.loss.ndim == 0 and set(out.aux) == {"balance", "z"}
    assert model.expert_load().shape == (2, 2, 4)


def test_later_tokens_never_change_earlier_logits(tiny_config):
    model = VLM(tiny_config.model).eval()
    images, ids = batch(tiny_config)
    changed = ids.clone()
    changed[:, 4:] = (changed[:, 4:] + 1) % 23
    a, b = model(images, ids).logits, model(images, changed).logits
    torch.testing.assert_close(a[:, :4], b[:, :4])
    assert not torch.allclose(a[:, 4:], b[:, 4:])


def test_images_change_the_text_logits(tiny_config):
    model = VLM(tiny_config.model).eval()
    images, ids = batch(tiny_config)
    assert not torch.allclose(model(images, ids).logits, model(-images, ids).logits)


# Every equality below holds with a capacity factor too: capacity applies in training only, and
# padding never takes an expert's slot.
CAPACITY = pytest.mark.parametrize("capacity_factor", [None, 0.5, 1.0])


@CAPACITY
def test_padding_never_contributes_to_the_loss(tiny_config, capacity_factor):
    tiny_config = tiny_config.updated({"model.decoder.moe.router_noise": False,  # training mode, same routing
                                       "model.decoder.moe.capacity_factor": capacity_factor})
    model = VLM(tiny_config.model).train()
    images, ids = batch(tiny_config, B=2, T=5)
    labels = torch.full_like(ids, -100)
    labels[:, :4] = ids[:, 1:]
    mask = torch.ones_like(ids, dtype=torch.bool)
    padded_ids = torch.cat([ids, torch.zeros(2, 3, dtype=torch.long)], 1)
    padded_labels = torch.cat([labels, torch.full((2, 3), -100)], 1)
    padded_mask = torch.cat([mask, torch.zeros(2, 3, dtype=torch.bool)], 1)
    plain = model(images, ids, mask, labels)
    padded = model(images, padded_ids, padded_mask, padded_labels)
    torch.testing.assert_close(plain.lm_loss, padded.lm_loss)
    torch.testing.assert_close(plain.aux["balance"], padded.aux["balance"])
    torch.testing.assert_close(plain.logits, padded.logits)  # the labelled positions'
    torch.testing.assert_close(model(images, ids, mask).logits, model(images, padded_ids, padded_mask).logits[:, :5])


@CAPACITY
def test_left_padded_rows_match_unpadded_rows(tiny_config, capacity_factor):
    tiny_config = tiny_config.updated({"model.decoder.moe.capacity_factor": capacity_factor})
    model = VLM(tiny_config.model).eval()
    images, ids = batch(tiny_config, B=1, T=4)
    logits_plain, _ = model.prefill(images, ids, torch.ones_like(ids, dtype=torch.bool))
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], 1)
    mask = torch.cat([torch.zeros(1, 3, dtype=torch.bool), torch.ones(1, 4, dtype=torch.bool)], 1)
    logits_padded, _ = model.prefill(images, padded, mask)
    torch.testing.assert_close(logits_plain, logits_padded)


def randomized_model(config):
    model = VLM(config.model).eval()
    with torch.no_grad():  # larger weights than the init, so greedy decoding varies per step
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return model


@CAPACITY
def test_greedy_generation_identical_with_and_without_kv_cache(tiny_config, capacity_factor):
    tiny_config = tiny_config.updated({"model.decoder.moe.capacity_factor": capacity_factor})
    model = randomized_model(tiny_config)
    images, _ = batch(tiny_config)
    prompts = [[1], [1, 7, 9, 4], [1, 12]]
    cached = generate(model, images, prompts, eos_id=2, pad_id=0, max_new_tokens=15)
    uncached = generate(model, images, prompts, eos_id=2, pad_id=0, max_new_tokens=15, use_cache=False)
    assert cached == uncached
    assert max(len(seq) for seq in cached) > 3


@CAPACITY
def test_batched_generation_equals_one_at_a_time(tiny_config, capacity_factor):
    tiny_config = tiny_config.updated({"model.decoder.moe.capacity_factor": capacity_factor})
    model = randomized_model(tiny_config)
    images, _ = batch(tiny_config)
    prompts = [[1], [1, 7, 9, 4], [1, 12]]
    together = generate(model, images, prompts, eos_id=2, pad_id=0, max_new_tokens=10)
    alone = [generate(model, images[i:i + 1], [p], eos_id=2, pad_id=0, max_new_tokens=10)[0]
             for i, p in enumerate(prompts)]
    assert together == alone


def test_sampling_is_reproducible_with_a_seed(tiny_config):
    model = randomized_model(tiny_config)
    images, _ = batch(tiny_config)
    options = dict(eos_id=2, pad_id=0, max_new_tokens=10, temperature=1.5, top_k=10, top_p=0.9)
    first = generate(model, images, [[1]] * 3, seed=3, **options)
    assert first == generate(model, images, [[1]] * 3, seed=3, **options)
    assert first != generate(model, images, [[1]] * 3, seed=4, **options)


def test_top_k_one_is_greedy(tiny_config):
    model = randomized_model(tiny_config)
    images, _ = batch(tiny_config)
    greedy = generate(model, images, [[1]] * 3, eos_id=2, pad_id=0, max_new_tokens=10)
    assert greedy == generate(model, images, [[1]] * 3, eos_id=2, pad_id=0, max_new_tokens=10,
                              temperature=1.0, top_k=1, seed=0)


def test_top_p_keeps_only_the_nucleus():
    from moevlm.generate import sample_next

    logits = torch.log(torch.tensor([[0.6, 0.3, 0.05, 0.05]]))
    draws = {int(sample_next(logits, 1.0, top_p=0.8, generator=torch.Generator().manual_seed(s))) for s in range(200)}
    assert draws == {0, 1}


def test_label_smoothing_spreads_each_answer_target_over_the_vocabulary(tiny_config):
    model = VLM(tiny_config.model).eval()
    images, ids = batch(tiny_config, B=2, T=5)
    labels = torch.full_like(ids, -100)
    labels[:, 1:4] = ids[:, 2:5]
    plain, smoothed = model(images, ids, labels=labels), model(images, ids, labels=labels, label_smoothing=0.2)
    log_probs = plain.logits.float().log_softmax(-1)  # the labelled positions' only
    targets = labels[labels != -100]
    by_hand = (0.8 * -log_probs.gather(1, targets[:, None])[:, 0] - 0.2 * log_probs.mean(-1)).mean()
    torch.testing.assert_close(smoothed.lm_loss, by_hand)
    assert torch.equal(plain.logits, smoothed.logits) and not torch.equal(plain.lm_loss, smoothed.lm_loss)
