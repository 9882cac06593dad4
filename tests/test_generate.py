"""generate's length limit and cache size for models with image tokens before or inside the
text, and caption()'s image preparation (a stand-in model that records what it is given)."""

import torch
from PIL import Image

from moevlm.config import DecoderConfig, ModelConfig, VisionConfig
from moevlm.data.images import image_to_tensor
from moevlm.generate import caption, generate


class Recorder(torch.nn.Module):
    """Always predicts token 5 (never eos); records the cache size and the pixels it saw."""

    def __init__(self, images_in_text: bool, num_image_tokens: int = 4, max_text_len: int = 10):
        super().__init__()
        self.cfg = ModelConfig(vision=VisionConfig(image_size=8, patch_size=4),
                               decoder=DecoderConfig(max_text_len=max_text_len))
        self.num_image_tokens, self.images_in_text = num_image_tokens, images_in_text
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.cache_len, self.images = None, None

    def _logits(self, batch):
        logits = torch.zeros(batch, 8)
        logits[:, 5] = 1
        return logits

    def new_cache(self, batch, max_len):
        self.cache_len = max_len
        return object()

    def prefill(self, images, ids, mask, cache=None):
        self.images = images
        return self._logits(ids.size(0)), mask

    def step(self, token, key_mask, cache):
        return self._logits(token.size(0))


def test_limit_counts_image_ids_only_when_they_are_in_the_text():
    prompt = [1] * 6
    prepended = Recorder(images_in_text=False)
    assert len(generate(prepended, torch.zeros(1, 3, 8, 8), [prompt], eos_id=2, pad_id=0, max_new_tokens=99)[0]) == 4
    assert prepended.cache_len == 4 + 6 + 4  # image tokens before the text, prompt, new tokens
    in_text = Recorder(images_in_text=True)
    # The prompt holds 4 image ids and 2 text tokens: 10 - 2 = 8 text tokens may follow.
    assert len(generate(in_text, torch.zeros(1, 3, 8, 8), [prompt], eos_id=2, pad_id=0, max_new_tokens=99)[0]) == 8
    assert in_text.cache_len == 6 + 8


class PromptTokenizer:
    bos_id, eos_id, pad_id = 1, 2, 0

    def prompt_ids(self, prompt):
        return [1, 3]

    def decode(self, ids):
        return " ".join(map(str, ids))


def test_caption_prepares_images_like_the_training_data():
    model = Recorder(images_in_text=False, max_text_len=4)
    img = Image.new("RGB", (20, 10), (255, 0, 0))
    assert caption(model, PromptTokenizer(), [img], max_new_tokens=2) == ["5 5"]
    expected = image_to_tensor(img, 8, 3).float() / 127.5 - 1  # the scratch resize, by default
    assert torch.equal(model.images[0], expected)
    seen = []
    caption(model, PromptTokenizer(), [img, img], prepare_image=lambda im: seen.append(im.size)
            or torch.full((3, 8, 8), 255, dtype=torch.uint8), max_new_tokens=1)
    assert seen == [(20, 10)] * 2 and bool((model.images == 1).all())


def test_a_temperature_below_the_floor_and_top_p_zero_generate_the_greedy_answer():
    from moevlm.generate import sample_next

    torch.manual_seed(0)
    logits = torch.randn(3, 40) * 50
    greedy = logits.argmax(-1)
    for temperature in (1e-40, 5e-324, 0.0):
        assert torch.equal(sample_next(logits, temperature, generator=torch.Generator().manual_seed(1)), greedy)
    for seed in range(20):  # any temperature: top_p 0 keeps the top token alone
        assert torch.equal(sample_next(logits, 2.0, top_p=0.0, generator=torch.Generator().manual_seed(seed)), greedy)
    model = Recorder(images_in_text=False)
    out = generate(model, torch.zeros(2, 3, 8, 8), [[1], [1, 3]], eos_id=2, pad_id=0, max_new_tokens=3,
                   temperature=1e-40, seed=0)
    assert out == [[5, 5, 5], [5, 5, 5]]
