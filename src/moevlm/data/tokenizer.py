"""Character and byte-level BPE tokenizers, both kept as one Hugging Face ``tokenizer.json``.

"char" is the seed's scheme (one token per character seen in training, ids after the
specials); unlike the seed, an unseen character becomes ``<unk>`` instead of a KeyError.
"bpe" is byte-level BPE, so every string round-trips and nothing is ever unknown.

Both, and a pretrained LM's own tokenizer (``data/chat.py``), offer the interface written down as
``TextTokenizer`` in ``data/tokenizer_factory.py``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import tokenizers
from tokenizers import Regex, decoders, models, pre_tokenizers, trainers

from moevlm.data.records import clean_prompt
from moevlm.errors import MoevlmError

SPECIAL_TOKENS = ["<pad>", "<bos>", "<eos>", "<unk>", "<sep>"]  # ids 0..4, in this order
TOKENIZER_FILE = "tokenizer.json"
IGNORE_INDEX = -100  # F.cross_entropy's default ignore_index: no loss at this position


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

    def save(self, folder: str | Path) -> list[str]:
        """Writes ``tokenizer.json`` into ``folder``; returns the file names written."""
        self._backend.save(str(Path(folder) / TOKENIZER_FILE))
        return [TOKENIZER_FILE]

    def encode_conversation(self, turns: list[tuple[str, str]], max_text_len: int,
                            image: bool = True) -> tuple[list[int], list[int]]:
        """Token ids and next-token labels for a conversation (images are not in the text:
        the scratch model puts its image tokens before it).

        ``input_ids = [bos] + per turn: (prompt + [sep] if prompt) + answer + [eos]``;
        ``labels[t] = input_ids[t + 1]`` when that token is part of an answer (its closing
        ``<eos>`` included), else -100: prompts and padding are never targets, and the first
        answer token is predicted from ``<bos>`` or ``<sep>``. ``<image>`` placeholders are
        dropped from the prompts (``clean_prompt``). ``image`` False (a text-only row) changes
        nothing here: the model, not the text, leaves its image tokens out.
        """
        input_ids = [self.bos_id]
        is_target = [False]
        for prompt, answer in turns:
            prompt = clean_prompt(prompt)
            if prompt:
                context = self.encode(prompt) + [self.sep_id]
                input_ids += context
                is_target += [False] * len(context)
            reply = self.encode(answer) + [self.eos_id]
            input_ids += reply
            is_target += [True] * len(reply)
        if len(input_ids) > max_text_len:
            raise ValueError(f"text is {len(input_ids)} tokens, longer than decoder.max_text_len {max_text_len}")
        labels = [tok if target else IGNORE_INDEX for tok, target in zip(input_ids[1:], is_target[1:])]
        return input_ids, labels + [IGNORE_INDEX]

    def prompt_ids(self, prompt: str) -> list[int]:
        """What generation starts from: the same prefix encode_conversation gives a first turn."""
        prompt = clean_prompt(prompt)
        return [self.bos_id] + (self.encode(prompt) + [self.sep_id] if prompt else [])

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
