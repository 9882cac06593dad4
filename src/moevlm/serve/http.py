"""HTTP around the API: reading a JSON body, OpenAI-shaped errors for everything (routing's 404/405,
bodies nested too deeply, bugs), the API key, ``x-request-id`` and CORS."""

from __future__ import annotations

import hmac
import json
import logging
import random
import re

from moevlm.serve.errors import ApiError

log = logging.getLogger("moevlm.serve")
REQUEST_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")
# Ids of requests and completions need to be unique, not secret: a generator of their own (seeded from
# os.urandom once, so no seeding elsewhere repeats them) spares a system call per id on the event loop.
_IDS = random.Random()


def new_id() -> str:
    return f"{_IDS.getrandbits(128):032x}"


class ClientLeft(Exception):
    """The client disconnected before its request's body had arrived."""


def check_key(headers, api_key: str | None) -> None:
    """``headers``: the request's, by lower-case name."""
    if api_key is None:
        return
    given = headers.get("authorization", "")
    if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
        raise ApiError(401, "missing or wrong API key (Authorization: Bearer KEY)", code="invalid_api_key",
                       headers={"WWW-Authenticate": "Bearer"})


async def read_json(headers, receive, max_bytes: int):
    """The JSON body of a request (its ``headers`` by lower-case name, its ASGI ``receive``), bounded in
    size; only ``Content-Type: application/json`` is read, so a page elsewhere cannot post a form or
    text/plain "simple request" (no CORS preflight) to the server. Raises ClientLeft if the client goes."""
    kind = headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "application/json":
        raise ApiError(415, f"the request body must be Content-Type: application/json, not {kind or 'none'!r}"[:200],
                       code="unsupported_media_type")
    declared = headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > max_bytes:
        raise ApiError(413, f"the request body is over {max_bytes} bytes", code="body_too_large")
    chunks, size, more = [], 0, True
    while more:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientLeft
        chunk, more = message.get("body", b""), message.get("more_body", False)
        size += len(chunk)
        if size > max_bytes:
            raise ApiError(413, f"the request body is over {max_bytes} bytes", code="body_too_large")
        chunks.append(chunk)
    try:
        return json.loads(b"".join(chunks))
    except RecursionError:
        raise ApiError(400, "the request body is not valid JSON: nested too deeply", code="invalid_json") from None
    except (ValueError, UnicodeDecodeError) as err:
        raise ApiError(400, f"the request body is not valid JSON: {err}", code="invalid_json") from None


def install(app, metrics, allowed_origins: list[str]) -> None:
    """Error handlers and middleware of the app; ``metrics`` counts every error by status."""
    # Lazy: the server stack is only needed by `moevlm serve`. Routing's 404/405 are Starlette's own
    # HTTPException, which FastAPI's subclass of it would not catch.
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException

    def reply(err: ApiError):
        metrics.add_request(str(err.status))
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    @app.exception_handler(ApiError)
    async def api_error(request, err: ApiError):
        return reply(err)

    @app.exception_handler(HTTPException)
    async def http_error(request, err: HTTPException):
        codes = {404: "not_found", 405: "method_not_allowed"}
        message = {404: f"no such endpoint: {request.method} {request.url.path}"[:300],
                   405: f"method {request.method} is not allowed on {request.url.path}"[:300]}
        return reply(ApiError(err.status_code, message.get(err.status_code, str(err.detail)),
                              code=codes.get(err.status_code), headers=dict(err.headers or {})))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, err: RequestValidationError):
        return reply(ApiError(400, "the request is not valid", code="invalid_request"))

    @app.exception_handler(Exception)
    async def bug(request, err: Exception):
        log.error("internal error on %s %s: %s", request.method, request.url.path, repr(err)[:500])
        return reply(ApiError(500, "internal server error", code="internal_error"))

    app.add_middleware(RequestIdMiddleware)
    if allowed_origins:
        from fastapi.middleware.cors import CORSMiddleware  # Lazy: as above

        app.add_middleware(CORSMiddleware, allow_origins=allowed_origins, allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type", "x-request-id"],
                           expose_headers=["x-request-id"], max_age=600)


class RequestIdMiddleware:
    """Puts ``x-request-id`` on every response: the client's own (up to 128 of ``A-Za-z0-9._:-``) or a
    new one. Plain ASGI, so streamed responses and disconnects pass through untouched."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        given = next((value.decode("latin-1") for name, value in scope["headers"] if name == b"x-request-id"), "")
        request_id = given if REQUEST_ID.fullmatch(given) else new_id()
        scope.setdefault("state", {})["request_id"] = request_id

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.encode())]
            await send(message)

        await self.app(scope, receive, send_with_id)
