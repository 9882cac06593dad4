"""The HTTP around the API: every error OpenAI-shaped (routing's 404/405, bodies nested too deeply, a
bug's 500), GET /v1/models/{id}, the key on /metrics with WWW-Authenticate, 415 for bodies that are not
JSON, CORS (on the chat route too), x-request-id, base64 as encoders write it, header sizes as the
header says them, the request timeout, and a non-streaming client that leaves freeing its slot at once."""

import base64
import io
import json
import socket
import struct
import tempfile
import time
import urllib.parse

import pytest
from PIL import Image
from serve_helpers import data_url, http, live_server, picture, user_message, wait_for
from test_serve_limits import slow_and_endless

KEY = "secret-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
ORIGIN = "https://app.example"


@pytest.fixture(scope="module")
def keyed(checkpoint):
    with live_server(checkpoint, api_key=KEY, allowed_origins=[ORIGIN]) as (url, engine):
        yield url, checkpoint.name, engine


def request(model, **changes) -> dict:
    return {"model": model, "messages": user_message(data_url(picture(0))), "max_tokens": 4, "temperature": 0,
            **changes}


def error_of(reply: bytes) -> dict:
    error = json.loads(reply)["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"] and error["type"]
    return error


def outcome_count(url: str, status: str) -> int:
    text = http(f"{url}/metrics", headers=AUTH)[2].decode()
    line = next((row for row in text.splitlines() if row.startswith(f'moevlm_requests_total{{outcome="{status}"}}')),
                None)
    return int(line.split()[-1]) if line else 0


def test_deeply_nested_json_is_an_openai_400_counted_in_metrics(keyed):
    url, model, _ = keyed
    before = outcome_count(url, "400")
    status, headers, reply = http(f"{url}/v1/chat/completions", b"[" * 100_000, AUTH)
    assert status == 400 and headers["Content-Type"] == "application/json"
    error = error_of(reply)
    assert (error["param"], error["code"]) == (None, "invalid_json") and "nested too deeply" in error["message"]
    assert outcome_count(url, "400") == before + 1


def test_routing_errors_are_openai_shaped_and_models_have_their_own_url(keyed):
    url, model, _ = keyed
    status, _, reply = http(f"{url}/v1/nothing", headers=AUTH)
    assert status == 404 and error_of(reply)["code"] == "not_found"
    status, _, reply = http(f"{url}/v1/chat/completions", headers=AUTH)  # a GET
    assert status == 405 and error_of(reply)["code"] == "method_not_allowed"
    status, _, reply = http(f"{url}/v1/models/{model}", headers=AUTH)
    assert status == 200 and json.loads(reply)["id"] == model and json.loads(reply)["object"] == "model"
    status, _, reply = http(f"{url}/v1/models/gpt-4o", headers=AUTH)
    error = error_of(reply)
    assert status == 404 and (error["param"], error["code"]) == ("model", "model_not_found")
    status, _, reply = http(f"{url}/v1/models/{model}")
    assert status == 401 and error_of(reply)["code"] == "invalid_api_key"


def test_the_key_guards_metrics_and_a_401_says_bearer(keyed):
    url, _, _ = keyed
    status, headers, reply = http(f"{url}/metrics")
    assert status == 401 and headers["WWW-Authenticate"] == "Bearer"
    assert error_of(reply)["code"] == "invalid_api_key"
    assert http(f"{url}/metrics", headers=AUTH)[0] == 200


def test_a_body_that_is_not_json_is_refused_with_415(keyed):
    url, model, _ = keyed
    for kind in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"):
        status, _, reply = http(f"{url}/v1/chat/completions", json.dumps(request(model)).encode(),
                                {**AUTH, "Content-Type": kind})
        error = error_of(reply)
        assert status == 415 and (error["param"], error["code"]) == (None, "unsupported_media_type"), kind
    status, _, _ = http(f"{url}/v1/chat/completions", json.dumps(request(model)).encode(),
                        {**AUTH, "Content-Type": "application/json; charset=utf-8"})
    assert status == 200


def test_cors_answers_allowed_origins_only(keyed):
    url, _, _ = keyed

    def preflight(origin):
        import urllib.request
        ask = urllib.request.Request(f"{url}/v1/chat/completions", method="OPTIONS", headers={
            "Origin": origin, "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,content-type"})
        try:
            with urllib.request.urlopen(ask, timeout=10) as reply:
                return reply.status, reply.headers
        except urllib.error.HTTPError as err:
            return err.code, err.headers

    status, headers = preflight(ORIGIN)
    assert status == 200 and headers["Access-Control-Allow-Origin"] == ORIGIN
    status, headers = preflight("https://evil.example")
    assert headers["Access-Control-Allow-Origin"] is None
    _, headers, _ = http(f"{url}/v1/models", headers={**AUTH, "Origin": ORIGIN})
    assert headers["Access-Control-Allow-Origin"] == ORIGIN


def test_a_chat_completion_from_an_allowed_origin_gets_cors_headers(keyed):
    """The chat route answers past FastAPI's layers, but CORS still answers requests with an Origin."""
    url, model, _ = keyed
    body = json.dumps(request(model)).encode()
    status, headers, _ = http(f"{url}/v1/chat/completions", body, {**AUTH, "Origin": ORIGIN})
    assert status == 200 and headers["Access-Control-Allow-Origin"] == ORIGIN and headers["x-request-id"]
    status, headers, _ = http(f"{url}/v1/chat/completions", body, {**AUTH, "Origin": "https://evil.example"})
    assert status == 200 and headers["Access-Control-Allow-Origin"] is None


def test_a_bug_in_the_chat_route_is_an_openai_500_counted_in_metrics(keyed, monkeypatch):
    import moevlm.serve.completions as completions

    def broken(*args):
        raise RuntimeError("a bug")

    monkeypatch.setattr(completions, "request_prompt", broken)
    url, model, _ = keyed
    before = outcome_count(url, "500")
    for origin in ({}, {"Origin": ORIGIN}):  # past FastAPI, and through it
        status, headers, reply = http(f"{url}/v1/chat/completions", json.dumps(request(model)).encode(),
                                      {**AUTH, **origin, "x-request-id": "bug-1"})
        assert (status, headers["x-request-id"]) == (500, "bug-1")
        assert error_of(reply) == {"message": "internal server error", "type": "server_error", "param": None,
                                   "code": "internal_error"}
    assert outcome_count(url, "500") == before + 2


def test_no_cors_by_default(checkpoint):
    with live_server(checkpoint) as (url, _):
        _, headers, _ = http(f"{url}/v1/models", headers={"Origin": ORIGIN})
    assert headers["Access-Control-Allow-Origin"] is None


def test_x_request_id_is_echoed_or_made(keyed):
    url, model, _ = keyed
    _, headers, _ = http(f"{url}/v1/chat/completions", json.dumps(request(model)).encode(),
                         {**AUTH, "x-request-id": "client-42.a:b"})
    assert headers["x-request-id"] == "client-42.a:b"
    for given in ({}, {"x-request-id": "x" * 129}, {"x-request-id": "bad id\t<script>"}):
        _, headers, _ = http(f"{url}/v1/models", headers={**AUTH, **given})
        made = headers["x-request-id"]
        assert len(made) == 32 and int(made, 16) >= 0
    _, headers, _ = http(f"{url}/v1/nothing", headers={**AUTH, "x-request-id": "on-errors-too"})
    assert headers["x-request-id"] == "on-errors-too"


def test_base64_with_line_breaks_or_url_safe_is_the_same_image(keyed):
    url, model, _ = keyed
    buffer = io.BytesIO()
    picture(4).save(buffer, format="PNG")
    raw = buffer.getvalue()
    answers = []
    for payload in (base64.b64encode(raw).decode(), base64.encodebytes(raw).decode(),
                    base64.urlsafe_b64encode(raw).decode().rstrip("=")):
        status, _, reply = http(f"{url}/v1/chat/completions", json.dumps(
            request(model, messages=user_message("data:image/png;base64," + payload))).encode(), AUTH)
        assert status == 200, reply
        answers.append(json.loads(reply)["choices"][0]["message"]["content"])
    assert answers[0] == answers[1] == answers[2]


def test_an_image_over_the_pixel_limit_is_reported_with_its_header_size(keyed):
    url, model, _ = keyed
    buffer = io.BytesIO()
    Image.new("P", (4, 4)).save(buffer, format="GIF")
    gif = bytearray(buffer.getvalue())
    gif[6:10] = struct.pack("<HH", 65535, 65535)  # the logical screen size
    status, _, reply = http(f"{url}/v1/chat/completions", json.dumps(request(model, messages=user_message(
        "data:image/gif;base64," + base64.b64encode(bytes(gif)).decode()))).encode(), AUTH)
    error = error_of(reply)
    assert status == 413 and (error["param"], error["code"]) == ("messages", "image_too_large")
    assert error["message"] == "image_url: the image has 65535x65535 pixels, over the limit of 16777216"


def test_the_request_timeout_ends_a_request_and_a_stream(checkpoint, monkeypatch):
    with live_server(checkpoint, request_timeout=1.0) as (url, engine):
        slow_and_endless(engine, monkeypatch, 0.2)  # the model's 20-odd tokens take 4 s or more
        model = checkpoint.name
        status, _, reply = http(f"{url}/v1/chat/completions", json.dumps(request(model, max_tokens=None)).encode())
        error = error_of(reply)
        assert status == 504 and (error["param"], error["code"]) == (None, "timeout")
        status, _, reply = http(f"{url}/v1/chat/completions",
                                json.dumps(request(model, max_tokens=None, stream=True)).encode())
        events = [line[6:] for line in reply.decode().split("\n\n") if line.startswith("data: ")]
        assert status == 200 and events[-1] == "[DONE]"
        assert json.loads(events[-3])["error"]["code"] == "timeout"
        assert json.loads(events[-2])["choices"][0]["finish_reason"] == "length"
        wait_for(lambda: engine.metrics.batch_size == 0)


def test_a_non_streaming_client_that_leaves_frees_its_slot_at_once(checkpoint, monkeypatch):
    """The job would decode for 6 s or more, a token every 0.3 s; its slot is free soon after the client
    hangs up (watched while tokens keep coming, not only after a pause of 0.5 s), as /metrics shows."""
    with live_server(checkpoint) as (url, engine):
        slow_and_endless(engine, monkeypatch, 0.3)
        body = json.dumps(request(checkpoint.name, max_tokens=None)).encode()
        parts = urllib.parse.urlsplit(url)
        client = socket.create_connection((parts.hostname, parts.port))
        client.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                       b"Content-Length: %d\r\n\r\n" % len(body) + body)

        def batch_size() -> int:
            text = http(f"{url}/metrics")[2].decode()
            return int(next(row for row in text.splitlines() if row.startswith("moevlm_batch_size ")).split()[-1])

        wait_for(lambda: batch_size() == 1)
        client.close()
        wait_for(lambda: batch_size() == 0, seconds=2)


def slow_down(engine, seconds: float) -> None:
    for name in ("prefill", "step"):
        def slowed(*args, original=getattr(engine.model, name), **kwargs):
            time.sleep(seconds)
            return original(*args, **kwargs)
        setattr(engine.model, name, slowed)


def test_the_page_with_a_key_sends_one_request_for_two_enters(checkpoint, tmp_path):
    """With --api-key the page first asks for the key (no JavaScript error in the status); pressing
    Enter twice sends one request, and the answer is that request's alone."""
    from playwright.sync_api import sync_playwright
    from test_serve_page import CHROMIUM_ARGS, chromium_path

    executable = chromium_path()
    image = tmp_path / "picture.png"
    picture(3).resize((96, 96)).save(image)
    with live_server(checkpoint, api_key=KEY) as (url, engine), sync_playwright() as playwright, \
            tempfile.TemporaryDirectory() as profile:
        most = engine.config.model.decoder.max_text_len  # what the page sends (its default 32, at most this)
        alone = json.loads(http(f"{url}/v1/chat/completions", json.dumps(request(
            checkpoint.name, max_tokens=min(32, most), messages=user_message(data_url(Image.open(image)), "what is it")
        )).encode(), AUTH)[2])["choices"][0]["message"]["content"]
        before = outcome_count(url, "ok")
        slow_down(engine, 0.2)  # the first answer is still running when Enter is pressed again
        browser = playwright.chromium.launch_persistent_context(profile, executable_path=executable,
                                                                args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.goto(url + "/")
            page.wait_for_function("document.getElementById('status').textContent !== ''")
            assert page.text_content("#status") == "enter the API key, then send"
            page.fill("#key", KEY)
            page.set_input_files("#file", str(image))
            page.wait_for_function("document.getElementById('preview').src.startsWith('data:image/png')")
            page.fill("#prompt", "what is it")
            page.press("#prompt", "Enter")
            page.press("#prompt", "Enter")
            page.wait_for_function("document.getElementById('status').textContent.startsWith('done')",
                                   timeout=30_000)
            assert page.text_content("#answer") == alone
        finally:
            browser.close()
        assert outcome_count(url, "ok") == before + 1
