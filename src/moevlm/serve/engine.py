"""The engine: one thread that owns the model and decodes every request in one running batch.

Requests wait in a bounded queue; between two decoding steps the waiting ones are prefilled
together and join the batch, and finished or cancelled ones leave it (serve/batch.py). While a batch
is decoding, requests that arrive one by one wait to join together (``_join_delay``): a prefill
costs about as much for a few rows as for one, and every running row waits for it. Each keeps
its own sampling parameters, random generator, length limit and stop strings. What a request
produces goes to its ``emit`` callback (called on the engine thread) as events:
``("delta", text, tokens)`` and finally ``("done", finish_reason, usage)`` or ``("error", message[, status])``;
``tokens`` has one dict per token when the job asked for routing or logprobs (``text``, and
``experts`` or ``logprob`` and ``top_logprobs``). A request whose own sampling fails (a bug, or
logits the model made non-finite) gets its error and leaves; the rest of the batch goes on.

With ``compile`` the running batch is a table of slots over the compiled decoding step's static
buffers (serve/slots.py), every bucket compiled at start. Requests that ask for routing traces, and
those whose prompt and ``max_tokens`` exceed the table's cache length, decode in a second, eager
batch beside it: the compiled step records neither the experts each token took nor expert load.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import math
import secrets
import threading
import time
from pathlib import Path

import torch

from moevlm.checkpoint import load_model
from moevlm.compiled import compiled_decoder
from moevlm.data.images import image_preparer, normalize
from moevlm.device import autocast_dtype, resolve_device
from moevlm.generate import GREEDY_BELOW, left_pad
from moevlm.serve.batch import DecodeBatch, repack
from moevlm.serve.job import Job, Lane, _held_back
from moevlm.serve.metrics import ServerMetrics
from moevlm.serve.sampling import logprob_details, pick
from moevlm.serve.slots import SlotTable

log = logging.getLogger("moevlm.serve")
MAX_IMAGES = 8  # per conversation, for a model that takes several
JOIN_WAIT = 3.0  # prefills' time a request waits at most to join a running batch with others


class QueueFull(Exception):
    """The waiting queue is at its bound: the client should retry later."""


class Engine:
    """Loads the model from ``model_dir`` on its own thread (``ready`` is set once it is loaded),
    then decodes. ``max_batch``: most requests decoding together; ``max_queue``: most waiting;
    ``compile``: decode with the compiled step, warmed up for every batch bucket before ``ready``."""

    def __init__(self, model_dir: str | Path, device: str = "auto", max_batch: int = 16, max_queue: int = 64,
                 quantize: str | None = None, compile: bool = False):
        self.model_dir, self.device_name, self.quantize, self.compile = Path(model_dir), device, quantize, compile
        self.max_batch, self.max_queue = max_batch, max_queue
        self.metrics = ServerMetrics()
        self.ready = threading.Event()
        self.failed: BaseException | None = None
        self.model = self.tokenizer = self.config = self.prepare_image = None
        self.device, self.amp_dtype = None, None  # set by load()
        self._waiting: collections.deque[Job] = collections.deque()
        self._wake = threading.Condition()
        self._stopping = False
        self.lanes = [Lane()]  # the eager lane, and the compiled one once loaded (with compile)
        self._gate_logits: list[torch.Tensor | None] = []
        self._prefill_seconds = 0.0  # recent prefills' duration (a moving average)
        self._ended: collections.deque[tuple[float, int]] = collections.deque()  # (when, rows) that left the batch
        self._thread = threading.Thread(target=self._run, name="moevlm-engine", daemon=True)

    # -- the server's side ---------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def load(self) -> None:
        where = resolve_device(self.device_name, key="--device")
        self.amp_dtype = autocast_dtype("auto", where)
        self.device = where
        model, tokenizer, config = load_model(self.model_dir, device=where, quantize=self.quantize)
        model.eval()
        self.prepare_image = image_preparer(config.model, self.model_dir)
        self._gate_logits = [None] * len(model.moe_layers)
        for index, layer in enumerate(model.moe_layers):
            layer.gate.register_forward_hook(self._keeper(index))
        self.model, self.tokenizer, self.config = model, tokenizer, config
        self.metrics.set_experts(len(model.moe_layers), config.model.decoder.moe.num_experts)
        if self.compile:  # the table's cache holds one image's tokens and the longest text
            length = config.model.decoder.max_text_len + model.num_image_tokens
            self.lanes.append(Lane(SlotTable(compiled_decoder(model), self.max_batch, length)))
            with self._decoding():
                self.lanes[1].slots.warm()

    def _decoding(self) -> contextlib.ExitStack:
        """Inference mode and autocast, as every forward of the engine (the compiled step's guards
        check them)."""
        stack = contextlib.ExitStack()
        stack.enter_context(torch.inference_mode())
        stack.enter_context(torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                                           enabled=self.amp_dtype is not None))
        return stack

    def _keeper(self, index: int):
        def keep(module, inputs, output):
            self._gate_logits[index] = output.detach()
        return keep

    def token_limit(self, prompt_ids: list[int]) -> int:
        """How many tokens a prompt leaves room for: ``decoder.max_text_len`` counts text tokens, not
        the image ids a prompt holds (none, one image's or several's)."""
        images = prompt_ids.count(self.model.image_token_id) if self.model.images_in_text else 0
        return self.config.model.decoder.max_text_len - (len(prompt_ids) - images)

    def prompt_tokens(self, prompt_ids: list[int], images: int = 1) -> int:
        """Positions the prompt fills in the decoder, prepended image tokens (if it has an image) included."""
        return len(prompt_ids) + (0 if self.model.images_in_text or not images else self.model.num_image_tokens)

    @property
    def max_images(self) -> int:
        """Images one conversation may hold: a scratch model prepends exactly one (or none); a model
        with image ids in its text takes them where the conversation places them."""
        return MAX_IMAGES if self.model.images_in_text else 1

    @property
    def vocab_size(self) -> int:
        """Token ids a request may name (logit_bias): the tokenizer's, within the model's logits."""
        return min(self.tokenizer.vocab_size, self.config.model.decoder.vocab_size)

    def submit(self, job: Job) -> None:
        self.submit_all([job])

    def submit_all(self, jobs: list[Job]) -> None:
        """Queues the jobs (the choices of one request) together, or none of them."""
        with self._wake:
            if len(self._waiting) + len(jobs) > self.max_queue:
                raise QueueFull(f"{len(self._waiting)} requests are waiting already")
            now = time.perf_counter()
            for job in jobs:
                job.queued = now
            self._waiting.extend(jobs)
            self.metrics.queue_length = len(self._waiting)
            self._wake.notify()

    def stop(self, timeout: float | None = None) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)

    # -- the engine thread -----------------------------------------------------------------------
    def _run(self) -> None:
        try:
            self.load()
        except BaseException as err:  # the server reports it on /health and exits
            self.failed = err
            self.ready.set()
            return
        self.ready.set()
        with self._decoding():
            while (joining := self._take(running=self._running())) is not None:
                try:
                    joined = self._prefill(joining) if joining else (None, None)
                    for lane in self.lanes:
                        rows = [row for row, job in enumerate(joining) if self._lane(job) is lane]
                        self._iterate(lane, [joining[row] for row in rows], rows, *joined)
                except Exception:  # a bug: fail the requests in flight, keep serving the next ones
                    log.exception("decoding failed")
                    for job in [job for lane in self.lanes for job in lane.jobs] + joining:
                        job.emit(("error", "internal error while decoding", 500))
                    self.lanes = [Lane(lane.slots) for lane in self.lanes]
                self.metrics.set_batch_size(self._running())
        for lane in self.lanes:
            for job in lane.jobs:
                job.emit(("error", "the server is shutting down"))

    def _running(self) -> int:
        return sum(len(lane.jobs) for lane in self.lanes)

    def _lane(self, job: Job) -> Lane:
        """The compiled lane where there is one and it can take the job, else the eager one."""
        compiled = self.lanes[-1]
        if compiled.slots is None or job.routing:
            return self.lanes[0]
        needs = self.prompt_tokens(job.prompt_ids, len(job.images)) + job.max_tokens
        return compiled if needs <= compiled.slots.length else self.lanes[0]

    def _iterate(self, lane: Lane, joining: list[Job], rows: list[int], joined: DecodeBatch | None,
                 joined_logits: torch.Tensor | None) -> None:
        """One decoding step of a lane: every job takes a token, all step, then one re-pack drops the
        finished ones and adds ``rows`` of the joiners' prefilled batch. Stepping a row that just
        finished costs less than the extra re-pack that dropping it first would."""
        jobs, batch, logits = lane.jobs, lane.batch, lane.logits
        keep = []
        if jobs:
            tokens = logits.argmax(dim=-1)
            keep = [row for row, job in enumerate(jobs) if not self._take_token(job, logits, tokens, row)]
            if keep:
                started = time.perf_counter()
                logits = batch.step(tokens)
                self._after_forward(jobs, 1, started, counted=lane.slots is None)
                logits = logits if len(keep) == len(jobs) else logits[keep]
        parts = [(batch, keep)] if keep else []
        if joining:
            parts.append((joined, rows))
            logits = torch.cat([logits, joined_logits[rows]]) if keep else joined_logits[rows]
        if len(keep) < len(jobs):
            self._ended.append((time.perf_counter(), len(jobs) - len(keep)))
        if len(keep) < len(jobs) or joining:
            lane.jobs = jobs = [jobs[row] for row in keep] + joining
            lane.batch = (repack(self.model, parts, self._headroom(jobs)) if lane.slots is None
                          else lane.slots.pack(parts))
        lane.logits = logits if jobs else None

    def _take(self, running: int) -> list[Job] | None:
        """Waiting jobs to admit now beside ``running`` ones (cancelled ones dropped); None: stop the engine.
        An idle engine waits here, for a job or until the waiting ones should join (``_join_delay``)."""
        free = self.max_batch - running
        with self._wake:
            while not self._stopping:
                delay = self._join_delay(running, free)
                if delay == 0 or running:  # with rows running, a step goes on meanwhile
                    break
                self._wake.wait(None if delay == math.inf else delay)
            if self._stopping:
                for job in self._waiting:
                    job.emit(("error", "the server is shutting down"))
                self._waiting.clear()
                return None
            taken = []
            while delay == 0 and self._waiting and len(taken) < free:
                job = self._waiting.popleft()
                if not job.cancelled:
                    taken.append(job)
            self._came_back(len(taken))
            self.metrics.queue_length = len(self._waiting)
            return taken

    def _came_back(self, rows: int) -> None:
        """Joining rows count as the return of rows that ended (oldest first): a client that comes
        back is no longer waited for."""
        while rows and self._ended:
            ended, count = self._ended.popleft()
            if count > rows:
                self._ended.appendleft((ended, count - rows))
            rows = max(rows - count, 0)

    def _join_delay(self, running: int, free: int) -> float:
        """Seconds the waiting jobs still wait before they join (0: now; inf: none waits or no row is
        free). They join once they are as many as the rows running plus those that ended in the last
        JOIN_WAIT prefills' time and have not come back yet (their clients are the likeliest to come
        back), and at the latest once the first has waited JOIN_WAIT prefills' time.

        A prefill costs nearly as much for a few rows as for many, and every running row stalls for
        it: requests that join one by one under load pay a prefill each, and groups that join apart
        finish apart and come back apart. The wait bounds what that costs a joiner; one client alone
        never waits (the row that ended is its own)."""
        if not self._waiting or free <= 0:
            return math.inf
        now, longest = time.perf_counter(), JOIN_WAIT * self._prefill_seconds
        while self._ended and self._ended[0][0] < now - longest:
            self._ended.popleft()
        expected = min(running + sum(rows for _, rows in self._ended), self.max_batch)
        if len(self._waiting) >= expected:
            return 0.0
        return max(self._waiting[0].queued + longest - now, 0.0)

    def _headroom(self, jobs: list[Job]) -> int:
        return max((job.max_tokens - job.sampled for job in jobs), default=0) + 1

    def _prefill(self, jobs: list[Job]) -> tuple[DecodeBatch, torch.Tensor]:
        """The new jobs' prompts, left-padded into one batch, through the model."""
        ids, mask = left_pad([job.prompt_ids for job in jobs], self.tokenizer.pad_id, self.device)
        width = ids.size(1)
        for job in jobs:
            if job.seed is not None or job.sampling.temperature >= GREEDY_BELOW:
                job.generator = torch.Generator(device=self.device)
                job.generator.manual_seed(job.seed if job.seed is not None else secrets.randbits(32))
        images, has_image = self._images(jobs)
        prepended = 0 if self.model.images_in_text else self.model.num_image_tokens
        cache = self.model.new_cache(len(jobs), prepended + width)
        started = time.perf_counter()
        logits, key_mask = self.model.prefill(images, ids, mask, cache, has_image=has_image)
        self._after_forward(jobs, prepended + width, started)
        took = time.perf_counter() - started
        self._prefill_seconds = 0.8 * self._prefill_seconds + 0.2 * took if self._prefill_seconds else took
        return DecodeBatch(self.model, cache, key_mask), logits

    def _images(self, jobs: list[Job]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(images, has_image) for ``prefill``: every image in row order for a model with image ids
        in its text; else one per row, a blank one for a text-only row, which has_image marks."""
        if self.model.images_in_text:
            pixels = [image for job in jobs for image in job.images]
            return (normalize(torch.stack(pixels)).to(self.device) if pixels else None), None
        present = [job.pixels is not None for job in jobs]
        if not any(present):
            return None, None
        blank = torch.zeros_like(next(job.pixels for job in jobs if job.pixels is not None))
        images = normalize(torch.stack([blank if job.pixels is None else job.pixels for job in jobs]))
        has_image = None if all(present) else torch.tensor(present, device=self.device)
        return images.to(self.device), has_image

    def _after_forward(self, jobs: list[Job], positions: int, started: float, counted: bool = True) -> None:
        """Routing of the position each job's next token comes from, and the expert-load metrics
        (not ``counted``: a compiled step, which records no expert load)."""
        load = self.model.expert_load() if counted else torch.zeros(0)
        self.metrics.add_forward(load, time.perf_counter() - started)
        if not any(job.routing for job in jobs):
            return
        top_k = self.config.model.decoder.moe.top_k
        chosen = [logits.view(len(jobs), positions, -1)[:, -1].topk(top_k, dim=-1).indices.tolist()
                  for logits in self._gate_logits]
        for row, job in enumerate(jobs):
            job.next_experts = [layer[row] for layer in chosen]

    def _take_token(self, job: Job, logits: torch.Tensor, tokens: torch.Tensor, row: int) -> bool:
        """Samples row ``row``'s token into ``tokens`` (which holds the batch's argmax) and advances
        its job; True when the job is finished. A failure here ends this job alone."""
        try:
            params = job.sampling
            if not params.greedy_plain:
                eos = self.tokenizer.eos_id
                tokens[row] = pick(logits[row], params, job.generated, eos, job.generator)
                if params.logprobs:
                    job.next_logprobs = self._logprobs(job, logits[row], int(tokens[row]))
            return self._advance(job, int(tokens[row]))
        except Exception:
            log.exception("sampling failed for one request; the others go on")
            job.emit(("error", "internal error while sampling this request", 500))
            return True

    def _logprobs(self, job: Job, logits: torch.Tensor, token: int) -> dict:
        """The chosen token's log-probability and the ``top_logprobs`` likeliest, each with its text
        as it would extend the answer so far."""
        chosen, top = logprob_details(logits, token, job.sampling.top_logprobs)
        return {"logprob": chosen, "top_logprobs": [(self._piece(job, other), value) for other, value in top]}

    def _piece(self, job: Job, token: int) -> str:
        text = self.tokenizer.decode(job.generated + [token])
        return text[len(job.text):] if text.startswith(job.text) else self.tokenizer.decode([token])

    def _advance(self, job: Job, token: int) -> bool:
        """Takes one sampled token; sends what can be sent; True when the job is finished."""
        now = time.perf_counter()
        if job.sampled == 0:
            self.metrics.add_first_token(now - job.submitted)
        job.sampled += 1
        self.metrics.add_tokens(1)
        finish = None
        if token == self.tokenizer.eos_id:
            finish = "stop"
        else:
            job.generated.append(token)
            text = self.tokenizer.decode(job.generated)
            if job.routing or job.sampling.logprobs:
                detail = {"text": text[len(job.text):] if text.startswith(job.text) else ""}
                if job.routing:
                    detail["experts"] = job.next_experts
                if job.sampling.logprobs:
                    detail.update(job.next_logprobs)
                job.pending.append(detail)
            job.text = text
            cut = min((i for i in (text.find(stop) for stop in job.stop) if i >= 0), default=-1)
            if cut >= 0:
                job.text, finish = text[:cut], "stop"
            elif job.sampled >= job.max_tokens:
                finish = "length"
        if job.cancelled:
            return True
        ready = job.text if finish else job.text[:len(job.text) - _held_back(job.text, job.stop)]
        if len(ready) > len(job.sent) and ready.startswith(job.sent) or job.pending and finish:
            job.emit(("delta", ready[len(job.sent):], job.pending))
            job.sent, job.pending = ready, []
        if finish:
            prompt = self.prompt_tokens(job.prompt_ids, len(job.images))
            job.emit(("done", finish, {"prompt_tokens": prompt, "completion_tokens": job.sampled,
                                       "total_tokens": prompt + job.sampled}))
            self.metrics.add_request_latency(now - job.submitted)
            return True
        return False
