"""The FastAPI app: OpenAI's chat completions (plain and streamed; serve/completions.py), models,
health, metrics and the page.

Request bodies are read with a size bound and validated (serve/chat.py), so every mistake gets an
OpenAI-shaped 4xx and the server goes on; the engine only ever sees valid jobs.
"""

import time
from dataclasses import dataclass
from importlib import resources

from moevlm.serve.completions import PATH as CHAT
from moevlm.serve.completions import Completions
from moevlm.serve.engine import Engine
from moevlm.serve.errors import ApiError
from moevlm.serve.http import RequestIdMiddleware, check_key, install
from moevlm.serve.images import ImageLimits, ImageLoader
from moevlm.serve.schema import REQUEST_BODY, ChatCompletion, ModelCard, ModelList, add_request_schema, errors
from moevlm.serve.waiting import Closing


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
    from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response

    class App(FastAPI):
        """Sends ``POST /v1/chat/completions`` straight to its plain ASGI handler (serve/completions.py),
        past FastAPI's layers, unless CORS must answer it (an ``Origin`` header where origins are allowed)."""

        async def __call__(self, scope, receive, send):
            if scope["type"] == "http" and scope["path"] == CHAT and scope["method"] == "POST" and not (
                    options.allowed_origins and any(name == b"origin" for name, _ in scope["headers"])):
                await direct(scope, receive, send)
            else:
                await super().__call__(scope, receive, send)

    app = App(title="moevlm", docs_url=None, redoc_url=None)
    app.state.closing = Closing()  # set by the server when --grace has run out (serve/server.py)
    page = resources.files("moevlm.serve").joinpath("page.html").read_text(encoding="utf-8")
    install(app, engine.metrics, list(options.allowed_origins))
    add_request_schema(app, options.served_name)
    completions = Completions(engine, options, ImageLoader(options.images), app.state.closing)
    direct = RequestIdMiddleware(completions)
    check_ready = completions.check_ready

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
        check_key(request.headers, options.api_key)
        return PlainTextResponse(engine.metrics.render(), media_type="text/plain; version=0.0.4")

    def model_card() -> dict:
        moe = engine.config.model.decoder.moe
        return {"id": options.served_name, "object": "model", "created": int(time.time()), "owned_by": "moevlm",
                "moevlm": {"moe_layers": len(engine.model.moe_layers), "num_experts": moe.num_experts,
                           "top_k": moe.top_k, "max_tokens": engine.config.model.decoder.max_text_len}}

    @app.get("/v1/models", response_model=None, responses={200: {"model": ModelList}, **errors(401, 503)})
    async def models(request: Request):
        check_key(request.headers, options.api_key)
        check_ready()
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}", response_model=None,
             responses={200: {"model": ModelCard}, **errors(401, 404, 503)})
    async def model(request: Request, model_id: str):
        check_key(request.headers, options.api_key)
        check_ready()
        if model_id != options.served_name:
            raise ApiError(404, f"the model {model_id[:100]!r} does not exist; this server has "
                                f"{options.served_name!r}", "model", "model_not_found")
        return model_card()

    class Delegate(Response):
        """Runs the plain ASGI route inside FastAPI's stack (where CORS answers)."""

        async def __call__(self, scope, receive, send):
            await completions(scope, receive, send)

    @app.post(CHAT, openapi_extra=REQUEST_BODY, response_model=None,
              responses={200: {"model": ChatCompletion, "content": {"text/event-stream": {}}},
                         **errors(400, 401, 404, 413, 415, 429, 503, 504)})
    async def chat_completions():
        return Delegate()

    return app
