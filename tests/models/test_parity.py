"""Parity with transformers: our PretrainedVLM / HFVisionTower / imported LLaVA give the logits
and features the transformers models give for the same weights and inputs (fp32, CPU).

All models are tiny random ones saved into tmp pretrained_parts (tests/pretrained_fixtures.py)."""

import pytest
import torch
from transformers import AutoModelForCausalLM, CLIPVisionModel, LlavaForConditionalGeneration, SiglipVisionModel

from moevlm.config import load_config
from moevlm.models.factory import build_model, import_llava
from moevlm.models.hf_config import resolve_pretrained
from pretrained_fixtures import IMAGE_TOKEN_ID, NUM_PATCHES

pytestmark = pytest.mark.usefixtures("offline")


def model_for(*overrides):
    return build_model(resolve_pretrained(load_config("tiny", overrides=list(overrides)).model)).eval()


def images_and_pixels(B, mean, std, seed=0):
    """Images in [-1, 1] (what moevlm models take) and the processor-normalised pixel_values."""
    images = torch.rand(B, 3, 32, 32, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    mean, std = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    return images, ((images + 1) / 2 - mean) / std


@pytest.mark.parametrize("lm", ["llama", "gpt2"])
def test_text_logits_equal_the_transformers_lm(pretrained_parts, lm):
    model = model_for(f"model.lm=hf:{pretrained_parts[lm]}")
    reference = AutoModelForCausalLM.from_pretrained(pretrained_parts[lm]).eval()
    ids = torch.randint(3, 250, (3, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0  # right padding, as in training batches
    with torch.no_grad():
        ours = model(None, ids, mask).logits
        theirs = reference(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(ours[mask.bool()], theirs[mask.bool()])


@pytest.mark.parametrize("lm", ["llama", "gpt2"])
def test_left_padded_rows_equal_the_transformers_lm_on_each_row_alone(pretrained_parts, lm):
    model = model_for(f"model.lm=hf:{pretrained_parts[lm]}")
    reference = AutoModelForCausalLM.from_pretrained(pretrained_parts[lm]).eval()
    rows = [[5, 9, 40, 41, 7, 100], [6, 7], [200, 3, 77, 18]]
    width = max(map(len, rows))
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    with torch.no_grad():
        ours = model(None, ids, mask).logits
        for i, row in enumerate(rows):
            theirs = reference(input_ids=torch.tensor([row])).logits[0]
            torch.testing.assert_close(ours[i, width - len(row):], theirs)


def test_image_positions_carry_the_projected_image_features(pretrained_parts):
    model = model_for(f"model.vision=hf:{pretrained_parts['clip']}", f"model.lm=hf:{pretrained_parts['llama']}")
    image_id = model.image_token_id
    assert image_id == 260 and model.num_image_tokens == NUM_PATCHES  # vocab size: no text token has it
    ids = torch.tensor([[1] + [image_id] * NUM_PATCHES + [50, 60, 70]] * 2)
    images, _ = images_and_pixels(2, [0.5] * 3, [0.5] * 3)
    with torch.no_grad():
        ours = model(images, ids).logits
        embeds = model.lm.get_input_embeddings()(ids.clamp(max=259))
        embeds[:, 1:1 + NUM_PATCHES] = model.encode_images(images)
        theirs = model.lm(inputs_embeds=embeds).logits
    torch.testing.assert_close(ours, theirs)


@pytest.mark.parametrize("which,keep_cls", [("llava", False), ("llava_full", True)])
def test_imported_llava_gives_the_logits_of_transformers_llava(pretrained_parts, which, keep_cls):
    model, cfg = import_llava(pretrained_parts[which])
    model.eval()
    reference = LlavaForConditionalGeneration.from_pretrained(pretrained_parts[which]).eval()
    n = NUM_PATCHES + keep_cls
    assert (cfg.vision.keep_cls, cfg.vision.num_image_tokens, model.image_token_id) == (keep_cls, n, IMAGE_TOKEN_ID)
    assert cfg.vision.feature_layer == reference.config.vision_feature_layer
    tower = model.vision
    images, pixels = images_and_pixels(2, tower.pixel_mean.tolist(), tower.pixel_std.tolist())
    # The prompt as LlavaProcessor expands it: <s> n x <image> then text.
    ids = torch.tensor([[1] + [IMAGE_TOKEN_ID] * n + [80, 90, 100, 110]] * 2)
    ids[1, -1] = 120
    with torch.no_grad():
        ours = model(images, ids).logits
        theirs = reference(input_ids=ids, pixel_values=pixels).logits
    torch.testing.assert_close(ours, theirs)


@pytest.mark.parametrize("keep_cls,layer", [(False, -2), (True, -2), (False, -1), (False, 1)])
def test_clip_tower_features_are_the_chosen_hidden_state(pretrained_parts, keep_cls, layer):
    model = model_for(f"model.vision=hf:{pretrained_parts['clip']}", f"vision.keep_cls={keep_cls}",
                      f"vision.feature_layer={layer}", "decoder.vocab_size=23")
    reference = CLIPVisionModel.from_pretrained(pretrained_parts["clip"]).eval()
    tower = model.vision
    # The tower's normalisation comes from the folder's preprocessor_config.json (CLIP's).
    torch.testing.assert_close(tower.pixel_mean, torch.tensor([0.48145466, 0.4578275, 0.40821073]))
    images, pixels = images_and_pixels(2, tower.pixel_mean.tolist(), tower.pixel_std.tolist())
    with torch.no_grad():
        hidden = reference(pixel_values=pixels, output_hidden_states=True).hidden_states[layer]
        features = tower(images)
    assert features.shape == (2, NUM_PATCHES + keep_cls, 32)
    torch.testing.assert_close(features, hidden if keep_cls else hidden[:, 1:])


def test_siglip_tower_features_are_every_patch_of_the_chosen_hidden_state(pretrained_parts):
    model = model_for(f"model.vision=hf:{pretrained_parts['siglip']}", "decoder.vocab_size=23")
    reference = SiglipVisionModel.from_pretrained(pretrained_parts["siglip"]).eval()
    images, pixels = images_and_pixels(2, [0.5] * 3, [0.5] * 3)
    with torch.no_grad():
        hidden = reference(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]
        features = model.vision(images)
    assert features.shape == (2, NUM_PATCHES, 32)
    torch.testing.assert_close(features, hidden)
