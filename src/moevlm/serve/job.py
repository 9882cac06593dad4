"""What the engine (serve/engine.py) keeps of each request (``Job``) and of each batch it decodes
(``Lane``), and which text a streaming job must hold back."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from moevlm.serve.sampling import SamplingParams
from moevlm.serve.slots import SlotTable


@dataclass
class Job:
    """One chat completion (one choice of it) as the engine sees it. ``pixels``: uint8 (C, S, S),
    prepared for the model, the conversation's first image (None: text only); ``more_pixels``: the
    others, for a model with ``images_in_text`` (its prompt holds image ids for each)."""

    prompt_ids: list[int]
    pixels: torch.Tensor | None
    max_tokens: int
    emit: Callable[[tuple], None]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    routing: bool = False
    cancelled: bool = False  # set by the server when the client goes away
    submitted: float = field(default_factory=time.perf_counter)
    queued: float = 0.0  # when it entered the engine's queue (perf_counter)
    # decoding state, the engine's alone
    sampled: int = 0
    generated: list[int] = field(default_factory=list)
    text: str = ""  # decoded so far
    sent: str = ""  # handed to emit so far
    pending: list[dict] = field(default_factory=list)  # per-token details not sent yet
    next_experts: list[list[int]] = field(default_factory=list)  # per MoE layer, for the next token
    generator: torch.Generator | None = None
    more_pixels: list[torch.Tensor] = field(default_factory=list)
    next_logprobs: dict | None = None  # the next token's, once it is sampled

    @property
    def images(self) -> list[torch.Tensor]:
        return ([] if self.pixels is None else [self.pixels]) + self.more_pixels


def _held_back(text: str, stops: list[str]) -> int:
    """How many characters at the end of ``text`` might still become a stop string (or are an
    unfinished multi-byte character), and so must not be sent yet."""
    hold = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), hold, -1):
            if stop.startswith(text[-size:]):
                hold = size
                break
    return max(hold, 1 if text.endswith("\ufffd") else 0)


@dataclass
class Lane:
    """Jobs decoding together, their batch (a ``DecodeBatch``, or the ``SlotTable`` of a compiled
    lane) and their next-token logits."""

    slots: SlotTable | None = None  # None: the eager lane
    jobs: list[Job] = field(default_factory=list)
    batch: object = None
    logits: torch.Tensor | None = None
