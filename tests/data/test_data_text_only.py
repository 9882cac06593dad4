"""Text-only conversation rows: read, tokenized without image ids, collated beside image rows,
and a mixed batch gives every image row the logits and loss it has alone (both model families)."""

import json

import pytest
import torch
from formats import write_mixed_llava
from test_data_chat import ASSISTANT, BOS, END, EOS, USER, hf_tok, w

from moevlm.config import load_config
from moevlm.data.dataset import ImageTextDataset, collate
from moevlm.data.images import ScratchImages
from moevlm.data.records import read_samples
from moevlm.data.tokenizer import Tokenizer
from moevlm.errors import DataError
from moevlm.evaluate import evaluate
from moevlm.models.factory import build_model
from moevlm.models.hf_config import resolve_pretrained
from moevlm.models.vlm import VLM


def test_a_conversation_without_image_is_a_text_only_row(tmp_path):
    samples, _ = read_samples(write_mixed_llava(tmp_path))
    assert [s.image is None for s in samples] == [False, True] * 4
    assert samples[1].turns == [("what is 1 plus one?", "2")]


def test_a_placeholder_in_a_text_only_row_is_a_bad_row(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps([{"conversations": [{"from": "human", "value": "<image> hi"},
                                                   {"from": "gpt", "value": "yo"}]}]))
    with pytest.raises(DataError, match=r"d.json: row 1: <image> placeholder but the row has no image$"):
        read_samples(path)


def test_chat_tokenizer_gives_a_text_only_row_no_image_ids(tmp_path):
    tok = hf_tok(tmp_path)
    ids, labels = tok.encode_conversation([("what is it", "a cat")], 30, image=False)
    assert ids == [BOS, USER, *w("what is it"), END, ASSISTANT, *w("a cat"), END, EOS]
    assert [label for label in labels if label != -100] == [*w("a cat"), END, EOS]


@pytest.mark.parametrize("preload", [True, False])
def test_collate_marks_text_only_rows_and_gives_them_a_blank(tmp_path, preload):
    samples, _ = read_samples(write_mixed_llava(tmp_path, rows=4))
    tok = Tokenizer.train(["what colour red blue is 1 2 3 4 plus one?"], "char", 0)
    dataset = ImageTextDataset(samples, tok, ScratchImages(8), 40, preload=preload)
    batch = collate([dataset[i] for i in range(4)], tok.pad_id)
    assert batch["has_image"].tolist() == [True, False, True, False]
    assert batch["images"].shape == (4, 3, 8, 8)
    assert torch.all(batch["images"][1] == -1) and not torch.all(batch["images"][0] == -1)  # blank: 0 -> -1


def rows_alone_and_mixed(model, images, ids, has_image):
    """Per-row (logits, loss) of each row run alone and of the rows run as one batch."""
    model.eval()
    with torch.no_grad():
        mixed = model(images, ids, ids != 0, has_image=has_image).logits  # all positions': no labels
        alone = [model(images[i:i + 1] if has_image[i] else None, ids[i:i + 1], ids[i:i + 1] != 0).logits
                 for i in range(len(ids))]
    return mixed, alone


def row_loss(logits, labels):
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1),
                                             ignore_index=-100)


def test_scratch_vlm_image_rows_are_the_same_alone_and_in_a_mixed_batch():
    cfg = load_config("tiny", overrides=["decoder.vocab_size=23"]).model
    model = VLM(cfg)
    images = torch.rand(3, 3, cfg.vision.image_size, cfg.vision.image_size) * 2 - 1
    ids = torch.tensor([[1, 5, 6, 7, 2], [1, 8, 9, 2, 0], [1, 4, 4, 0, 0]])
    labels = torch.where(ids > 2, ids, -100)
    has_image = torch.tensor([True, False, True])
    mixed, alone = rows_alone_and_mixed(model, images, ids, has_image)
    for i, logits in enumerate(alone):
        n = int((ids[i] != 0).sum())  # padding's logits are no one's concern
        logits = logits[:, :n]
        assert torch.allclose(mixed[i, :n], logits[0], atol=1e-5), i
        assert torch.isclose(row_loss(mixed[i, :n], labels[i, :n]), row_loss(logits[0], labels[i, :n]), atol=1e-6)
    assert torch.equal(model(images[1:2], ids[1:2], has_image=torch.tensor([False])).logits,
                       model(None, ids[1:2]).logits)
    # a text-only row really ignores its (blank) image, and image rows really use theirs
    other = images.clone()
    other[1] = 1.0
    assert torch.equal(model(other, ids, ids != 0, has_image=has_image).logits, mixed)
    other[0] = 1.0
    assert not torch.allclose(model(other, ids, ids != 0, has_image=has_image).logits[0], mixed[0])


def test_pretrained_vlm_image_rows_are_the_same_alone_and_in_a_mixed_batch(pretrained_parts):
    cfg = resolve_pretrained(load_config("tiny", overrides=[f"model.lm=hf:{pretrained_parts['gpt2']}"]).model)
    model = build_model(cfg)
    img = model.image_token_id
    images = torch.rand(3, 3, cfg.vision.image_size, cfg.vision.image_size) * 2 - 1
    # right-padded with 0 (masked); the image id stands where the image goes
    ids = torch.tensor([[img, 10, 11, 12], [13, 14, 15, 0], [img, 16, 0, 0]])
    mask = ids != 0
    ids_in = ids.masked_fill(~mask, 0)
    has_image = torch.tensor([True, False, True])
    model.eval()
    with torch.no_grad():
        mixed = model(images, ids_in, mask, has_image=has_image).logits
        for i in range(3):
            n = int(mask[i].sum())
            alone = model(images[i:i + 1] if has_image[i] else None, ids_in[i:i + 1, :n]).logits
            assert torch.allclose(mixed[i, :n], alone[0], atol=1e-5), i
        # a batch of text-only rows, its blank images given or not
        assert torch.equal(model(images[:1], ids_in[1:2, :3], has_image=torch.tensor([False])).logits,
                           model(None, ids_in[1:2, :3]).logits)


def test_eval_on_mixed_data_scores_captions_of_image_rows_and_loss_of_all(tmp_path):
    samples, _ = read_samples(write_mixed_llava(tmp_path, rows=6))
    tok = Tokenizer.train(["what colour red green blue is 1 2 3 4 5 6 plus one?"], "char", 0)
    cfg = load_config("tiny", overrides=[f"decoder.vocab_size={tok.vocab_size}"])
    dataset = ImageTextDataset(samples, tok, ScratchImages(cfg.model.vision.image_size), 40)
    result = evaluate(VLM(cfg.model), dataset, tok, batch_size=4, max_new_tokens=3)
    assert result["num_samples"] == 6
    assert [reference for reference, _ in result["predictions"]] == ["red", "blue", "red"]
