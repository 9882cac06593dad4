"""The chat API with the official openai client against a live server: answers equal `moevlm caption`,
streaming, multi-turn, stop strings, routing traces, and batching that changes no answer."""

import base64
import importlib.util
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest
from serve_helpers import data_url, http, live_server, picture, user_message, wait_for

from moevlm.generate import caption_files

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture(scope="module")
def server(checkpoint):
    with live_server(checkpoint, max_batch=16) as running:
        yield running


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=f"{server[0]}/v1", api_key="unused", max_retries=0)


def file_url(path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


@pytest.mark.parametrize("prompt", ["", "what is it"])
def test_greedy_answers_equal_moevlm_caption_plain_and_streamed(checkpoint, client, tmp_path, prompt):
    paths = []
    for index in range(3):
        paths.append(tmp_path / f"{index}.png")
        picture(index).save(paths[-1])
    expected = dict(caption_files(checkpoint, paths, prompt=prompt, device="cpu", max_new_tokens=16))
    assert any(expected.values())
    for path in paths:
        messages = user_message(file_url(path), prompt or None)
        reply = client.chat.completions.create(model=checkpoint.name, messages=messages, temperature=0,
                                               max_tokens=16)
        assert reply.choices[0].message.content == expected[path]
        usage = reply.usage
        assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
        assert reply.choices[0].finish_reason in ("stop", "length")
        chunks = list(client.chat.completions.create(model=checkpoint.name, messages=messages, temperature=0,
                                                      max_tokens=16, stream=True,
                                                      stream_options={"include_usage": True}))
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected[path]
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == reply.choices[0].finish_reason
        assert chunks[-1].choices == [] and chunks[-1].usage == usage


def test_length_limit_stop_strings_and_routing_trace(checkpoint, client, server):
    messages = user_message(data_url(picture(1)))
    full = client.chat.completions.create(model=checkpoint.name, messages=messages, temperature=0, max_tokens=16)
    text = full.choices[0].message.content
    assert len(text) >= 3
    short = client.chat.completions.create(model=checkpoint.name, messages=messages, temperature=0, max_tokens=2)
    assert (short.choices[0].finish_reason, short.usage.completion_tokens) == ("length", 2)
    stop = text[1:3]
    for stream in (False, True):
        reply = client.chat.completions.create(model=checkpoint.name, messages=messages, temperature=0,
                                               max_tokens=16, stop=[stop], stream=stream)
        if stream:
            chunks = [c for c in reply if c.choices]
            got, finish = "".join(c.choices[0].delta.content or "" for c in chunks), chunks[-1].choices[0].finish_reason
        else:
            got, finish = reply.choices[0].message.content, reply.choices[0].finish_reason
        assert (got, finish) == (text[:text.index(stop)], "stop")
    traced = client.chat.completions.create(model=checkpoint.name, messages=messages, temperature=0, max_tokens=16,
                                            extra_body={"moevlm": {"routing": True}})
    trace = traced.model_extra["moevlm"]
    engine = server[1]
    moe = engine.config.model.decoder.moe
    assert trace["num_experts"] == moe.num_experts
    assert "".join(token["text"] for token in trace["tokens"]) == text
    assert len(trace["tokens"]) == full.usage.completion_tokens - (full.choices[0].finish_reason == "stop")
    for token in trace["tokens"]:
        assert len(token["experts"]) == len(engine.model.moe_layers)
        assert all(len(set(layer)) == moe.top_k and all(0 <= e < moe.num_experts for e in layer)
                   for layer in token["experts"])


def test_sampling_follows_the_seed_and_multi_turn_answers(checkpoint, client):
    messages = user_message(data_url(picture(2)), "what is it")
    sample = [client.chat.completions.create(model=checkpoint.name, messages=messages, temperature=1.5, seed=seed,
                                             max_tokens=12).choices[0].message.content for seed in (7, 7, 8, 9)]
    assert sample[0] == sample[1] and len(set(sample)) > 1
    messages = user_message(data_url(picture(2)), "it?")
    turns = messages + [{"role": "assistant", "content": "a bar"}, {"role": "user", "content": "and?"}]
    reply = client.chat.completions.create(model=checkpoint.name, messages=turns, temperature=0, max_tokens=8)
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert reply.usage.prompt_tokens > client.chat.completions.create(
        model=checkpoint.name, messages=messages, temperature=0, max_tokens=8).usage.prompt_tokens


def test_sixteen_clients_get_the_answers_each_request_gets_alone(checkpoint, client, server):
    requests = [(data_url(picture(i % 8)), ["", "what is it", "describe"][i % 3], 4 + i % 13) for i in range(64)]

    def ask(request):
        url, prompt, max_tokens = request
        reply = client.chat.completions.create(model=checkpoint.name, messages=user_message(url, prompt or None),
                                               temperature=0, max_tokens=max_tokens)
        return reply.choices[0].message.content, reply.choices[0].finish_reason

    alone = [ask(request) for request in requests]
    with ThreadPoolExecutor(16) as pool:
        together = list(pool.map(ask, requests))
    assert together == alone
    assert server[1].metrics.peak_batch_size >= 4  # they really shared batches
    wait_for(lambda: server[1].metrics.batch_size == 0 and server[1].metrics.queue_length == 0)


def test_models_health_and_metrics(checkpoint, client, server):
    assert [model.id for model in client.models.list()] == [checkpoint.name]
    assert http(f"{server[0]}/health")[2] == b'{"status":"ok"}'
    text = http(f"{server[0]}/metrics")[2].decode()
    for name in ("moevlm_requests_total", "moevlm_queue_length", "moevlm_batch_size", "moevlm_tokens_per_second",
                 "moevlm_time_to_first_token_seconds_count", "moevlm_completion_tokens_total",
                 'moevlm_expert_tokens_total{layer="0",kind="text",expert="0"}'):
        assert name in text
    counted = sum(float(line.split()[-1]) for line in text.splitlines()
                  if line.startswith("moevlm_expert_tokens_total"))
    assert counted > 0


def load_benchmark():
    spec = importlib.util.spec_from_file_location("serve_load", BENCHMARKS / "serve_load.py")
    serve_load = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(serve_load)
    return serve_load


def test_the_load_benchmark_runs_against_a_live_server(checkpoint, server, capsys):
    result = load_benchmark().main(["--url", server[0], "--model-name", checkpoint.name, "--clients", "1,3",
                                    "--requests", "2", "--max-tokens", "8"])
    [run] = result["runs"]
    assert [(r["clients"], r["requests"], r["errors"]) for r in run["http"]["runs"]] == [(1, 2, 0), (3, 6, 0)]
    assert all(r["tokens_per_s"] > 0 and r["ttft_p50_s"] <= r["latency_p95_s"] for r in run["http"]["runs"])
    assert "engine" not in run and "ttft p50" in capsys.readouterr().out


def test_the_load_benchmark_sends_the_same_requests_to_the_engine_in_process(checkpoint, server):
    serve_load = load_benchmark()
    body = serve_load.request_body(checkpoint.name, serve_load.picture_url(), 8)
    engine = serve_load.EngineSide(checkpoint, checkpoint.name, body, max_batch=16)
    try:
        alone = [engine.measure(clients, 2) for clients in (1, 3)]
    finally:
        engine.close()
    served = [serve_load.HttpSide(server[0], body).measure(clients, 2) for clients in (1, 3)]
    assert [(r["clients"], r["requests"], r["errors"]) for r in alone] == [(1, 2, 0), (3, 6, 0)]
    # the same greedy answers: as many tokens on both sides
    assert [r["tokens"] for r in alone] == [r["tokens"] for r in served]


def test_the_serving_goal_is_80_percent_of_the_engine_and_4x_one_client():
    """Judged on the unrounded figures: 3.996x one client is not 4x, though it prints as 4.00x."""
    verdict = load_benchmark().verdict

    def side(last, first=200.0, errors=0, first_clients=1):
        return {"runs": [{"clients": first_clients, "tokens_per_s": first, "gain": 1.0, "errors": 0},
                         {"clients": 16, "tokens_per_s": last, "gain": round(last / first, 2), "errors": errors}]}

    assert verdict(side(800), side(1000)) == {"clients": 16, "share": 0.8, "gain": 4.0, "errors": 0,
                                              "one_client": True, "met": True}
    assert not verdict(side(799.6), side(1000))["met"]  # 79.96 %
    assert not verdict(side(800, first=200.2), side(1000))["met"]  # 3.996x
    assert not verdict(side(900, errors=1), side(1000))["met"]
    judged = verdict(side(900, first_clients=4), side(1000))
    assert not judged["met"] and not judged["one_client"]  # 4.5x four clients says nothing of one
