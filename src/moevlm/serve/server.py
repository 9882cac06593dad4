"""``moevlm serve``: the engine and the app under uvicorn, with a graceful stop on SIGTERM or Ctrl-C.

On SIGTERM uvicorn stops accepting connections and lets the requests in flight finish for up to
``grace`` seconds; then the requests still running are ended as a client can read it (a stream's last
chunk with a finish_reason and ``data: [DONE]``, or a 503), the engine stops after the last connection
closed, and the process exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
from pathlib import Path

from moevlm.checkpoint import verify_checkpoint
from moevlm.errors import ConfigError, MoevlmError
from moevlm.models.quantized import check_quantize
from moevlm.serve.api import ServeOptions, create_app
from moevlm.serve.engine import Engine
from moevlm.serve.fetch import FetchPolicy
from moevlm.serve.images import DEFAULT_MAX_PIXELS, ImageLimits

log = logging.getLogger("moevlm.serve")
CLOSING_MARGIN = 2.0  # seconds the requests get to send their last words after --grace, before uvicorn cancels
PILLOW_MAX_PIXELS = 2 * 89_478_485  # above this Pillow refuses to decode (its decompression-bomb error)


def build_server(model_dir: str | Path, *, host: str = "127.0.0.1", port: int = 8000, device: str = "auto",
                 api_key: str | None = None, served_name: str | None = None, max_batch: int = 16,
                 max_queue: int = 64, grace: float = 10.0, allow_http_images: bool = False,
                 max_image_bytes: int = 10 * 2**20, max_image_pixels: int = DEFAULT_MAX_PIXELS,
                 max_image_decodes: int = 2, max_image_fetches: int = 8, image_fetch_timeout: float = 10.0,
                 allowed_local_media_path: str | Path | None = None, max_body_bytes: int = 20 * 2**20,
                 request_timeout: float = 600.0, allowed_origins: list[str] | tuple[str, ...] = (),
                 quantize: str | None = None, compile: bool = True):
    """(uvicorn server, engine), not started: ``server.run()`` serves until stopped. ``compile``:
    decode with the compiled step (serve/slots.py), compiled for every batch bucket at start."""
    # Lazy: uvicorn is only needed by `moevlm serve`.
    import uvicorn

    for flag, value in (("--max-batch", max_batch), ("--max-queue", max_queue), ("--max-image-bytes", max_image_bytes),
                        ("--max-image-pixels", max_image_pixels), ("--max-image-decodes", max_image_decodes),
                        ("--max-image-fetches", max_image_fetches), ("--max-body-bytes", max_body_bytes)):
        if value < 1:
            raise ConfigError(f"{flag} must be >= 1, not {value}")
    if max_image_pixels > PILLOW_MAX_PIXELS:
        raise ConfigError(f"--max-image-pixels must be at most {PILLOW_MAX_PIXELS} (Pillow decodes no larger "
                          f"image), not {max_image_pixels}")
    for flag, value in (("--image-fetch-timeout", image_fetch_timeout), ("--request-timeout", request_timeout)):
        if not value > 0:
            raise ConfigError(f"{flag} must be > 0, not {value}")
    if not grace >= 0:
        raise ConfigError(f"--grace must be >= 0, not {grace}")
    media = None
    if allowed_local_media_path is not None:
        media = Path(allowed_local_media_path).expanduser().resolve()
        if not media.is_dir():
            raise ConfigError(f"--allowed-local-media-path {allowed_local_media_path}: not a folder")
    verify_checkpoint(Path(model_dir))  # a wrong folder fails now, not on the loading thread
    check_quantize(quantize)  # a wrong kind fails now, not on the loading thread
    engine = Engine(model_dir, device=device, max_batch=max_batch, max_queue=max_queue, quantize=quantize,
                    compile=compile)
    fetch = FetchPolicy(allow_http=allow_http_images, local_media=media, timeout=image_fetch_timeout,
                        max_fetches=max_image_fetches)
    options = ServeOptions(served_name=served_name or Path(model_dir).resolve().name, api_key=api_key,
                           max_body_bytes=max_body_bytes, request_timeout=request_timeout,
                           allowed_origins=tuple(allowed_origins),
                           images=ImageLimits(max_bytes=max_image_bytes, max_pixels=max_image_pixels,
                                              max_decodes=max_image_decodes, fetch=fetch))
    app = create_app(engine, options)

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        engine.start()
        yield
        engine.stop(timeout=grace)

    app.router.lifespan_context = lifespan
    config = uvicorn.Config(app, host=host, port=port, timeout_graceful_shutdown=grace + CLOSING_MARGIN,
                            log_level="warning", lifespan="on")

    class Server(uvicorn.Server):
        async def shutdown(self, sockets=None):
            # uvicorn cancels the requests still running once its timeout is over, which cuts a stream
            # without a finish_reason and turns a waiting request into a 500 with a traceback. So at
            # --grace the app is told to close (serve/waiting.py): every request ends as a client can read
            # it, well before uvicorn's timeout (CLOSING_MARGIN later) would cancel it.
            async def close_at_grace():
                await asyncio.sleep(grace)
                app.state.closing.set()

            closer = asyncio.ensure_future(close_at_grace())
            try:
                await super().shutdown(sockets)
            finally:
                closer.cancel()

    return Server(config), engine


def _exit_when_loading_fails(server, engine: Engine) -> None:
    engine.ready.wait()
    if engine.failed is not None:
        server.should_exit = True


def serve(model_dir: str | Path, **options) -> None:
    """Serves until SIGTERM or Ctrl-C. A model that cannot be loaded raises MoevlmError."""
    server, engine = build_server(model_dir, **options)
    threading.Thread(target=_exit_when_loading_fails, args=(server, engine), daemon=True).start()
    print(f"moevlm: serving {model_dir} on http://{server.config.host}:{server.config.port} "
          "(the page at /, the API under /v1)", flush=True)
    # uvicorn re-raises the signal it caught once it has shut down; a handler that ignores it
    # turns a graceful SIGTERM into exit code 0 instead of death by signal.
    previous = signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        server.run()
    finally:
        signal.signal(signal.SIGTERM, previous)
    if isinstance(engine.failed, MoevlmError):
        raise engine.failed
    if engine.failed is not None:
        raise MoevlmError(f"{model_dir}: the model could not be loaded: {engine.failed}")
