"""Compiled decoding (``generate(..., compile=True)``, ``--compile``): one ``torch.compile``d decoding
step over a static, preallocated KV cache.

The step is the model's ``decode_step`` (models/vlm.py, models/hf_lm.py): every shape fixed, the
cache written in place at a slot held in a tensor, positions taken from the key mask, the MoE
experts on static shapes (``MoE.experts_static``), so it compiles as one graph
(``fullgraph=True, dynamic=False``). Batches are padded to a power of two (1, 2, 4, 8, ...) and
cache lengths to a power of two (at least ``MIN_LENGTH``), each such shape one graph, so a new batch
size or prompt length within a bucket reuses it. The prefill writes into the same buffers: compiled
too for a model that says it traces as one graph (``prefill_compiles``: moevlm's own ``VLM``), its
prompts left-padded to a power-of-two width (at least ``MIN_PROMPT``), one graph per (batch, width);
eager otherwise (a transformers LM's prefill scatters image features at data-dependent places).
Inductor with its C++ wrapper on a CPU; CUDA graphs (``mode="reduce-overhead"``) on a GPU.

Greedy decoding (``greedy``) of a small model runs ``GREEDY_STEPS`` steps per call of its own graph, each
step's argmax fed to the next inside it: each call pays dynamo's guards and the wrapper's hand-over of
every weight and cache tensor, which on a CPU is a large part of a small model's step; the last few
tokens, fewer than a call makes, come from the one-step graph. A model of ``SMALL_MODEL`` parameters or
more decodes greedily one step per call: its step dwarfs that cost, and unrolling would multiply its
compile time. Sampling (and the server's slot table) call the one-step graph (``run``).

The compiled step, its graphs and its caches are kept on the model object (``compiled_decoder``),
so later calls do not compile again. Where compiling fails (no C++ compiler, a platform without
``torch.compile``, an LM that does not trace), one line on stderr says so and the same static step
runs eagerly. Not thread-safe: one generation at a time per model.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator

import torch

from moevlm.models.protocol import VisionLanguageModel

MIN_LENGTH = 32
# Steps per call of the greedy graph of a small model. Measured on the demo model (CPU time of a
# call, 1 thread, other jobs running): 0.57 ms a token at 2, 0.50 at 4 (0.72 at 1 in wall time);
# compiling takes about that many times as long as one step's graph.
GREEDY_STEPS = 4
# From this many parameters greedy decoding calls the one-step graph: at the SmolLM2-135M shape with 15 MoE
# layers a call's guards took ~1 ms of a 59 ms step, and two steps per call decoded no faster (59 ms a token).
SMALL_MODEL = 50_000_000
# Prompt widths are padded to a power of two (at least this) where the prefill is compiled.
MIN_PROMPT = 8
# Buckets of several models (and of prompt lengths) in one process are graphs of the same code;
# dynamo's default limit of 8 per code object would quietly fall back to eager past it.
RECOMPILE_LIMIT = 64
# On a CPU, graphs of more decoder layers than this (a greedy graph counts each layer once per step) build
# the C++ wrapper apart from the kernels, at -O1 (inductor's cpp_wrapper_build_separate; the kernels stay
# at -O3). The wrapper is one function calling every kernel of the graph in turn, and gcc's -O3 time on it
# grows faster than its length: the two-step greedy graph the SmolLM2-135M shape with 15 MoE layers compiled
# before it went to one step per call (a 0.9 MB file) took over 12 minutes of one core at -O3 and 22 s at
# -O1. Smaller graphs keep the -O3 wrapper, built with the kernels: its calls are a larger part of a short
# step (the demo model's batch-1 token, 0.57 ms, was about 2.5 % slower with the -O1 wrapper in an A/B on a
# busy machine; a 30-layer step takes tens of ms).
SEPARATE_WRAPPER_LAYERS = 16


def bucket(n: int, least: int = 1) -> int:
    """The power of two at or above both ``n`` and ``least``."""
    return max(least, 1 << max(0, n - 1).bit_length())


def _compile(step: Callable, device: torch.device, layers: int) -> Callable:
    """``step`` compiled for ``device``; ``layers``: decoder layers the graph runs through."""
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    if device.type == "cuda":
        return torch.compile(step, fullgraph=True, dynamic=False, mode="reduce-overhead")
    if device.type == "cpu":
        # A MoE layer's picked expert is a view at an index read with .item() on a CPU
        # (MoE.expert_weights): captured into the graph, not a graph break. Set for the process:
        # patching it around each call cost 0.27 ms, a third of a step.
        torch._dynamo.config.capture_scalar_outputs = True
        # The C++ wrapper calls the kernels without Python in between: +12 % at batch 1 here.
        options = {"cpp_wrapper": True, "cpp_wrapper_build_separate": layers > SEPARATE_WRAPPER_LAYERS}
        return torch.compile(step, fullgraph=True, dynamic=False, options=options)
    return torch.compile(step, fullgraph=True, dynamic=False)


class StaticBuffers:
    """What one (batch bucket, length bucket) graph reads and writes: the model's static cache, the
    key mask (batch, length) and the token fed (batch,)."""

    def __init__(self, model: VisionLanguageModel, batch: int, length: int, device: torch.device):
        self.key = (batch, length)
        self.cache = model.new_static_cache(batch, length)
        self.key_mask = torch.zeros(batch, length, dtype=torch.bool, device=device)
        self.tokens = torch.zeros(batch, dtype=torch.long, device=device)
        if device.type == "cuda":  # CUDA graphs replay on fixed addresses
            for tensor in (self.key_mask, self.tokens, *self.cache.tensors()):
                torch._dynamo.mark_static_address(tensor)


class CompiledDecoder:
    """A model's compiled decoding step, its static buffers per bucket, and how long each bucket's
    first step took (``compile_seconds``, compiling included)."""

    def __init__(self, model: VisionLanguageModel):
        self.model = model
        self.device = next(model.parameters()).device
        small = sum(param.numel() for param in model.parameters()) < SMALL_MODEL
        self.steps_per_call = GREEDY_STEPS if small else 1  # of greedy decoding
        self.step: Callable | None = None
        self.greedy_steps: Callable | None = None
        self.prefill_graph: Callable | None = None  # None: the prefill runs eagerly
        self.eager_reason: str | None = None  # set when compiling failed: the steps then run eagerly
        depth = model.cfg.decoder.depth
        try:
            self.step = _compile(model.decode_step, self.device, depth)
            if self.steps_per_call > 1:
                self.greedy_steps = _compile(self._greedy_steps, self.device, depth * self.steps_per_call)
            if getattr(model, "prefill_compiles", False):
                self.prefill_graph = _compile(model.prefill, self.device, depth)
        except Exception as err:  # torch.compile itself refused (platform, Python version)
            self._give_up(err)
        self.buffers: dict[tuple[int, int], StaticBuffers] = {}
        self.compile_seconds: dict[tuple[int, int], float] = {}

    def _give_up(self, err: Exception) -> None:
        reason = f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"
        self.eager_reason = reason[:300]
        print(f"moevlm: compiled decoding unavailable ({self.eager_reason}); decoding eagerly", file=sys.stderr)

    def buffers_for(self, batch: int, length: int) -> StaticBuffers:
        """The static buffers of one (batch bucket, length bucket), made at the first call."""
        if (batch, length) not in self.buffers:
            self.buffers[batch, length] = StaticBuffers(self.model, batch, length, self.device)
        return self.buffers[batch, length]

    def _call(self, compiled: Callable | None, eager: Callable, *args):
        """``compiled(*args)``; ``eager(*args)`` once compiling has failed (at the first call of a shape)."""
        if self.eager_reason is None:
            try:
                return compiled(*args)
            except Exception as err:
                self._give_up(err)
        return eager(*args)

    def _timed(self, compiled: Callable | None, eager: Callable, buffers: StaticBuffers):
        """``_call`` on the buffers' tokens, key mask and cache; the first call on each buffers is timed
        into ``compile_seconds``."""
        began = time.perf_counter()
        out = self._call(compiled, eager, buffers.tokens, buffers.key_mask, buffers.cache)
        self.compile_seconds.setdefault(buffers.key, time.perf_counter() - began)
        return out

    def run(self, buffers: StaticBuffers) -> torch.Tensor:
        """One step over ``buffers`` (tokens already in place): next-token logits (batch, V). The first
        step of each bucket's buffers is timed into ``compile_seconds``."""
        logits = self._timed(self.step, self.model.decode_step, buffers)
        # A CUDA graph's outputs are overwritten by its next replay.
        return logits.clone() if self.device.type == "cuda" else logits

    def _greedy_steps(self, tokens: torch.Tensor, key_mask: torch.Tensor, cache) -> torch.Tensor:
        """``steps_per_call`` steps from ``tokens`` (batch,), each fed the last one's argmax, which is left
        in ``tokens``: (batch, steps_per_call) tokens."""
        chosen = []
        for _ in range(self.steps_per_call):
            chosen.append(self.model.decode_step(tokens, key_mask, cache).argmax(-1))
            tokens.copy_(chosen[-1])
        return torch.stack(chosen, dim=1)

    def run_greedy(self, buffers: StaticBuffers) -> torch.Tensor:
        """``steps_per_call`` greedy steps over ``buffers`` (tokens already in place): (batch, steps_per_call)
        tokens, a copy. The first call on each buffers is timed into ``compile_seconds``."""
        # A copy: a CUDA graph's outputs are overwritten by its next replay.
        return self._timed(self.greedy_steps, self._greedy_steps, buffers).clone()

    def run_argmax(self, buffers: StaticBuffers) -> torch.Tensor:
        """One greedy step over ``buffers`` through the one-step graph, its token left in place: (batch, 1)."""
        buffers.tokens.copy_(self.run(buffers).argmax(-1))
        return buffers.tokens.unsqueeze(1).clone()

    def _prefill(self, images: torch.Tensor | None, ids: torch.Tensor, text_mask: torch.Tensor,
                 length: int) -> tuple[torch.Tensor, StaticBuffers]:
        """Prefills left-padded prompts (B, T) into the buffers of their buckets: next-token logits
        (bucket, V) and the buffers. Rows added to reach the batch bucket repeat the first row."""
        rows, width = ids.shape
        size, padded = bucket(rows), bucket(width, MIN_PROMPT)
        if self.prefill_graph is not None and padded > width:  # more left padding: hidden, no position
            ids = torch.cat([ids[:, :1].expand(-1, padded - width), ids], dim=1)
            text_mask = torch.cat([text_mask.new_zeros(rows, padded - width), text_mask], dim=1)
            length += padded - width
        buffers = self.buffers_for(size, bucket(length, MIN_LENGTH))
        if size > rows:
            extra = size - rows
            ids = torch.cat([ids, ids[:1].expand(extra, -1)])
            text_mask = torch.cat([text_mask, text_mask[:1].expand(extra, -1)])
            if images is not None:
                images = torch.cat([images, images[:1].expand(extra, *images.shape[1:])])
        logits, key_mask = self._run_prefill(images, ids, text_mask, buffers.cache)
        buffers.key_mask.zero_()
        buffers.key_mask[:, :key_mask.size(1)] = key_mask
        return logits, buffers

    def _run_prefill(self, *args) -> tuple[torch.Tensor, torch.Tensor]:
        if self.prefill_graph is not None and self.eager_reason is None:
            try:
                return self.prefill_graph(*args)
            except Exception:  # a part that does not trace (a pretrained vision tower): this part only eager
                self.prefill_graph = None
        return self.model.prefill(*args)

    def start(self, images: torch.Tensor | None, ids: torch.Tensor, text_mask: torch.Tensor,
              length: int) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
        """Prefills left-padded prompts (B, T) that need ``length`` cache slots in all (image tokens
        included); returns their next-token logits (B, V) and ``advance``: tokens (B,) -> the next
        logits (B, V). Rows added to reach the batch bucket repeat the first row and are dropped."""
        rows = ids.size(0)
        logits, buffers = self._prefill(images, ids, text_mask, length)

        def advance(tokens: torch.Tensor) -> torch.Tensor:
            buffers.tokens[:rows] = tokens
            return self.run(buffers)[:rows]

        return logits[:rows], advance

    def greedy(self, images: torch.Tensor | None, ids: torch.Tensor, text_mask: torch.Tensor, length: int,
               count: int) -> Iterator[torch.Tensor]:
        """Greedy decoding of left-padded prompts (B, T) that need ``length`` cache slots (as ``start``):
        yields ``count`` next tokens (B,), the first from the prefill, then ``steps_per_call`` per call of
        the greedy graph while that many are still wanted, the rest one per call of the one-step graph.
        A row is fed its own tokens even after its end token (the caller drops them), which changes no
        other row: rows never mix."""
        if count < 1:
            return
        rows = ids.size(0)
        logits, buffers = self._prefill(images, ids, text_mask, length)
        buffers.tokens.copy_(logits.argmax(-1))
        yield buffers.tokens[:rows].clone()
        made = 1
        while made < count:
            several = self.steps_per_call > 1 and count - made >= self.steps_per_call
            chosen = self.run_greedy(buffers) if several else self.run_argmax(buffers)
            made += chosen.size(1)
            yield from chosen[:rows].unbind(1)


def compiled_decoder(model: VisionLanguageModel) -> CompiledDecoder:
    """The model's ``CompiledDecoder``, made at the first call and kept on the model."""
    decoder = getattr(model, "_compiled_decoder", None)
    if decoder is None:
        decoder = CompiledDecoder(model)
        # Kept on the instance, beside its parameters: the graphs hold on to them anyway.
        object.__setattr__(model, "_compiled_decoder", decoder)
    return decoder
