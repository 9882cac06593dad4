"""What ``GET /metrics`` reports, in Prometheus' text format: counters since the start, the queue
and batch right now, time to first token and request latency as histograms, recent tokens/s, and
each expert's routed tokens per MoE layer (image and text tokens apart)."""

from __future__ import annotations

import collections
import threading
import time

import torch

BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
RATE_WINDOW = 10.0  # seconds of token history behind the tokens/s gauge


class Histogram:
    def __init__(self):
        self.counts = [0] * len(BUCKETS)
        self.total, self.count = 0.0, 0

    def add(self, value: float) -> None:
        self.total += value
        self.count += 1
        for index, bound in enumerate(BUCKETS):
            if value <= bound:
                self.counts[index] += 1

    def lines(self, name: str) -> list[str]:
        rows = [f'{name}_bucket{{le="{bound}"}} {count}' for bound, count in zip(BUCKETS, self.counts)]
        return rows + [f'{name}_bucket{{le="+Inf"}} {self.count}', f"{name}_sum {self.total:.6f}",
                       f"{name}_count {self.count}"]


class ServerMetrics:
    """Updated by the engine thread and the request handlers; read by ``/metrics``."""

    def __init__(self):
        self._lock = threading.Lock()
        self.requests = collections.Counter()  # by outcome: the HTTP status, or "ok"
        self.prompt_tokens = self.completion_tokens = 0
        self.queue_length = self.batch_size = self.peak_batch_size = 0
        self.first_token = Histogram()
        self.latency = Histogram()
        self.forward_seconds = 0.0
        self._recent: collections.deque[tuple[float, int]] = collections.deque()
        self.expert_load: torch.Tensor | None = None  # (MoE layers, 2 [image, text], experts)

    def set_experts(self, layers: int, experts: int) -> None:
        self.expert_load = torch.zeros(layers, 2, experts, dtype=torch.long)

    def add_request(self, outcome: str, prompt_tokens: int = 0) -> None:
        with self._lock:
            self.requests[outcome] += 1
            self.prompt_tokens += prompt_tokens

    def set_batch_size(self, size: int) -> None:
        self.batch_size = size
        self.peak_batch_size = max(self.peak_batch_size, size)

    def add_first_token(self, seconds: float) -> None:
        with self._lock:
            self.first_token.add(seconds)

    def add_request_latency(self, seconds: float) -> None:
        with self._lock:
            self.latency.add(seconds)

    def add_tokens(self, count: int) -> None:
        now = time.monotonic()
        with self._lock:
            self.completion_tokens += count
            self._recent.append((now, count))
            while self._recent and self._recent[0][0] < now - RATE_WINDOW:
                self._recent.popleft()

    def add_forward(self, load: torch.Tensor, seconds: float) -> None:
        with self._lock:
            self.forward_seconds += seconds
            if self.expert_load is not None and load.numel():
                self.expert_load += load.to(self.expert_load.dtype)

    def tokens_per_second(self) -> float:
        now = time.monotonic()
        with self._lock:
            recent = [count for at, count in self._recent if at >= now - RATE_WINDOW]
        return sum(recent) / RATE_WINDOW

    def render(self) -> str:
        with self._lock:
            lines = ["# HELP moevlm_requests_total Chat completion requests by outcome (ok, or the HTTP status).",
                     "# TYPE moevlm_requests_total counter"]
            lines += [f'moevlm_requests_total{{outcome="{outcome}"}} {count}'
                      for outcome, count in sorted(self.requests.items())]
            lines += ["# TYPE moevlm_prompt_tokens_total counter", f"moevlm_prompt_tokens_total {self.prompt_tokens}",
                      "# TYPE moevlm_completion_tokens_total counter",
                      f"moevlm_completion_tokens_total {self.completion_tokens}",
                      "# HELP moevlm_queue_length Requests waiting to join the decoding batch.",
                      "# TYPE moevlm_queue_length gauge", f"moevlm_queue_length {self.queue_length}",
                      "# HELP moevlm_batch_size Requests in the decoding batch.",
                      "# TYPE moevlm_batch_size gauge", f"moevlm_batch_size {self.batch_size}",
                      "# TYPE moevlm_batch_size_peak gauge", f"moevlm_batch_size_peak {self.peak_batch_size}",
                      "# HELP moevlm_time_to_first_token_seconds From arrival to the first generated token.",
                      "# TYPE moevlm_time_to_first_token_seconds histogram"]
            lines += self.first_token.lines("moevlm_time_to_first_token_seconds")
            lines += ["# HELP moevlm_request_seconds From arrival to the last generated token.",
                      "# TYPE moevlm_request_seconds histogram"]
            lines += self.latency.lines("moevlm_request_seconds")
            lines += ["# TYPE moevlm_model_forward_seconds_total counter",
                      f"moevlm_model_forward_seconds_total {self.forward_seconds:.6f}"]
            load = self.expert_load
        lines += [f"# HELP moevlm_tokens_per_second Generated tokens per second over the last {RATE_WINDOW:g} s.",
                  "# TYPE moevlm_tokens_per_second gauge", f"moevlm_tokens_per_second {self.tokens_per_second():.3f}"]
        if load is not None:
            lines += ["# HELP moevlm_expert_tokens_total Tokens routed to each expert since the start.",
                      "# TYPE moevlm_expert_tokens_total counter"]
            for layer in range(load.size(0)):
                for kind, name in enumerate(("image", "text")):
                    lines += [f'moevlm_expert_tokens_total{{layer="{layer}",kind="{name}",expert="{expert}"}} '
                              f"{int(load[layer, kind, expert])}" for expert in range(load.size(2))]
        return "\n".join(lines) + "\n"
