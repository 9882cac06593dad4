"""Pieces of the server on their own: multi-turn prompts, the stop-string hold-back, loading state,
and opt-in image URLs."""

import json
import threading

from serve_helpers import data_url, free_port, http, live_server, picture, user_message, wait_for

from moevlm.cli import main
from moevlm.data.tokenizer import Tokenizer
from moevlm.serve.chat import prompt_ids
from moevlm.serve.engine import Engine, _held_back
from moevlm.serve.server import build_server


def test_a_multi_turn_prompt_is_the_conversation_up_to_the_last_answer(checkpoint):
    tokenizer = Tokenizer.load(checkpoint / "tokenizer.json")
    first, _ = tokenizer.encode_conversation([("it?", "a bar")], 24)
    ids = prompt_ids(tokenizer, [("it?", "a bar"), ("and?", "")], 24)
    assert ids == first + tokenizer.encode("and?") + [tokenizer.sep_id]
    assert prompt_ids(tokenizer, [("it?", "")], 24) == tokenizer.prompt_ids("it?")


def test_text_that_may_still_become_a_stop_string_is_held_back():
    assert _held_back("a red ba", ["bar"]) == 2
    assert _held_back("a red b", ["bar", "red bx"]) == 5  # the longest one that may follow
    assert _held_back("a red", ["bar"]) == 0
    assert _held_back("caf\ufffd", []) == 1  # half of a multi-byte character


def test_health_says_loading_until_the_model_is_loaded(checkpoint, monkeypatch):
    loaded = threading.Event()
    real_load = Engine.load

    def slow_load(self):
        loaded.wait(30)
        real_load(self)

    monkeypatch.setattr(Engine, "load", slow_load)
    server, engine = build_server(checkpoint, port=free_port(), device="cpu", compile=False)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        wait_for(lambda: server.started)
        url = f"http://127.0.0.1:{server.config.port}"
        assert http(f"{url}/health")[:3:2] == (503, b'{"status":"loading"}')
        body = json.dumps({"model": checkpoint.name, "messages": user_message(data_url(picture(0)))}).encode()
        status, headers, _ = http(f"{url}/v1/chat/completions", body)
        assert (status, headers["Retry-After"]) == (503, "1")
        loaded.set()
        wait_for(lambda: engine.ready.is_set())
        assert http(f"{url}/health")[0] == 200
        assert http(f"{url}/v1/chat/completions", body)[0] == 200
    finally:
        loaded.set()
        server.should_exit = True
        thread.join(30)


def test_file_urls_are_read_only_when_allowed(checkpoint, tmp_path):
    path = tmp_path / "picture.png"
    picture(5).save(path)
    request = {"model": checkpoint.name, "temperature": 0, "max_tokens": 8}
    with live_server(checkpoint, allowed_local_media_path=tmp_path) as (url, _):
        by_file = http(f"{url}/v1/chat/completions", json.dumps(
            {**request, "messages": user_message(path.as_uri())}).encode())
        inline = http(f"{url}/v1/chat/completions", json.dumps(
            {**request, "messages": user_message(data_url(picture(5)))}).encode())
        missing = http(f"{url}/v1/chat/completions", json.dumps(
            {**request, "messages": user_message((tmp_path / "none.png").as_uri())}).encode())
    assert by_file[0] == inline[0] == 200
    assert json.loads(by_file[2])["choices"] == json.loads(inline[2])["choices"]
    assert missing[0] == 400 and json.loads(missing[2])["error"]["code"] == "image_unreadable"


def test_serve_refuses_a_missing_folder_and_bad_limits_with_exit_code_2(checkpoint, tmp_path, capsys):
    assert main(["serve", "--model", str(tmp_path / "none")]) == 2
    assert f"{tmp_path / 'none'}: no such checkpoint folder" in capsys.readouterr().err
    assert main(["serve", "--model", str(checkpoint), "--max-batch", "0"]) == 2
    assert "--max-batch must be >= 1, not 0" in capsys.readouterr().err
