"""``moevlm serve``: the engine and the app under uvicorn, with a graceful stop on SIGTERM or Ctrl-C.

On SIGTERM uvicorn stops accepting connections and lets the requests in flight finish for up to
``grace`` seconds, then cancels what is left; the engine stops after the last connection closed,
and the process exits 0.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from pathlib import Path

from moevlm.checkpoint import verify_checkpoint
from moevlm.errors import ConfigError, MoevlmError
from moevlm.serve.api import ServeOptions, create_app
from moevlm.serve.engine import Engine
from moevlm.serve.images import ImageLimits

log = logging.getLogger("moevlm.serve")


def build_server(model_dir: str | Path, *, host: str = "127.0.0.1", port: int = 8000, device: str = "auto",
                 api_key: str | None = None, served_name: str | None = None, max_batch: int = 16,
                 max_queue: int = 64, grace: float = 10.0, allow_http_images: bool = False,
                 max_image_bytes: int = 10 * 2**20, max_image_pixels: int = 40_000_000,
                 max_body_bytes: int = 20 * 2**20):
    """(uvicorn server, engine), not started: ``server.run()`` serves until stopped."""
    # Lazy: uvicorn is only needed by `moevlm serve`.
    import uvicorn

    for flag, value in (("--max-batch", max_batch), ("--max-queue", max_queue), ("--max-image-bytes", max_image_bytes),
                        ("--max-image-pixels", max_image_pixels), ("--max-body-bytes", max_body_bytes)):
        if value < 1:
            raise ConfigError(f"{flag} must be >= 1, not {value}")
    verify_checkpoint(Path(model_dir))  # a wrong folder fails now, not on the loading thread
    engine = Engine(model_dir, device=device, max_batch=max_batch, max_queue=max_queue)
    options = ServeOptions(served_name=served_name or Path(model_dir).resolve().name, api_key=api_key,
                           max_body_bytes=max_body_bytes,
                           images=ImageLimits(max_bytes=max_image_bytes, max_pixels=max_image_pixels,
                                              allow_urls=allow_http_images))
    app = create_app(engine, options)

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        engine.start()
        yield
        engine.stop(timeout=grace)

    app.router.lifespan_context = lifespan
    config = uvicorn.Config(app, host=host, port=port, timeout_graceful_shutdown=grace, log_level="warning",
                            lifespan="on")
    server = uvicorn.Server(config)
    return server, engine


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
