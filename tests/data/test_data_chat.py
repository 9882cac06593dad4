"""HFTokenizer: a tiny word-level transformers tokenizer, saved and loaded offline, with and
without a chat template; exact ids and labels, image ids at the placeholder, prefixes."""

import json
import os

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from moevlm.config import DecoderConfig, ModelConfig, VisionConfig
from moevlm.data.chat import HFTokenizer
from moevlm.data.dataset import ImageTextDataset
from moevlm.data.images import ScratchImages
from moevlm.data.records import read_samples
from moevlm.data.tokenizer_factory import load_tokenizer
from moevlm.errors import DataError, MoevlmError

os.environ.setdefault("HF_HUB_OFFLINE", "1")

X = -100
SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>", "<|user|>", "<|assistant|>", "<|end|>"]
WORDS = ["what", "is", "it", "a", "cat", "colour", "black", "USER", "ASSISTANT", ":", ".", "sys"]
V = {w: i for i, w in enumerate(SPECIALS + WORDS)}
BOS, EOS, USER, ASSISTANT, END = V["<bos>"], V["<eos>"], V["<|user|>"], V["<|assistant|>"], V["<|end|>"]
N_IMG, IMG = 3, 40  # image tokens per image; image_token_id (the LM's vocab size: no word has it)
I3 = [IMG] * N_IMG

# Turn markup around every message; the answer's end-of-turn <|end|> is not eos here.
TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m.role == 'user' %}<|user|> {{ m.content }} <|end|> "
            "{% else %}<|assistant|> {{ m.content }} <|end|> {% endif %}{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|> {% endif %}")
# A system prompt, eos = <|end|> ending each turn, and markup (".") after it.
EOS_TEMPLATE = ("sys . {% for m in messages %}{% if m.role == 'user' %}<|user|> {{ m.content }} <|end|> . "
                "{% else %}<|assistant|> {{ m.content }} <|end|> . {% endif %}{% endfor %}"
                "{% if add_generation_prompt %}<|assistant|> {% endif %}")
# Renders an earlier turn differently once the conversation goes on: no consistent prefixes.
BAD_TEMPLATE = ("{% for m in messages %}{% if loop.last %}ASSISTANT {% endif %}{{ m.content }} {% endfor %}"
                "{% if add_generation_prompt %}<|assistant|> {% endif %}")


def save_tokenizer(folder, template=TEMPLATE, eos="<eos>", bos="<bos>", pad="<pad>"):
    backend = Tokenizer(models.WordLevel(V, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=bos, eos_token=eos, pad_token=pad,
                                   unk_token="<unk>",
                                   additional_special_tokens=["<|user|>", "<|assistant|>", "<|end|>"])
    if template is not None:
        fast.chat_template = template
    fast.save_pretrained(str(folder))
    return folder


def model_cfg(source, image_token_id=None) -> ModelConfig:
    cfg = ModelConfig(vision=VisionConfig(image_size=16, patch_size=8),
                      decoder=DecoderConfig(pretrained=str(source), vocab_size=IMG, image_token_id=image_token_id))
    # 3 instead of the 4 patches: short lists to write out below (a derived value no setting gives)
    object.__setattr__(cfg.vision, "num_image_tokens", N_IMG)
    return cfg


def hf_tok(tmp_path, name="tok", **kwargs) -> HFTokenizer:
    folder = save_tokenizer(tmp_path / name, **kwargs)
    tok = load_tokenizer(folder, model_cfg(folder))
    assert isinstance(tok, HFTokenizer)
    return tok


def w(text: str) -> list[int]:
    return [V[word] for word in text.split()]


def check_targets(tok, turns, ids, labels):
    """Every label that is not -100 is an answer or eos token, and every answer token is one."""
    targets = [label for label in labels if label != X]
    answers = [i for _, answer in turns for i in tok.encode(answer)]
    assert [t for t in targets if t not in (EOS, END)] == answers
    assert all(label == X or label == ids[t + 1] for t, label in enumerate(labels))


def test_single_turn_ids_and_labels_with_a_chat_template(tmp_path):
    tok = hf_tok(tmp_path)
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.image_token_id, tok.vocab_size) == (BOS, EOS, 0, IMG, len(V))
    turns = [("<image>\nwhat is it", "a cat")]
    ids, labels = tok.encode_conversation(turns, max_text_len=20)
    # <bos> <|user|> [image] what is it <|end|> <|assistant|> | a cat <|end|> + appended <eos>
    assert ids == [BOS, USER] + I3 + w("what is it") + [END, ASSISTANT] + w("a cat") + [END, EOS]
    assert labels == [X] * 9 + w("a cat") + [END, EOS, X]
    check_targets(tok, turns, ids, labels)
    assert tok.prompt_ids(turns[0][0]) == ids[:10]  # the training prefix, image ids included
    assert tok.decode(ids) == "what is it a cat"  # special tokens and image ids left out


def test_multi_turn_masks_everything_but_the_answers(tmp_path):
    tok = hf_tok(tmp_path)
    turns = [("what is it <image>", "a cat"), ("what colour", "black")]
    ids, labels = tok.encode_conversation(turns, max_text_len=30)
    first = [BOS, USER] + w("what is it") + I3 + [END, ASSISTANT]
    second = [USER] + w("what colour") + [END, ASSISTANT]
    assert ids == first + w("a cat") + [END, EOS] + second + w("black") + [END, EOS]
    assert labels == ([X] * (len(first) - 1) + w("a cat") + [END, EOS] + [X] * len(second)
                      + w("black") + [END, EOS, X])
    check_targets(tok, turns, ids, labels)
    assert ids.count(IMG) == N_IMG


def test_eos_in_the_template_ends_the_targets_and_markup_after_it_is_context(tmp_path):
    tok = hf_tok(tmp_path, template=EOS_TEMPLATE, eos="<|end|>")
    assert tok.eos_id == END
    turns = [("<image> what is it", "a cat"), ("what colour", "black")]
    ids, labels = tok.encode_conversation(turns, max_text_len=40)
    first = w("sys .") + [USER] + I3 + w("what is it") + [END] + w(".") + [ASSISTANT]
    second = w(".") + [USER] + w("what colour") + [END] + w(".") + [ASSISTANT]
    assert ids == first + w("a cat") + [END] + second + w("black") + [END] + w(".")
    assert labels == ([X] * (len(first) - 1) + w("a cat") + [END] + [X] * len(second)
                      + w("black") + [END] + [X, X])
    check_targets(tok, turns, ids, labels)
    assert tok.prompt_ids("<image> what is it") == first


def test_image_goes_first_when_no_prompt_has_a_placeholder(tmp_path):
    tok = hf_tok(tmp_path)
    placed = tok.encode_conversation([("<image>\nwhat is it", "a cat")], 20)
    assert tok.encode_conversation([("what is it", "a cat")], 20) == placed
    assert tok.prompt_ids("what is it") == tok.prompt_ids("<image>\nwhat is it")


def test_caption_rows_are_image_then_caption(tmp_path):
    tok = hf_tok(tmp_path)
    ids, labels = tok.encode_conversation([("", "a cat")], max_text_len=4)  # 4 text tokens: bos a cat eos
    assert ids == [BOS] + I3 + w("a cat") + [EOS]
    assert labels == [X] * 3 + w("a cat") + [EOS, X]
    assert tok.encode_conversation([("<image>", "a cat")], 4) == (ids, labels)  # LLaVA pretrain rows
    assert tok.prompt_ids("") == tok.prompt_ids("<image>") == [BOS] + I3
    with pytest.raises(ValueError, match=r"^text is 5 tokens, longer than decoder.max_text_len 4$"):
        tok.encode_conversation([("", "a cat cat")], max_text_len=4)
    no_bos = hf_tok(tmp_path, "nobos", bos=None)
    assert no_bos.bos_id is None
    assert no_bos.encode_conversation([("", "a cat")], 4)[0] == I3 + w("a cat") + [EOS]


def test_plain_format_without_a_chat_template(tmp_path):
    tok = hf_tok(tmp_path, template=None, pad=None)
    assert not tok.has_chat_template and tok.pad_id == EOS  # no pad token: eos pads
    turns = [("<image>\nwhat is it", "a cat"), ("what colour", "black")]
    ids, labels = tok.encode_conversation(turns, max_text_len=30)
    first = [BOS] + w("USER :") + I3 + w("what is it ASSISTANT :")
    second = w("USER : what colour ASSISTANT :")
    assert ids == first + w("a cat") + [EOS] + second + w("black") + [EOS]
    assert labels == [X] * (len(first) - 1) + w("a cat") + [EOS] + [X] * len(second) + w("black") + [EOS, X]
    check_targets(tok, turns, ids, labels)
    assert tok.prompt_ids(turns[0][0]) == first


def test_text_length_counts_text_tokens_only(tmp_path):
    tok = hf_tok(tmp_path)
    ids, _ = tok.encode_conversation([("<image> what", "a")], max_text_len=8)
    assert len(ids) - N_IMG == 8
    with pytest.raises(ValueError, match=r"^text is 8 tokens, longer than decoder.max_text_len 7$"):
        tok.encode_conversation([("<image> what", "a")], max_text_len=7)


def test_placeholder_and_template_errors(tmp_path):
    tok = hf_tok(tmp_path)
    with pytest.raises(ValueError, match="^2 <image> placeholders for 1 image$"):
        tok.encode_conversation([("<image> what", "a"), ("<image> it", "cat")], 30)
    with pytest.raises(ValueError, match="^2 <image> placeholders for 1 image$"):
        tok.prompt_ids("<image><image> what")
    bad = hf_tok(tmp_path, "bad", template=BAD_TEMPLATE)
    with pytest.raises(MoevlmError, match="does not render a conversation's prefixes consistently") as info:
        bad.encode_conversation([("<image> what", "a")], 30)
    assert "\n" not in str(info.value)


def test_save_and_load_round_trip(tmp_path):
    tok = hf_tok(tmp_path)
    names = tok.save(tmp_path / "ckpt")
    assert "tokenizer.json" in names and "tokenizer_config.json" in names
    assert all((tmp_path / "ckpt" / name).is_file() for name in names)
    # The checkpoint's copy wins over the source (which may be gone or changed by then).
    cfg = model_cfg(tmp_path / "gone")
    again = load_tokenizer(tmp_path / "ckpt", cfg)
    turns = [("<image>\nwhat is it", "a cat"), ("what colour", "black")]
    assert again.encode_conversation(turns, 30) == tok.encode_conversation(turns, 30)
    assert again.prompt_ids("what") == tok.prompt_ids("what")
    with pytest.raises(MoevlmError, match="gone: cannot load the tokenizer"):
        load_tokenizer(tmp_path / "empty", cfg)


def test_image_token_id_from_the_config(tmp_path):
    folder = save_tokenizer(tmp_path / "tok")
    assert load_tokenizer(folder, model_cfg(folder)).image_token_id == IMG  # decoder.vocab_size
    llava = load_tokenizer(folder, model_cfg(folder, image_token_id=7))  # an imported LLaVA's own id
    assert llava.image_token_id == 7 and llava.encode_conversation([("", "a")], 5)[0] == [BOS, 7, 7, 7, V["a"], EOS]


def test_llava_rows_through_the_reader_and_dataset(tmp_path, image_bytes):
    tok = hf_tok(tmp_path)
    (tmp_path / "red.png").write_bytes(image_bytes((255, 0, 0)))
    rows = [{"image": "red.png", "conversations": [{"from": "human", "value": "what is it\n<image>"},
                                                   {"from": "gpt", "value": "a cat"}]},
            {"image": "red.png", "caption": "a cat"},
            {"image": "red.png", "conversations": [{"from": "human", "value": "what is it"},
                                                   {"from": "gpt", "value": "a cat"}]}]
    path = tmp_path / "d.json"
    path.write_text(json.dumps(rows))
    with pytest.raises(DataError, match=f"^{path}: row 3: no <image> placeholder for the row's image$"):
        read_samples(path)
    samples, skipped = read_samples(path, on_bad_row="skip")
    assert len(skipped) == 1
    ds = ImageTextDataset(samples, tok, ScratchImages(4), max_text_len=20)
    first = ds[0]["input_ids"].tolist()
    assert first == [BOS, USER] + w("what is it") + I3 + [END, ASSISTANT] + w("a cat") + [END, EOS]
    assert ds[1]["input_ids"].tolist() == [BOS] + I3 + w("a cat") + [EOS]
    assert ds[0]["labels"].tolist() == tok.encode_conversation(samples[0].turns, 20)[1]
    assert ds.images.shape == (2, 3, 4, 4) and ds.images.dtype == torch.uint8
    with pytest.raises(DataError, match=f"^{path}: row 1: text is 11 tokens, longer than decoder.max_text_len 8$"):
        ImageTextDataset(samples, tok, ScratchImages(4), max_text_len=8)


def test_llava_style_template_and_gpt2_plain_format_on_byte_tokenizers(tmp_path):
    from pretrained_fixtures import gpt2_tokenizer, llama_tokenizer

    turns = [("<image>\nWhat is it?", "A cat."), ("Colour?", "Black.")]
    for name, make, expected in [
        ("llama", llama_tokenizer, ["<s>USER: ", "\nWhat is it? ASSISTANT:", " A cat.</s>", " USER: Colour? ASSISTANT:",
                                    " Black.</s>", " "]),
        ("gpt2", gpt2_tokenizer, ["<|endoftext|>USER: ", "\nWhat is it?\nASSISTANT:", " A cat.<|endoftext|>",
                                  "\nUSER: Colour?\nASSISTANT:", " Black.<|endoftext|>", ""])]:
        make().save_pretrained(str(tmp_path / name))
        tok = HFTokenizer.from_pretrained(tmp_path / name, N_IMG, 999)
        ids, labels = tok.encode_conversation(turns, 100)
        # Split the ids where their role changes: context, image, context, answer, context ...
        runs, roles = [], []
        for t, i in enumerate(ids):
            role = "image" if i == 999 else "answer" if t and labels[t - 1] != X else "context"
            if not roles or roles[-1] != role:
                runs.append([])
                roles.append(role)
            runs[-1].append(i)
        text = [tok._tok.decode(run) for run, role in zip(runs, roles) if role != "image"]
        assert roles[:4] == ["context", "image", "context", "answer"]
        assert text == [part for part in expected if part], name
        assert tok.prompt_ids(turns[0][0]) == sum(runs[:3], [])
