"""The FastAPI app: OpenAI's chat completions (plain and streamed), models, health, metrics and the page.

Request bodies are read with a size bound and validated here (serve/chat.py), so every mistake gets
an OpenAI-shaped 4xx and the server goes on; the engine only ever sees valid jobs.
"""

import asyncio
import json
import time
import uuid
from dataclasses import dataclass
from importlib import resources

from moevlm.serve.chat import ChatRequest, parse_request, prompt_ids
from moevlm.serve.engine import Engine, Job, QueueFull
from moevlm.serve.errors import ApiError
from moevlm.serve.http import check_key, install, read_json
from moevlm.serve.images import ImageLimits, ImageLoader
from moevlm.serve.schema import REQUEST_BODY, ChatCompletion, ModelCard, ModelList, add_request_schema, errors
from moevlm.serve.waiting import CLOSING, GONE, TIMEOUT, client_gone, next_event


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

    app = FastAPI(title="moevlm", docs_url=None, redoc_url=None)
    app.state.closing = asyncio.Event()  # set by the server when --grace has run out (serve/server.py)
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

    def make_job(req: ChatRequest, emit, arrived: float) -> Job:
        """Runs on a worker thread: image decoding and preparation take a while."""
        pixels = images.load(req.image_url, engine.prepare_image)
        ids = prompt_ids(engine.tokenizer, req.turns, engine.config.model.decoder.max_text_len)
        room, most = engine.token_limit(ids), engine.config.model.decoder.max_text_len
        if room < 1:
            raise ApiError(400, f"the prompt leaves no room to answer within this model's {most} text tokens",
                           "messages")
        if req.max_tokens is not None and req.max_tokens > most:
            raise ApiError(400, f"max_tokens {req.max_tokens} is above this model's limit of {most}", "max_tokens")
        return Job(prompt_ids=ids, pixels=pixels, max_tokens=min(req.max_tokens or room, room), emit=emit,
                   temperature=req.temperature, top_p=req.top_p, seed=req.seed, stop=req.stop, routing=req.routing,
                   submitted=arrived)

    @app.post("/v1/chat/completions", openapi_extra=REQUEST_BODY, response_model=None,
              responses={200: {"model": ChatCompletion, "content": {"text/event-stream": {}}},
                         **errors(400, 401, 404, 413, 415, 429, 503, 504)})
    async def chat_completions(request: Request):
        arrived = time.perf_counter()  # time to first token counts from here
        check_key(request, options.api_key)
        check_ready()
        req = parse_request(await read_json(request, options.max_body_bytes), options.served_name)
        loop, events = asyncio.get_running_loop(), asyncio.Queue()
        job = await run_in_threadpool(make_job, req, lambda event: loop.call_soon_threadsafe(events.put_nowait, event),
                                      arrived)
        try:
            engine.submit(job)
        except QueueFull as err:
            raise ApiError(429, f"the server is busy ({err}); retry later", code="queue_full",
                           headers={"Retry-After": str(options.retry_after)}) from None
        engine.metrics.add_request("ok", engine.prompt_tokens(job.prompt_ids))
        reply = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": options.served_name}
        extras = {"num_experts": engine.config.model.decoder.moe.num_experts}
        if req.stream:
            return StreamingResponse(_stream(job, events, reply, req, extras), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        return await _complete(request, job, events, reply, req, extras)

    def deadline_of(arrived: float) -> float:
        return arrived + options.request_timeout

    def cut_short(event: tuple) -> ApiError:
        """The error a request gets when its deadline passed or the server is closing."""
        if event is TIMEOUT:
            return ApiError(504, f"the request took longer than the server's limit of {options.request_timeout:g} s",
                            code="timeout")
        return ApiError(503, "the server is shutting down", code="server_shutting_down",
                        headers={"Retry-After": str(options.retry_after)})

    async def _complete(request, job: Job, events: asyncio.Queue, reply: dict, req: ChatRequest, extras: dict):
        text, tokens = [], []
        gone = asyncio.ensure_future(client_gone(request))
        try:
            while True:
                event = await next_event(events, deadline_of(job.submitted), app.state.closing, gone)
                if event is GONE:
                    job.cancelled = True
                    return JSONResponse({}, status_code=499)
                if event in (TIMEOUT, CLOSING):
                    job.cancelled = True
                    raise cut_short(event)
                if event[0] == "delta":
                    text.append(event[1])
                    tokens += event[2]
                elif event[0] == "error":
                    return JSONResponse({"error": {"message": event[1], "type": "server_error", "param": None,
                                                   "code": None}}, status_code=503)
                else:
                    message = {"role": "assistant", "content": "".join(text)}
                    body = {**reply, "object": "chat.completion",
                            "choices": [{"index": 0, "message": message, "finish_reason": event[1], "logprobs": None}],
                            "usage": event[2]}
                    if req.routing:
                        body["moevlm"] = {**extras, "tokens": tokens}
                    return body
        finally:
            gone.cancel()

    async def _stream(job: Job, events: asyncio.Queue, reply: dict, req: ChatRequest, extras: dict):
        base = {**reply, "object": "chat.completion.chunk"}

        def chunk(delta: dict, finish: str | None = None, **more) -> str:
            body = {**base, "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}],
                    **more}
            return f"data: {json.dumps(body)}\n\n"

        try:
            yield chunk({"role": "assistant", "content": ""})
            while True:
                event = await next_event(events, deadline_of(job.submitted), app.state.closing)
                if event in (TIMEOUT, CLOSING):
                    yield f"data: {json.dumps(cut_short(event).body())}\n\n"
                    yield chunk({}, "length")
                    break
                if event[0] == "delta":
                    yield chunk({"content": event[1]}, **({"moevlm": {**extras, "tokens": event[2]}}
                                                          if req.routing else {}))
                elif event[0] == "error":
                    error = {"error": {"message": event[1], "type": "server_error", "param": None, "code": None}}
                    yield f"data: {json.dumps(error)}\n\n"
                    break
                else:
                    yield chunk({}, event[1])
                    if req.include_usage:
                        yield f"data: {json.dumps({**base, 'choices': [], 'usage': event[2]})}\n\n"
                    break
            yield "data: [DONE]\n\n"
        finally:
            job.cancelled = True  # a no-op once it finished; frees the slot when the client left early

    return app
