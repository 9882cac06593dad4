"""A pretrained LM's own tokenizer and chat template, with the image placed in the text.

``HFTokenizer`` wraps a ``transformers`` tokenizer behind the interface the dataset and
generation use (see ``data/tokenizer.py``). A pretrained LM reads its image tokens from the
text itself: ``num_image_tokens`` copies of ``image_token_id`` stand where the prompt had
LLaVA's ``<image>`` placeholder, and the model swaps them for image features (as
``LlavaForConditionalGeneration`` does).

Three layouts, all with ``labels[t] = input_ids[t + 1]`` on answer tokens only:

- conversation, with a chat template: the tokenizer's own template (system prompt, role
  markup ...); targets are each assistant answer up to and including ``eos`` (appended
  after the answer's end-of-turn markup when the template does not write it itself);
- conversation, without a chat template (GPT-2 and other base LMs), a plain format:
  ``[bos] "USER: {prompt}\\nASSISTANT:" " {answer}" [eos]`` and, for later turns,
  ``"\\nUSER: ..."``;
- caption (a single turn with an empty prompt, LLaVA's pretraining "plain" style):
  ``[bos] + image ids + caption + [eos]``, loss on the caption and ``eos``.

The answer spans come from rendering prefixes of the conversation (up to a user turn with
the generation prompt, then with the answer) and tokenizing the pieces separately, so
``prompt_ids`` gives exactly the prefix a training row had before its first answer.
"""

from __future__ import annotations

import os
from pathlib import Path

from moevlm.data.records import IMAGE_PLACEHOLDER, clean_prompt
from moevlm.data.tokenizer import IGNORE_INDEX
from moevlm.errors import MoevlmError

# In the chat template of a model trained from scratch and exported (``moevlm export``): the template
# writes moevlm's own layout (image, <bos>, prompt, <sep>), plain captions included.
MOEVLM_LAYOUT_MARKER = "moevlm prompt layout"
# Files a saved transformers tokenizer has at least one of.
_TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json")
# (text or token ids, is_target); text pieces may still hold the image placeholder.
Piece = tuple[str | list[int], bool]


class HFTokenizer:
    def __init__(self, tokenizer, num_image_tokens: int, image_token_id: int):
        self._tok = tokenizer
        self.num_image_tokens = num_image_tokens
        self.image_token_id = image_token_id
        self.eos_id: int = tokenizer.eos_token_id
        if self.eos_id is None:
            raise MoevlmError(f"the tokenizer of {tokenizer.name_or_path} has no eos token; "
                              "answers need one to end")
        self.bos_id: int | None = tokenizer.bos_token_id
        # Padding is never attended to nor a target, so eos serves when there is no pad token.
        self.pad_id: int = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_id

    @classmethod
    def from_pretrained(cls, source: str | Path, num_image_tokens: int, image_token_id: int) -> "HFTokenizer":
        # Lazy: transformers takes seconds to import.
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(str(source))
        except (OSError, ValueError) as err:
            offline = " (with HF_HUB_OFFLINE=1 give a local folder or a cached hub id)" \
                if os.environ.get("HF_HUB_OFFLINE") else ""
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise MoevlmError(f"{source}: cannot load the tokenizer{offline}: {reason}") from None
        return cls(tokenizer, num_image_tokens, image_token_id)

    @classmethod
    def for_model(cls, model_cfg, folder: str | Path | None = None) -> "HFTokenizer":
        """The LM's tokenizer: from ``folder`` when it holds one (a checkpoint), else from the
        LM's source; image ids from the model config."""
        source = model_cfg.decoder.pretrained
        if folder is not None and any((Path(folder) / name).is_file() for name in _TOKENIZER_FILES):
            source = folder
        if source is None:
            raise MoevlmError("tokenizer.kind hf needs a pretrained LM (model.lm=hf:ID)")
        image_token_id = model_cfg.decoder.image_token_id
        if image_token_id is None:
            # The LM's embedding rows: an id no text token has (models/hf_config.py fills it in).
            assert model_cfg.decoder.vocab_size > 0, "resolve the pretrained config first"
            image_token_id = model_cfg.decoder.vocab_size
        return cls.from_pretrained(source, model_cfg.vision.num_image_tokens, image_token_id)

    @property
    def vocab_size(self) -> int:
        return len(self._tok)

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self._tok, "chat_template", None))

    @property
    def _template_says_all(self) -> bool:
        """The template lays out plain captions too (an exported scratch model's)."""
        return self.has_chat_template and MOEVLM_LAYOUT_MARKER in self._tok.chat_template

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False)

    def decode(self, ids) -> str:
        """Text without special tokens or surrounding whitespace (answers are stored stripped)."""
        return self._tok.decode([i for i in ids if i != self.image_token_id], skip_special_tokens=True).strip()

    def save(self, folder: str | Path) -> list[str]:
        """``save_pretrained`` into ``folder``; returns the file names written."""
        written = self._tok.save_pretrained(str(folder))
        return sorted({Path(path).name for path in written if Path(path).is_file()})

    # -- conversations ---------------------------------------------------------------------

    def encode_conversation(self, turns: list[tuple[str, str]], max_text_len: int,
                            image: bool | int = True) -> tuple[list[int], list[int]]:
        """Token ids (image ids included) and next-token labels; see the module docstring.

        ``max_text_len`` counts text tokens only; a longer row raises ValueError. ``image``
        False: a text-only conversation, with no image ids; a number: that many images, each at
        its placeholder in the prompts (the server's conversations with several images).
        """
        if image == 1 and _is_caption(turns) and not self._template_says_all:
            pieces = self._caption_prefix() + [(self.encode(turns[0][1]) + [self.eos_id], True)]
        else:
            pieces = self._conversation_pieces(turns, image=image)
        input_ids, is_target = self._tokenize(pieces, images=int(image))
        text_len = len(input_ids) - self.num_image_tokens * int(image)
        if text_len > max_text_len:
            raise ValueError(f"text is {text_len} tokens, longer than decoder.max_text_len {max_text_len}")
        labels = [tok if target else IGNORE_INDEX for tok, target in zip(input_ids[1:], is_target[1:])]
        return input_ids, labels + [IGNORE_INDEX]

    def prompt_ids(self, prompt: str) -> list[int]:
        """The prefix generation starts from: what a training row with this first prompt has
        before its first answer token (image ids and the template's generation prompt included)."""
        turns = [(prompt, "")]
        if _is_caption(turns) and not self._template_says_all:
            pieces = self._caption_prefix()
        else:
            pieces = self._conversation_pieces(turns, prefix_only=True)
        return self._tokenize(pieces)[0]

    def _caption_prefix(self) -> list[Piece]:
        return [([self.bos_id] if self.bos_id is not None else [], False), (IMAGE_PLACEHOLDER, False)]

    def _conversation_pieces(self, turns: list[tuple[str, str]], prefix_only: bool = False,
                             image: bool | int = True) -> list[Piece]:
        """Context and answer pieces of a conversation, with the image placeholder in the text
        (none for a text-only row; with several images, one placeholder each already there)."""
        count = sum(prompt.count(IMAGE_PLACEHOLDER) for prompt, _ in turns)
        if count > int(image) or int(image) > 1 and count != int(image):
            raise ValueError(f"{count} {IMAGE_PLACEHOLDER} placeholders for {int(image)} image")
        if count == 0 and image:  # as LLaVA writes it: the image first in the first user message
            turns = [(f"{IMAGE_PLACEHOLDER}\n{turns[0][0]}", turns[0][1])] + list(turns[1:])
        if not self.has_chat_template:
            return self._plain_pieces(turns, prefix_only)
        return self._template_pieces(turns, prefix_only)

    def _plain_pieces(self, turns: list[tuple[str, str]], prefix_only: bool) -> list[Piece]:
        pieces: list[Piece] = [([self.bos_id] if self.bos_id is not None else [], False)]
        for i, (prompt, answer) in enumerate(turns):
            separator = "" if i == 0 else "\n"
            pieces.append((f"{separator}USER: {prompt}\nASSISTANT:", False))
            if prefix_only:
                break
            pieces.append((self.encode(f" {answer}") + [self.eos_id], True))
        return pieces

    def _template_pieces(self, turns: list[tuple[str, str]], prefix_only: bool) -> list[Piece]:
        messages: list[dict] = []
        pieces: list[Piece] = []
        done = ""  # the rendered text covered by the pieces so far
        for prompt, answer in turns:
            messages.append({"role": "user", "content": prompt})
            asking = self._render(messages, add_generation_prompt=True)
            pieces.append((self._continuation(done, asking), False))
            if prefix_only:
                break
            messages.append({"role": "assistant", "content": answer})
            answered = self._render(messages, add_generation_prompt=False)
            pieces += self._answer_pieces(self._continuation(asking, answered))
            done = answered
        return pieces

    def _answer_pieces(self, text: str) -> list[Piece]:
        """Targets up to and including the first eos; markup after it (a newline between
        turns) stays context, since generation stops at eos. No eos in the template's
        assistant turn: one is appended, so every answer ends with it."""
        ids = self.encode(text)
        if self.eos_id not in ids:
            return [(ids + [self.eos_id], True)]
        end = ids.index(self.eos_id) + 1
        return [(ids[:end], True), (ids[end:], False)]

    def _render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        return self._tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    def _continuation(self, before: str, after: str) -> str:
        if not after.startswith(before):
            raise MoevlmError(f"the chat template of {self._tok.name_or_path} does not render a conversation's "
                              "prefixes consistently (a longer conversation changes earlier text), so answer "
                              "spans cannot be found; use a model whose template does")
        return after[len(before):]

    def _tokenize(self, pieces: list[Piece], images: int = 1) -> tuple[list[int], list[bool]]:
        """Token ids and target flags; the placeholder (``images`` of them: 1, or 0 for a
        text-only row) becomes ``num_image_tokens`` image ids."""
        ids: list[int] = []
        target: list[bool] = []
        found = 0
        for piece, is_target in pieces:
            if isinstance(piece, list):
                ids += piece
                target += [is_target] * len(piece)
                continue
            for k, text in enumerate(piece.split(IMAGE_PLACEHOLDER)):
                if k:
                    found += 1
                    ids += [self.image_token_id] * self.num_image_tokens
                    target += [False] * self.num_image_tokens
                part = self.encode(text) if text else []
                ids += part
                target += [is_target] * len(part)
        if found != images:
            raise MoevlmError(f"the chat template of {self._tok.name_or_path} wrote {found} image placeholders "
                              f"for {images} image")
        return ids, target


def _is_caption(turns: list[tuple[str, str]]) -> bool:
    """A single turn whose prompt is empty apart from the placeholder: LLaVA's plain format."""
    return len(turns) == 1 and not clean_prompt(turns[0][0])
