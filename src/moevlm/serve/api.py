"""The FastAPI app: OpenAI's chat completions (plain and streamed), models, health, metrics and the page.

Request bodies are read with a size bound and validated here (serve/chat.py), so every mistake gets
an OpenAI-shaped 4xx and the server goes on; the engine only ever sees valid jobs.
"""

import asyncio
import hmac
import json
import time
import uuid
from dataclasses import dataclass
from importlib import resources

from moevlm.serve.chat import ChatRequest, check_for_model, choice_seed, parse_request, request_prompt
from moevlm.serve.engine import Engine, Job, QueueFull
from moevlm.serve.errors import ApiError
from moevlm.serve.images import ImageLimits, load_image
from moevlm.serve.responses import Reply

DISCONNECT_POLL = 0.5  # seconds between checks that a waiting non-streaming client is still there


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


def create_app(engine: Engine, options: ServeOptions):
    # No `from __future__ import annotations` in this module: FastAPI reads the handlers' annotations
    # (Request) at runtime, and these names are local to this function.
    # Lazy: fastapi is only needed by `moevlm serve`.
    from fastapi import FastAPI, Request
    from fastapi.concurrency import run_in_threadpool
    from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, StreamingResponse

    app = FastAPI(title="moevlm", docs_url=None, redoc_url=None, openapi_url=None)
    page = resources.files("moevlm.serve").joinpath("page.html").read_text(encoding="utf-8")

    @app.exception_handler(ApiError)
    async def api_error(request: Request, err: ApiError):
        engine.metrics.add_request(str(err.status))
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    def check_key(request: Request) -> None:
        if options.api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {options.api_key}".encode()):
            raise ApiError(401, "missing or wrong API key (Authorization: Bearer KEY)", code="invalid_api_key")

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
    async def metrics():
        return PlainTextResponse(engine.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models(request: Request):
        check_key(request)
        check_ready()
        moe = engine.config.model.decoder.moe
        return {"object": "list", "data": [{
            "id": options.served_name, "object": "model", "created": int(time.time()), "owned_by": "moevlm",
            "moevlm": {"moe_layers": len(engine.model.moe_layers), "num_experts": moe.num_experts,
                       "top_k": moe.top_k, "max_tokens": engine.config.model.decoder.max_text_len}}]}

    async def read_body(request: Request) -> dict:
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > options.max_body_bytes:
            raise ApiError(413, f"the request body is over {options.max_body_bytes} bytes")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > options.max_body_bytes:
                raise ApiError(413, f"the request body is over {options.max_body_bytes} bytes")
            chunks.append(chunk)
        try:
            return json.loads(b"".join(chunks))
        except (ValueError, UnicodeDecodeError) as err:
            raise ApiError(400, f"the request body is not valid JSON: {err}") from None

    def make_jobs(req: ChatRequest, emit_for, arrived: float) -> list[Job]:
        """Runs on a worker thread: image decoding and preparation take a while. One job per choice."""
        most = engine.config.model.decoder.max_text_len
        ids = request_prompt(req, engine.tokenizer, most, engine.max_images)
        room = engine.token_limit(ids)
        check_for_model(req, engine.vocab_size, room, most, engine.max_queue)
        pixels = [engine.prepare_image(load_image(url, options.images)) for url in req.image_urls]
        return [Job(prompt_ids=ids, pixels=pixels[0] if pixels else None, more_pixels=pixels[1:],
                    max_tokens=min(req.max_tokens or room, room), emit=emit_for(index),
                    temperature=req.temperature, top_p=req.top_p, seed=choice_seed(req.seed, index), stop=req.stop,
                    routing=req.routing, submitted=arrived, presence_penalty=req.presence_penalty,
                    frequency_penalty=req.frequency_penalty, logit_bias=req.logit_bias, min_tokens=req.min_tokens,
                    ignore_eos=req.ignore_eos, logprobs=req.logprobs, top_logprobs=req.top_logprobs)
                for index in range(req.n)]

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        arrived = time.perf_counter()  # time to first token counts from here
        check_key(request)
        check_ready()
        req = parse_request(await read_body(request), options.served_name)
        loop, events = asyncio.get_running_loop(), asyncio.Queue()

        def emit_for(index: int):
            return lambda event: loop.call_soon_threadsafe(events.put_nowait, (index, event))

        jobs = await run_in_threadpool(make_jobs, req, emit_for, arrived)
        try:
            engine.submit_all(jobs)
        except QueueFull as err:
            raise ApiError(429, f"the server is busy ({err}); retry later", code="queue_full",
                           headers={"Retry-After": str(options.retry_after)}) from None
        engine.metrics.add_request("ok", engine.prompt_tokens(jobs[0].prompt_ids, len(req.image_urls)))
        reply = Reply(req, {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()),
                            "model": options.served_name},
                      {"num_experts": engine.config.model.decoder.moe.num_experts})
        if req.stream:
            return StreamingResponse(_stream(jobs, events, reply), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        return await _complete(request, jobs, events, reply)

    async def _complete(request, jobs: list[Job], events: asyncio.Queue, reply: Reply):
        while not reply.finished:
            try:
                index, event = await asyncio.wait_for(events.get(), DISCONNECT_POLL)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    cancel(jobs)
                    return JSONResponse({}, status_code=499)
                continue
            reply.add(index, event)
        if reply.error is not None:
            cancel(jobs)
            return JSONResponse(reply.error_body(), status_code=reply.error[1])
        return reply.body()

    async def _stream(jobs: list[Job], events: asyncio.Queue, reply: Reply):
        try:
            for line in reply.opening():
                yield line
            while not reply.finished:
                index, event = await events.get()
                for line in reply.chunks(index, event):
                    yield line
            yield "data: [DONE]\n\n"
        finally:
            cancel(jobs)  # a no-op once they finished; frees the slots when the client left early

    return app
