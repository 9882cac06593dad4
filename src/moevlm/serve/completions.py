"""``POST /v1/chat/completions`` as a plain ASGI app: the body read and parsed once (serve/chat.py's
``parse_request``), the jobs handed to the engine, and the answer's bytes sent as they are built.

Under load every request's CPU is taken from the engine, which shares the process (and the GIL) with
the event loop; FastAPI's layers (middleware, routing, dependencies, response classes, a wrapper
around every send) cost about as much per request as the rest of the handler. So the app (serve/api.py)
sends this route here directly, and through FastAPI only where CORS must answer (a request with an
``Origin`` header on a server with allowed origins): both ways run this same handler, and the route
stays in the OpenAPI schema. Errors have the shape and the metrics count every other route's have.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time

from moevlm.serve.chat import ChatRequest, check_for_model, choice_seed, parse_request, request_prompt
from moevlm.serve.engine import Engine, Job, QueueFull
from moevlm.serve.errors import ApiError
from moevlm.serve.http import ClientLeft, check_key, new_id, read_json
from moevlm.serve.images import ImageLoader
from moevlm.serve.responses import Reply, sse
from moevlm.serve.waiting import CLOSING, GONE, TIMEOUT, Closing, Handoff, Inbox, client_gone

log = logging.getLogger("moevlm.serve")
PATH = "/v1/chat/completions"
STREAM_HEADERS = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache")]


def json_bytes(body: dict) -> bytes:
    """As Starlette's JSONResponse writes a body."""
    return json.dumps(body, ensure_ascii=False, allow_nan=False, indent=None, separators=(",", ":")).encode()


async def send_json(send, status: int, body: dict, headers: dict[str, str] | None = None) -> None:
    content = json_bytes(body)
    raw = [(b"content-length", str(len(content)).encode()), (b"content-type", b"application/json")]
    raw += [(name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": content})


def headers_of(scope) -> dict[str, str]:
    """The request's headers by lower-case name (the first of repeated ones)."""
    found: dict[str, str] = {}
    for name, value in scope["headers"]:
        found.setdefault(name.decode("latin-1").lower(), value.decode("latin-1"))
    return found


def cancel(jobs: list[Job]) -> None:
    for job in jobs:
        job.cancelled = True


class Completions:
    """The route's handler (an ASGI app) for one server; ``closing`` is set once ``--grace`` has run out."""

    def __init__(self, engine: Engine, options, images: ImageLoader, closing: Closing):
        # Lazy: the server stack is only needed by `moevlm serve`. Starlette's worker threads (40), not
        # asyncio's default executor (a few): each hanging image fetch holds one.
        from starlette.concurrency import run_in_threadpool

        self.engine, self.options, self.images, self.closing = engine, options, images, closing
        self.handoff = Handoff()
        self.in_thread = run_in_threadpool

    async def __call__(self, scope, receive, send) -> None:
        arrived = time.perf_counter()  # time to first token counts from here
        try:
            answer = await self._accept(headers_of(scope), receive, arrived)
        except ClientLeft:
            return
        except ApiError as err:
            await self._error(send, err)
            return
        except Exception as err:  # a bug: the client gets a 500, the server goes on
            log.error("internal error on POST %s: %s", PATH, repr(err)[:500])
            await self._error(send, ApiError(500, "internal server error", code="internal_error"))
            return
        await answer(receive, send)

    async def _error(self, send, err: ApiError) -> None:
        self.engine.metrics.add_request(str(err.status))
        await send_json(send, err.status, err.body(), err.headers)

    def check_ready(self) -> None:
        engine = self.engine
        if not engine.ready.is_set() or engine.failed is not None:
            raise ApiError(503, "the model is still loading" if engine.failed is None else "the model failed to load",
                           headers={"Retry-After": str(self.options.retry_after)})

    async def _accept(self, headers: dict[str, str], receive, arrived: float):
        """The request read, checked and queued: a coroutine function (receive, send) that answers it."""
        options, engine = self.options, self.engine
        check_key(headers, options.api_key)
        self.check_ready()
        req = parse_request(await read_json(headers, receive, options.max_body_bytes), options.served_name)
        inbox = Inbox(arrived + options.request_timeout, self.closing)
        try:
            make = (self._make_jobs, req, lambda index: self.handoff.emitter(inbox, index), arrived)
            if req.image_urls and not self.images.needs_fetching(req.image_urls):
                jobs = await asyncio.wrap_future(self.images.submit(*make))  # decoded there, no second trip
            else:  # nothing to decode, or URLs to fetch first: a worker thread, no decoding thread held
                jobs = await self.in_thread(*make)
            engine.submit_all(jobs)
        except QueueFull as err:
            inbox.close()
            raise ApiError(429, f"the server is busy ({err}); retry later", code="queue_full",
                           headers={"Retry-After": str(options.retry_after)}) from None
        except BaseException:
            inbox.close()
            raise
        engine.metrics.add_request("ok", engine.prompt_tokens(jobs[0].prompt_ids, len(req.image_urls)))
        reply = Reply(req, {"id": f"chatcmpl-{new_id()}", "created": int(time.time()), "model": options.served_name},
                      {"num_experts": engine.config.model.decoder.moe.num_experts})
        answer = self._stream if req.stream else self._complete
        return lambda receive, send: answer(receive, send, jobs, inbox, reply)

    def _make_jobs(self, req: ChatRequest, emit_for, arrived: float) -> list[Job]:
        """Runs on a worker or decoding thread: image decoding and preparation take a while. One job per choice."""
        engine = self.engine
        most = engine.config.model.decoder.max_text_len
        ids = request_prompt(req, engine.tokenizer, most, engine.max_images)
        room = engine.token_limit(ids)
        check_for_model(req, engine.vocab_size, room, most, engine.max_queue)
        pixels = [self.images.load(url, engine.prepare_image) for url in req.image_urls]
        return [Job(prompt_ids=ids, pixels=pixels[0] if pixels else None, more_pixels=pixels[1:],
                    max_tokens=min(req.max_tokens or room, room), emit=emit_for(index),
                    sampling=req.sampling, seed=choice_seed(req.seed, index), stop=req.stop, routing=req.routing,
                    submitted=arrived)
                for index in range(req.n)]

    def _cut_short(self, event: tuple) -> ApiError:
        """The error a request gets when its deadline passed or the server is closing."""
        if event is TIMEOUT:
            return ApiError(504, f"the request took longer than the server's limit of "
                                 f"{self.options.request_timeout:g} s", code="timeout")
        return ApiError(503, "the server is shutting down", code="server_shutting_down",
                        headers={"Retry-After": str(self.options.retry_after)})

    async def _complete(self, receive, send, jobs: list[Job], inbox: Inbox, reply: Reply) -> None:
        gone = asyncio.ensure_future(client_gone(receive))
        inbox.watch(gone)
        try:
            while not reply.finished:
                events = await inbox.next()
                if events is GONE:
                    await send_json(send, 499, {})
                    return
                if events in (TIMEOUT, CLOSING):
                    await self._error(send, self._cut_short(events))
                    return
                for event in events:
                    reply.add(*event)
            if reply.error is not None:
                await send_json(send, reply.error[1], reply.error_body())
            else:
                await send_json(send, 200, reply.body())
        finally:
            gone.cancel()
            inbox.close()
            cancel(jobs)  # a no-op once they finished; frees the slots otherwise

    async def _stream(self, receive, send, jobs: list[Job], inbox: Inbox, reply: Reply) -> None:
        """Server-sent events. Everything that has arrived goes out in one write (the opening with the
        first delta; the last delta with the end, the usage, [DONE] and the response's end): each write
        is a system call, made holding the GIL. The stream watches for the client leaving itself."""
        await send({"type": "http.response.start", "status": 200, "headers": STREAM_HEADERS})
        gone = asyncio.ensure_future(client_gone(receive))
        inbox.watch(gone)
        lines = reply.opening()
        try:
            while not reply.finished:
                events = await inbox.next()
                if events is GONE:
                    return
                if events in (TIMEOUT, CLOSING):
                    lines += [sse(self._cut_short(events).body()), *reply.cut_short()]
                    break
                for event in events:
                    lines += reply.chunks(*event)
                if not reply.finished:
                    await send({"type": "http.response.body", "body": "".join(lines).encode(), "more_body": True})
                    lines = []
            lines.append("data: [DONE]\n\n")
            await send({"type": "http.response.body", "body": "".join(lines).encode(), "more_body": False})
        finally:
            gone.cancel()
            inbox.close()
            cancel(jobs)  # a no-op once they finished; frees the slots when the client left early
