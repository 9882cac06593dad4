"""The tokenizer interface the dataset, generation and training use, and ``load_tokenizer``, which
gives the one a model config asks for: a char or BPE ``Tokenizer`` trained on the data
(data/tokenizer.py) or the pretrained LM's own ``HFTokenizer`` (data/chat.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Protocol

from moevlm.data.chat import HFTokenizer
from moevlm.data.tokenizer import TOKENIZER_FILE, Tokenizer
from moevlm.errors import MoevlmError


class TextTokenizer(Protocol):
    """What every tokenizer offers. Labels from ``encode_conversation`` are next-token targets
    (-100 where there is no loss); ``prompt_ids`` is the prefix generation starts from."""

    pad_id: int
    bos_id: int | None
    eos_id: int

    @property
    def vocab_size(self) -> int: ...

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Iterable[int]) -> str: ...

    def encode_conversation(self, turns: list[tuple[str, str]], max_text_len: int,
                            image: bool = True) -> tuple[list[int], list[int]]:
        """``image`` False: a text-only row, whose text holds no image ids."""

    def prompt_ids(self, prompt: str) -> list[int]: ...

    def save(self, folder: str | Path) -> list[str]: ...


def load_tokenizer(folder: str | Path | None, model_cfg) -> TextTokenizer:
    """The tokenizer a model config asks for.

    ``tokenizer.kind`` char or bpe: ``folder/tokenizer.json`` (these are trained on the data,
    so a folder is needed). ``hf``: the pretrained LM's tokenizer and chat template, from
    ``folder`` when it holds one (a checkpoint), else from ``decoder.pretrained``.
    """
    if model_cfg.tokenizer.kind == "hf":
        return HFTokenizer.for_model(model_cfg, folder)
    if folder is None:
        raise MoevlmError(f"a {model_cfg.tokenizer.kind} tokenizer is trained on the data: "
                          "give the folder holding its tokenizer.json")
    return Tokenizer.load(Path(folder) / TOKENIZER_FILE)
