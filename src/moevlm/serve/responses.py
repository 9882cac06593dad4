"""The engine's events of one request's choices -> OpenAI's chat completion, or its stream of chunks.

Each of the ``n`` choices is one engine job; its events come tagged with the choice's index. Usage
counts the prompt once and the completion tokens of every choice. The first error ends the whole
request (its other choices are cancelled by the caller).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from moevlm.serve.chat import ChatRequest

ERROR_STATUS = 503  # an engine error without its own status: the server is shutting down


def sse(body: dict | str) -> str:
    return f"data: {body if isinstance(body, str) else json.dumps(body)}\n\n"


def _logprob(text: str, logprob: float) -> dict:
    return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}


def logprob_content(tokens: list[dict]) -> list[dict]:
    """OpenAI's ``logprobs.content`` entries of the engine's per-token details."""
    return [{**_logprob(token["text"], token["logprob"]),
             "top_logprobs": [_logprob(text, value) for text, value in token["top_logprobs"]]} for token in tokens]


def routing_trace(tokens: list[dict]) -> list[dict]:
    return [{"text": token["text"], "experts": token["experts"]} for token in tokens]


@dataclass
class Choice:
    text: list[str] = field(default_factory=list)
    tokens: list[dict] = field(default_factory=list)
    finish: str | None = None
    usage: dict | None = None


class Reply:
    """``base``: the response's ``id``, ``created`` and ``model``; ``extras``: what a routing trace
    starts with (``num_experts``)."""

    def __init__(self, req: ChatRequest, base: dict, extras: dict):
        self.req, self.base, self.extras = req, base, extras
        self.choices = [Choice() for _ in range(req.n)]
        self.error: tuple[str, int] | None = None

    @property
    def finished(self) -> bool:
        return self.error is not None or all(choice.finish for choice in self.choices)

    def add(self, index: int, event: tuple) -> None:
        choice = self.choices[index]
        if event[0] == "delta":
            choice.text.append(event[1])
            choice.tokens += event[2]
        elif event[0] == "error":
            self.error = (event[1], event[2] if len(event) > 2 else ERROR_STATUS)
        else:
            choice.finish, choice.usage = event[1], event[2]

    def usage(self) -> dict:
        prompt = self.choices[0].usage["prompt_tokens"]
        completion = sum(choice.usage["completion_tokens"] for choice in self.choices)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def error_body(self) -> dict:
        return {"error": {"message": self.error[0], "type": "server_error", "param": None, "code": None}}

    # -- a whole response ----------------------------------------------------------------------------
    def body(self) -> dict:
        choices = []
        for index, choice in enumerate(self.choices):
            logprobs = {"content": logprob_content(choice.tokens), "refusal": None} if self.req.logprobs else None
            choices.append({"index": index, "message": {"role": "assistant", "content": "".join(choice.text)},
                            "finish_reason": choice.finish, "logprobs": logprobs})
        body = {**self.base, "object": "chat.completion", "choices": choices, "usage": self.usage()}
        if self.req.routing:
            body["moevlm"] = {**self.extras, "tokens": routing_trace(self.choices[0].tokens)}
        return body

    # -- a stream ------------------------------------------------------------------------------------
    def _chunk(self, index: int, delta: dict, finish: str | None = None, tokens: list[dict] | None = None) -> str:
        logprobs = {"content": logprob_content(tokens)} if self.req.logprobs and tokens else None
        body = {**self.base, "object": "chat.completion.chunk",
                "choices": [{"index": index, "delta": delta, "finish_reason": finish, "logprobs": logprobs}]}
        if self.req.routing and tokens is not None:
            body["moevlm"] = {**self.extras, "tokens": routing_trace(tokens)}
        return sse(body)

    def opening(self) -> list[str]:
        return [self._chunk(index, {"role": "assistant", "content": ""}) for index in range(self.req.n)]

    def chunks(self, index: int, event: tuple) -> list[str]:
        """The lines an event adds to the stream; after the last choice's end, the usage (if asked)."""
        self.add(index, event)
        if event[0] == "delta":
            return [self._chunk(index, {"content": event[1]}, tokens=event[2])]
        if event[0] == "error":
            return [sse(self.error_body())]
        lines = [self._chunk(index, {}, event[1])]
        if self.finished and self.req.include_usage:
            lines.append(sse({**self.base, "object": "chat.completion.chunk", "choices": [], "usage": self.usage()}))
        return lines

    def cut_short(self) -> list[str]:
        """A stream's end when the request's deadline passed or the server is closing: every choice
        still running ends with finish_reason "length"."""
        return [self._chunk(index, {}, "length") for index, choice in enumerate(self.choices) if not choice.finish]
