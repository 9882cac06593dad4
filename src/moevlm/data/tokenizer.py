"""Character and byte-level BPE tokenizers, both kept as one Hugging Face ``tokenizer.json``.

"char" is the seed's scheme (one token per character seen in training, ids after the
specials); unlike the seed, an unseen character becomes ``<unk>`` instead of a KeyError.
"bpe" is byte-level BPE, so every string round-trips and nothing is ever unknown.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import tokenizers
from tokenizers import Regex, decoders, models, pre_tokenizers, trainers

from moevlm.errors import MoevlmError

SPECIAL_TOKENS = ["<pad>", "<bos>", "<eos>", "<unk>", "<sep>"]  # ids 0..4, in this order


class Tokenizer:
    # Fixed by construction (SPECIAL_TOKENS order), and checked by load() for files made elsewhere.
    pad_id, bos_id, eos_id, unk_id, sep_id = range(len(SPECIAL_TOKENS))

    def __init__(self, backend: tokenizers.Tokenizer):
        self._backend = backend
        # Text that happens to contain "<eos>" is text, not the end of a caption. The flag
        # is not stored in tokenizer.json, so it is set here for loaded tokenizers too.
        self._backend.encode_special_tokens = True

    @classmethod
    def train(cls, texts: Iterable[str], kind: str = "char", vocab_size: int = 512) -> "Tokenizer":
        if kind == "char":
            return cls(_char_backend(texts))
        if kind == "bpe":
            return cls(_bpe_backend(texts, vocab_size))
        raise ValueError(f"tokenizer kind must be char or bpe, not {kind!r}")

    @classmethod
    def load(cls, path: str | Path) -> "Tokenizer":
        path = Path(path)
        if not path.is_file():
            raise MoevlmError(f"{path}: tokenizer file not found")
        try:
            backend = tokenizers.Tokenizer.from_file(str(path))
        except Exception as err:  # noqa: BLE001  (the Rust side raises plain Exception)
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise MoevlmError(f"{path}: not a valid tokenizer file: {reason}") from None
        ids = [backend.token_to_id(token) for token in SPECIAL_TOKENS]
        if ids != list(range(len(SPECIAL_TOKENS))):
            raise MoevlmError(f"{path}: not a moevlm tokenizer (special tokens "
                              f"{', '.join(SPECIAL_TOKENS)} must have ids 0..4)")
        return cls(backend)

    def save(self, path: str | Path) -> None:
        self._backend.save(str(path))

    def encode(self, text: str) -> list[int]:
        return self._backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int]) -> str:
        return self._backend.decode(list(ids), skip_special_tokens=True)

    @property
    def vocab_size(self) -> int:
        return self._backend.get_vocab_size(with_added_tokens=True)


def _char_backend(texts: Iterable[str]) -> tokenizers.Tokenizer:
    seen: set[str] = set()
    for text in texts:
        seen.update(text)
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + sorted(seen))}
    backend = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    # Every character (spaces and newlines included) is its own piece, and decoding glues
    # pieces back without separators, so decode(encode(t)) == t for known characters.
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens(SPECIAL_TOKENS)
    return backend


def _bpe_backend(texts: Iterable[str], vocab_size: int) -> tokenizers.Tokenizer:
    backend = tokenizers.Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
        # All 256 byte symbols from the start, so no input is ever out of vocabulary.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(texts, trainer)
    return backend
