"""The FastAPI app: OpenAI's chat completions (plain and streamed), models, health, metrics and the page.

Request bodies are read with a size bound and validated here (serve/chat.py), so every mistake gets
an OpenAI-shaped 4xx and the server goes on; the engine only ever sees valid jobs.
"""

import asyncio
import json
import time
from dataclasses import dataclass
from importlib import resources

from moevlm.serve.chat import ChatRequest, check_for_model, choice_seed, parse_request, request_prompt
from moevlm.serve.engine import Engine, Job, QueueFull
from moevlm.serve.errors import ApiError
from moevlm.serve.http import check_key, install, new_id, read_json
from moevlm.serve.images import ImageLimits, ImageLoader
from moevlm.serve.responses import Reply
from moevlm.serve.schema import REQUEST_BODY, ChatCompletion, ModelCard, ModelList, add_request_schema, errors
from moevlm.serve.waiting import CLOSING, GONE, TIMEOUT, Closing, Handoff, Inbox, client_gone


def cancel(jobs: list[Job]) -> None:
    for job in jobs:
        job.cancelled = True


@dataclass(frozen=True)
class ServeOptions:
    served_name: str
    api_key: str | None = None
    max_body_bytes: int = 20 * 2**20
    images: ImageLimits = ImageLimits()
    retry_after: int = 1  # seconds, for 429 and 503
    request_timeout: float = 600.0  # seconds from arrival to the last token
    allowed_origins: tuple[str, ...] = ()  # CORS


def create_app(engine: Engine, options: ServeOptions):
    # No `from __future__ import annotations` in this module: FastAPI reads the handlers' annotations
    # (Request) at runtime, and these names are local to this function.
    # Lazy: fastapi is only needed by `moevlm serve`.
    from fastapi import FastAPI, Request
    from fastapi.concurrency import run_in_threadpool
    from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, StreamingResponse

    class EventStream(StreamingResponse):
        """A stream whose body yields (text, more): the last piece goes out with the response's end in
        one write. The stream watches for the client leaving itself (``_stream``), so this skips the task
        group Starlette starts per streamed response to listen for it."""

        async def __call__(self, scope, receive, send):
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            async for text, more in self.body_iterator:
                await send({"type": "http.response.body", "body": text.encode(), "more_body": more})

    app = FastAPI(title="moevlm", docs_url=None, redoc_url=None)
    app.state.closing = Closing()  # set by the server when --grace has run out (serve/server.py)
    handoff = Handoff()
    page = resources.files("moevlm.serve").joinpath("page.html").read_text(encoding="utf-8")
    install(app, engine.metrics, list(options.allowed_origins))
    add_request_schema(app, options.served_name)
    images = ImageLoader(options.images)

    def check_ready() -> None:
        if not engine.ready.is_set() or engine.failed is not None:
            raise ApiError(503, "the model is still loading" if engine.failed is None else "the model failed to load",
                           headers={"Retry-After": str(options.retry_after)})

    @app.get("/", response_class=HTMLResponse)
    async def index():
        return page

    @app.get("/health")
    async def health():
        if engine.failed is not None:
            return JSONResponse({"status": "failed", "error": str(engine.failed)}, status_code=500)
        if not engine.ready.is_set():
            return JSONResponse({"status": "loading"}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics(request: Request):
        check_key(request, options.api_key)
        return PlainTextResponse(engine.metrics.render(), media_type="text/plain; version=0.0.4")

    def model_card() -> dict:
        moe = engine.config.model.decoder.moe
        return {"id": options.served_name, "object": "model", "created": int(time.time()), "owned_by": "moevlm",
                "moevlm": {"moe_layers": len(engine.model.moe_layers), "num_experts": moe.num_experts,
                           "top_k": moe.top_k, "max_tokens": engine.config.model.decoder.max_text_len}}

    @app.get("/v1/models", response_model=None, responses={200: {"model": ModelList}, **errors(401, 503)})
    async def models(request: Request):
        check_key(request, options.api_key)
        check_ready()
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}", response_model=None,
             responses={200: {"model": ModelCard}, **errors(401, 404, 503)})
    async def model(request: Request, model_id: str):
        check_key(request, options.api_key)
        check_ready()
        if model_id != options.served_name:
            raise ApiError(404, f"the model {model_id[:100]!r} does not exist; this server has "
                                f"{options.served_name!r}", "model", "model_not_found")
        return model_card()

    def make_jobs(req: ChatRequest, emit_for, arrived: float) -> list[Job]:
        """Runs on a worker or decoding thread: image decoding and preparation take a while. One job per choice."""
        most = engine.config.model.decoder.max_text_len
        ids = request_prompt(req, engine.tokenizer, most, engine.max_images)
        room = engine.token_limit(ids)
        check_for_model(req, engine.vocab_size, room, most, engine.max_queue)
        pixels = [images.load(url, engine.prepare_image) for url in req.image_urls]
        return [Job(prompt_ids=ids, pixels=pixels[0] if pixels else None, more_pixels=pixels[1:],
                    max_tokens=min(req.max_tokens or room, room), emit=emit_for(index),
                    sampling=req.sampling, seed=choice_seed(req.seed, index), stop=req.stop, routing=req.routing,
                    submitted=arrived)
                for index in range(req.n)]

    @app.post("/v1/chat/completions", openapi_extra=REQUEST_BODY, response_model=None,
              responses={200: {"model": ChatCompletion, "content": {"text/event-stream": {}}},
                         **errors(400, 401, 404, 413, 415, 429, 503, 504)})
    async def chat_completions(request: Request):
        arrived = time.perf_counter()  # time to first token counts from here
        check_key(request, options.api_key)
        check_ready()
        req = parse_request(await read_json(request, options.max_body_bytes), options.served_name)
        inbox = Inbox(deadline_of(arrived), app.state.closing)
        try:
            make = (make_jobs, req, lambda index: handoff.emitter(inbox, index), arrived)
            if req.image_urls and not images.needs_fetching(req.image_urls):
                jobs = await asyncio.wrap_future(images.submit(*make))  # decoded there, no second trip
            else:  # nothing to decode, or URLs to fetch first: a worker thread, no decoding thread held
                jobs = await run_in_threadpool(*make)
            engine.submit_all(jobs)
        except QueueFull as err:
            inbox.close()
            raise ApiError(429, f"the server is busy ({err}); retry later", code="queue_full",
                           headers={"Retry-After": str(options.retry_after)}) from None
        except BaseException:
            inbox.close()
            raise
        engine.metrics.add_request("ok", engine.prompt_tokens(jobs[0].prompt_ids, len(req.image_urls)))
        reply = Reply(req, {"id": f"chatcmpl-{new_id()}", "created": int(time.time()),
                            "model": options.served_name},
                      {"num_experts": engine.config.model.decoder.moe.num_experts})
        if req.stream:
            return EventStream(_stream(request, jobs, inbox, reply), media_type="text/event-stream",
                               headers={"Cache-Control": "no-cache"})
        return await _complete(request, jobs, inbox, reply)

    def deadline_of(arrived: float) -> float:
        return arrived + options.request_timeout

    def cut_short(event: tuple) -> ApiError:
        """The error a request gets when its deadline passed or the server is closing."""
        if event is TIMEOUT:
            return ApiError(504, f"the request took longer than the server's limit of {options.request_timeout:g} s",
                            code="timeout")
        return ApiError(503, "the server is shutting down", code="server_shutting_down",
                        headers={"Retry-After": str(options.retry_after)})

    async def _complete(request, jobs: list[Job], inbox: Inbox, reply: Reply):
        gone = asyncio.ensure_future(client_gone(request))
        inbox.watch(gone)
        try:
            while not reply.finished:
                events = await inbox.next()
                if events is GONE:
                    return JSONResponse({}, status_code=499)
                if events in (TIMEOUT, CLOSING):
                    raise cut_short(events)
                for event in events:
                    reply.add(*event)
            if reply.error is not None:
                return JSONResponse(reply.error_body(), status_code=reply.error[1])
            return reply.body()
        finally:
            gone.cancel()
            inbox.close()
            cancel(jobs)  # a no-op once they finished; frees the slots otherwise

    async def _stream(request, jobs: list[Job], inbox: Inbox, reply: Reply):
        """(text, more) pieces of an EventStream. Everything that has arrived goes out in one write (the
        opening with the first delta; the last delta with the end, the usage, [DONE] and the response's
        end): each write is a system call and a turn of the GIL."""
        gone = asyncio.ensure_future(client_gone(request))
        inbox.watch(gone)
        lines = reply.opening()
        try:
            while not reply.finished:
                events = await inbox.next()
                if events is GONE:
                    return
                if events in (TIMEOUT, CLOSING):
                    lines += [f"data: {json.dumps(cut_short(events).body())}\n\n", *reply.cut_short()]
                    break
                for event in events:
                    lines += reply.chunks(*event)
                if not reply.finished:
                    yield "".join(lines), True
                    lines = []
            yield "".join(lines) + "data: [DONE]\n\n", False
        finally:
            gone.cancel()
            inbox.close()
            cancel(jobs)  # a no-op once they finished; frees the slots when the client left early

    return app
