import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moevlm.data.tokenizer import SPECIAL_TOKENS, Tokenizer
from moevlm.errors import MoevlmError

CORPUS = ["a cat on a mat", "two  dogs\tplay", "Zebra: 3 stripes!", "café über 😀\nnew line"]
KNOWN = sorted(set("".join(CORPUS)))


@pytest.fixture(scope="module")
def char_tok():
    return Tokenizer.train(CORPUS, kind="char")


@pytest.fixture(scope="module")
def bpe_tok():
    return Tokenizer.train(CORPUS * 20, kind="bpe", vocab_size=300)


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_special_ids_are_fixed(kind, char_tok, bpe_tok):
    tok = {"char": char_tok, "bpe": bpe_tok}[kind]
    ids = [tok.pad_id, tok.bos_id, tok.eos_id, tok.unk_id, tok.sep_id]
    assert ids == [0, 1, 2, 3, 4]
    assert [tok._backend.token_to_id(t) for t in SPECIAL_TOKENS] == ids
    assert tok.decode(ids) == ""  # special tokens never show in text


def test_char_vocabulary_is_specials_then_sorted_characters(char_tok):
    assert char_tok.vocab_size == len(SPECIAL_TOKENS) + len(KNOWN)
    assert char_tok.encode("".join(KNOWN)) == list(range(5, 5 + len(KNOWN)))
    assert Tokenizer.train(reversed(CORPUS)).encode("a cat") == char_tok.encode("a cat")


def test_char_unknown_characters_become_unk(char_tok):
    ids = char_tok.encode("a#b")
    assert ids[1] == char_tok.unk_id and len(ids) == 3
    assert char_tok.decode(ids) == "ab"


def test_special_token_text_is_plain_text(char_tok, bpe_tok):
    for tok in (char_tok, bpe_tok):
        ids = tok.encode("<eos>")
        assert tok.eos_id not in ids and len(ids) > 1


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.sampled_from(KNOWN), max_size=40))
def test_char_round_trip(char_tok, text):
    assert char_tok.decode(char_tok.encode(text)) == text


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=40))
def test_bpe_round_trip_any_unicode(bpe_tok, text):
    ids = bpe_tok.encode(text)
    assert bpe_tok.unk_id not in ids
    assert bpe_tok.decode(ids) == text


@settings(max_examples=50, deadline=None)
@given(st.lists(st.text(min_size=1, max_size=20), min_size=1, max_size=5))
def test_char_tokenizer_round_trips_whatever_it_was_trained_on(texts):
    tok = Tokenizer.train(texts, kind="char")
    for text in texts:
        assert tok.decode(tok.encode(text)) == text


@settings(max_examples=25, deadline=None)
@given(corpus=st.lists(st.text(max_size=30), min_size=1, max_size=5), text=st.text(max_size=40))
def test_bpe_trained_on_any_corpus_round_trips_any_text(corpus, text):
    tok = Tokenizer.train(corpus * 5, kind="bpe", vocab_size=300)
    assert tok.decode(tok.encode(text)) == text


def test_bpe_learns_merges_within_vocab_size(bpe_tok):
    assert 256 + len(SPECIAL_TOKENS) < bpe_tok.vocab_size <= 300
    assert len(bpe_tok.encode("a cat on a mat")) < len("a cat on a mat")


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_save_and_load_keep_ids(tmp_path, kind, char_tok, bpe_tok):
    tok = {"char": char_tok, "bpe": bpe_tok}[kind]
    tok.save(tmp_path)
    loaded = Tokenizer.load(tmp_path / "tokenizer.json")
    text = "a cat <eos> on  a mat 😀"
    assert loaded.encode(text) == tok.encode(text)
    assert loaded.vocab_size == tok.vocab_size


def test_load_errors_are_one_line(tmp_path):
    with pytest.raises(MoevlmError, match="tokenizer.json: tokenizer file not found"):
        Tokenizer.load(tmp_path / "tokenizer.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(MoevlmError, match="bad.json: not a valid tokenizer file") as info:
        Tokenizer.load(tmp_path / "bad.json")
    assert "\n" not in str(info.value)
    foreign = Tokenizer.train(["ab"])
    foreign._backend.save(str(tmp_path / "foreign.json"))
    text = (tmp_path / "foreign.json").read_text().replace('"<pad>"', '"<PAD>"')
    (tmp_path / "foreign.json").write_text(text)
    with pytest.raises(MoevlmError, match="not a moevlm tokenizer"):
        Tokenizer.load(tmp_path / "foreign.json")


def test_save_into_a_folder_and_load_tokenizer(tmp_path, char_tok):
    from moevlm.config import ModelConfig
    from moevlm.data.tokenizer_factory import load_tokenizer

    assert char_tok.save(tmp_path) == ["tokenizer.json"]
    loaded = load_tokenizer(tmp_path, ModelConfig())
    assert isinstance(loaded, Tokenizer) and loaded.encode("a cat") == char_tok.encode("a cat")
    assert loaded.encode_conversation([("<image>\na", "cat")], 20) == char_tok.encode_conversation([("a", "cat")], 20)
    with pytest.raises(MoevlmError, match="a char tokenizer is trained on the data"):
        load_tokenizer(None, ModelConfig())
    with pytest.raises(MoevlmError, match="tokenizer.json: tokenizer file not found"):
        load_tokenizer(tmp_path / "nothing", ModelConfig())
