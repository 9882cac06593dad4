"""Helpers of the serve tests: pictures as data: URLs, and a live server on 127.0.0.1 (a free port, in a thread)."""

import base64
import contextlib
import io
import socket
import threading
import time
import urllib.error
import urllib.request

from PIL import Image, ImageDraw

from moevlm.serve.server import build_server
from shapes import COLORS


def picture(index: int) -> Image.Image:
    """A coloured square or bar on grey, different for every index."""
    names = list(COLORS)
    image = Image.new("RGB", (24, 24), (128, 128, 128 - index % 50))
    box = (4, 4, 20, 20) if index % 2 else (2, 9, 22, 15)
    ImageDraw.Draw(image).rectangle(box, fill=COLORS[names[index % len(names)]])
    return image


def data_url(image: Image.Image, fmt: str = "PNG") -> str:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buffer.getvalue()).decode()


def user_message(image_url: str, text: str | None = None) -> list[dict]:
    parts = [{"type": "image_url", "image_url": {"url": image_url}}]
    return [{"role": "user", "content": parts + ([{"type": "text", "text": text}] if text else [])}]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def live_server(model_dir, **options):
    """(base URL, engine) of a server running in this process until the block ends."""
    options.setdefault("compile", False)  # compiling is tested on its own (test_serve_compiled.py)
    server, engine = build_server(model_dir, port=free_port(), device="cpu", **options)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not (server.started and engine.ready.is_set()):
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{server.config.port}", engine
    finally:
        server.should_exit = True
        thread.join(30)


def http(url: str, body: bytes | None = None, headers: dict | None = None, timeout: float = 30):
    """(status, headers, body) of a GET, or a POST of ``body``, whatever the status."""
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as err:
        return err.code, err.headers, err.read()


def wait_for(condition, seconds: float = 10) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)
