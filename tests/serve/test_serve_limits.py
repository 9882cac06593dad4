"""Bad requests get OpenAI-shaped 4xx errors and the server goes on; a full queue gets 429 at once; a
client that leaves frees its slot; SIGTERM mid-stream shuts the server down cleanly (exit 0)."""

import base64
import contextlib
import io
import json
import os
import signal
import struct
import subprocess
import sys
import threading
import time
import urllib.request
import zlib
from unittest.mock import ANY

import pytest
from PIL import Image
from serve_helpers import data_url, free_port, http, live_server, picture, user_message, wait_for

KEY = "secret-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def strict(checkpoint):
    with live_server(checkpoint, api_key=KEY, max_body_bytes=100_000, max_image_pixels=64 * 64,
                     max_image_bytes=20_000) as running:
        yield running[0], checkpoint.name


def bomb_png(width: int, height: int) -> bytes:
    """A small PNG whose header claims width x height pixels."""
    buffer = io.BytesIO()
    Image.new("L", (8, 8)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    ihdr = 8 + 8  # signature, then the IHDR chunk's length and type
    data[ihdr:ihdr + 8] = struct.pack(">II", width, height)
    data[ihdr + 13:ihdr + 17] = struct.pack(">I", zlib.crc32(bytes(data[ihdr - 4:ihdr + 13])))
    return bytes(data)


def body(model, **changes) -> dict:
    request = {"model": model, "messages": user_message(data_url(picture(0))), "max_tokens": 4, "temperature": 0}
    request.update(changes)
    return request


def b64_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def two_images_in_one_message() -> list[dict]:
    message = user_message(data_url(picture(0)), "compare")
    message[0]["content"].insert(1, {"type": "image_url", "image_url": {"url": data_url(picture(1))}})
    return message


# case: (status, param, code (ANY: not checked here), body, headers)
BAD = {
    "no key": (401, None, "invalid_api_key", lambda m: json.dumps(body(m)).encode(), {}),
    "malformed JSON": (400, None, "invalid_json", lambda m: b'{"model": ', AUTH),
    "JSON nested too deeply": (400, None, "invalid_json", lambda m: b"[" * 100_000, AUTH),
    "not JSON": (415, None, "unsupported_media_type", lambda m: json.dumps(body(m)).encode(),
                 {**AUTH, "Content-Type": "text/plain"}),
    "body too large": (413, None, "body_too_large", lambda m: json.dumps(body(m, user="x" * 200_000)).encode(),
                       AUTH),
    "unknown model": (404, "model", "model_not_found", lambda m: json.dumps({**body(m), "model": "gpt-4o"}).encode(),
                      AUTH),
    "unsupported parameter": (400, "tools", "unsupported_parameter",
                              lambda m: json.dumps(body(m, tools=[])).encode(), AUTH),
    "bad base64": (400, "messages", "invalid_image_url",
                   lambda m: json.dumps(body(m, messages=user_message("data:image/png;base64,@@@"))).encode(), AUTH),
    "not an image": (400, "messages", "invalid_image",
                     lambda m: json.dumps(body(m, messages=user_message(b64_url(b"hello")))).encode(), AUTH),
    "http image": (400, "messages", "image_url_refused",
                   lambda m: json.dumps(body(m, messages=user_message("http://127.0.0.1:9/a.png"))).encode(), AUTH),
    "file image": (400, "messages", "image_url_refused",
                   lambda m: json.dumps(body(m, messages=user_message("file:///etc/hostname"))).encode(), AUTH),
    "two images": (400, "messages", ANY, lambda m: json.dumps(body(m, messages=two_images_in_one_message())).encode(),
                   AUTH),
    "too many pixels": (413, "messages", "image_too_large", lambda m: json.dumps(body(m, messages=user_message(
        data_url(Image.new("RGB", (100, 100)))))).encode(), AUTH),
    "decompression bomb": (413, "messages", "image_too_large", lambda m: json.dumps(body(m, messages=user_message(
        b64_url(bomb_png(100_000, 100_000))))).encode(), AUTH),
    "image bytes": (413, "messages", "image_too_large", lambda m: json.dumps(body(m, messages=user_message(
        b64_url(os.urandom(30_000))))).encode(), AUTH),
    "max_tokens over the limit": (400, "max_tokens", ANY, lambda m: json.dumps(body(m, max_tokens=10_000)).encode(),
                                  AUTH),
    "temperature": (400, "temperature", ANY, lambda m: json.dumps(body(m, temperature="hot")).encode(), AUTH),
    "n": (400, "n", ANY, lambda m: json.dumps(body(m, n=0)).encode(), AUTH),
    "roles": (400, "messages", ANY, lambda m: json.dumps(body(m, messages=user_message(data_url(picture(0)))
                                                         + [{"role": "assistant", "content": "a"}])).encode(), AUTH),
}


@pytest.mark.parametrize("case", BAD)
def test_a_bad_request_gets_its_4xx_and_the_next_good_one_succeeds(strict, case):
    url, model = strict
    status, param, code, make, headers = BAD[case]
    got, _, reply = http(f"{url}/v1/chat/completions", make(model), headers)
    error = json.loads(reply)["error"]
    assert got == status, error
    assert error["message"] and "\n" not in error["message"] and error["type"]
    assert (error["param"], error["code"]) == (param, code), error
    got, _, reply = http(f"{url}/v1/chat/completions", json.dumps(body(model)).encode(), AUTH)
    assert got == 200 and json.loads(reply)["choices"][0]["message"]["role"] == "assistant"


def slow_and_endless(engine, monkeypatch, delay: float) -> None:
    """Every decoding step takes ``delay`` seconds and never ends a sequence (no <eos>, not even as
    the first token)."""
    step, prefill, eos = engine.model.step, engine.model.prefill, engine.tokenizer.eos_id

    def slow_step(*args, **kwargs):
        time.sleep(delay)
        logits = step(*args, **kwargs)
        logits[:, eos] = float("-inf")
        return logits

    def endless_prefill(*args, **kwargs):
        logits, key_mask = prefill(*args, **kwargs)
        logits[:, eos] = float("-inf")
        return logits, key_mask

    monkeypatch.setattr(engine.model, "step", slow_step)
    monkeypatch.setattr(engine.model, "prefill", endless_prefill)


def stream_request(url: str, model: str, max_tokens: int):
    request = urllib.request.Request(f"{url}/v1/chat/completions", headers={"Content-Type": "application/json"},
                                     data=json.dumps(body(model, max_tokens=max_tokens, stream=True)).encode())
    return urllib.request.urlopen(request, timeout=30)


def test_a_full_queue_gets_429_at_once_and_a_client_that_leaves_frees_its_slot(checkpoint, monkeypatch):
    with live_server(checkpoint, max_batch=1, max_queue=1) as (url, engine):
        slow_and_endless(engine, monkeypatch, 0.05)
        model = checkpoint.name
        running = stream_request(url, model, max_tokens=20)
        running.readline()  # the first chunk: it holds the only batch slot
        waiting = threading.Thread(target=lambda: http(f"{url}/v1/chat/completions",
                                                       json.dumps(body(model, max_tokens=20)).encode()))
        waiting.start()
        wait_for(lambda: engine.metrics.queue_length == 1)
        started = time.monotonic()
        status, headers, reply = http(f"{url}/v1/chat/completions", json.dumps(body(model)).encode())
        assert (status, headers["Retry-After"]) == (429, "1") and time.monotonic() - started < 2
        assert json.loads(reply)["error"]["code"] == "queue_full"
        running.close()  # leaves after a token or two of its 20
        waiting.join(30)  # the queued request got the slot and finished its 20 tokens
        wait_for(lambda: engine.metrics.batch_size == 0)
        assert engine.metrics.completion_tokens < 20 + 20


# `moevlm serve` whose every decoding step takes DELAY seconds and never ends a sequence early, so a
# stream is surely still running when SIGTERM comes.
SLOW_SERVE = """
import math, sys, time
from moevlm.cli import main
from moevlm.serve.engine import Engine
load = Engine.load
def slow_load(self):
    load(self)
    step, prefill, eos = self.model.step, self.model.prefill, self.tokenizer.eos_id
    def slow_step(*args, **kwargs):
        time.sleep(DELAY)
        logits = step(*args, **kwargs)
        logits[:, eos] = -math.inf
        return logits
    def endless_prefill(*args, **kwargs):
        logits, key_mask = prefill(*args, **kwargs)
        logits[:, eos] = -math.inf
        return logits, key_mask
    self.model.step, self.model.prefill = slow_step, endless_prefill
Engine.load = slow_load
sys.exit(main(sys.argv[1:]))
"""


@contextlib.contextmanager
def slow_server(checkpoint, delay: float, grace: float):
    """(base URL, process) of a slowed `moevlm serve` in a subprocess, ready to answer."""
    port = free_port()
    process = subprocess.Popen([sys.executable, "-c", SLOW_SERVE.replace("DELAY", repr(delay)), "serve", "--model",
                                str(checkpoint), "--port", str(port), "--device", "cpu", "--grace", str(grace),
                                "--no-compile"],  # the slowed step is the eager one
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 90
        while True:
            assert process.poll() is None, process.stderr.read()
            try:
                if http(f"{url}/health", timeout=2)[0] == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "the server did not become ready"
            time.sleep(0.1)
        yield url, process
    finally:
        if process.poll() is None:
            process.kill()
        process.communicate()


def sse_events(text: str) -> list[str]:
    return [part[6:] for part in text.split("\n\n") if part.startswith("data: ")]


def test_sigterm_mid_stream_finishes_the_stream_and_exits_0(checkpoint):
    """A token every 0.1 s: the stream is mid-way when SIGTERM comes, and finishes within --grace."""
    with slow_server(checkpoint, delay=0.1, grace=20) as (url, process):
        stream = stream_request(url, checkpoint.name, max_tokens=16)
        assert stream.readline().startswith(b"data: ")
        process.send_signal(signal.SIGTERM)
        events = sse_events(stream.read().decode())
        chunks = [json.loads(event) for event in events[:-1]]
        assert events[-1] == "[DONE]" and chunks[-1]["choices"][0]["finish_reason"] == "length"
        assert sum(1 for chunk in chunks if chunk["choices"][0]["delta"].get("content")) >= 10
        assert process.wait(timeout=30) == 0
        with pytest.raises(OSError):
            http(f"{url}/health", timeout=2)


def test_past_grace_a_stream_gets_its_last_chunk_and_a_request_a_503(checkpoint):
    """A token every 0.3 s, --grace 0.5: the stream ends with an error chunk, a finish_reason and
    [DONE]; the non-streaming request gets an OpenAI-shaped 503; no traceback; exit 0."""
    with slow_server(checkpoint, delay=0.3, grace=0.5) as (url, process):
        waiting = []
        thread = threading.Thread(target=lambda: waiting.append(http(
            f"{url}/v1/chat/completions", json.dumps(body(checkpoint.name, max_tokens=20)).encode())))
        thread.start()
        stream = stream_request(url, checkpoint.name, max_tokens=20)
        assert stream.readline().startswith(b"data: ")
        wait_for(lambda: 'moevlm_batch_size 2' in http(f"{url}/metrics")[2].decode(), seconds=30)
        process.send_signal(signal.SIGTERM)
        events = sse_events(stream.read().decode())
        thread.join(30)
        assert process.wait(timeout=30) == 0
        stderr = process.communicate()[1]
    assert events[-1] == "[DONE]" and json.loads(events[-3])["error"]["code"] == "server_shutting_down"
    assert json.loads(events[-2])["choices"][0]["finish_reason"] == "length"
    status, headers, reply = waiting[0]
    error = json.loads(reply)["error"]
    assert status == 503 and headers["Content-Type"] == "application/json"
    assert (error["type"], error["param"], error["code"]) == ("service_unavailable", None, "server_shutting_down")
    assert "Traceback" not in stderr and "Cancel" not in stderr, stderr
