"""Request parameters: every refusal names its `param` and `code`; the harmless defaults clients
always send are accepted; n, logprobs / top_logprobs, penalties, logit_bias, min_tokens and
ignore_eos do what OpenAI's (and vLLM's) definitions say, through the official openai client."""

import json

import openai
import pytest
from serve_helpers import data_url, http, live_server, picture, user_message

from moevlm.serve.chat import parse_request
from moevlm.serve.errors import ApiError

U, V = "unsupported_parameter", "invalid_value"
# request changes -> (param, code, words of the message)
REFUSED = {
    "tools": ({"tools": []}, "tools", U, "unsupported parameter: tools"),
    "functions": ({"functions": [{"name": "f"}]}, "functions", U, "functions"),
    "function_call": ({"function_call": "auto"}, "function_call", U, "function_call"),
    "audio": ({"audio": {"voice": "alloy"}}, "audio", U, "audio"),
    "modalities": ({"modalities": ["text"]}, "modalities", U, "modalities"),
    "prediction": ({"prediction": {"type": "content", "content": "x"}}, "prediction", U, "prediction"),
    "reasoning_effort": ({"reasoning_effort": "low"}, "reasoning_effort", U, "reasoning_effort"),
    "json_object": ({"response_format": {"type": "json_object"}}, "response_format", U, "no JSON output"),
    "json_schema": ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format",
                    U, "no JSON output"),
    "tool_choice auto": ({"tool_choice": "auto"}, "tool_choice", U, '(only "none")'),
    "store true": ({"store": True}, "store", U, "(only false)"),
    "parallel_tool_calls 1": ({"parallel_tool_calls": 1}, "parallel_tool_calls", U, "(only true or false)"),
    "stream_options alone": ({"stream_options": {"include_usage": True}}, "stream_options", V,
                             "only allowed when stream is true"),
    "stream_options key": ({"stream": True, "stream_options": {"x": 1}}, "stream_options.x", U, "stream_options.x"),
    "moevlm key": ({"moevlm": {"x": 1}}, "moevlm.x", U, "moevlm.x"),
    "routing with n 2": ({"n": 2, "moevlm": {"routing": True}}, "moevlm.routing", U, "with n above 1"),
    "seed 2**32": ({"seed": 2**32}, "seed", V, "seed must be an integer from 0 to 4294967295"),
    "seed -1": ({"seed": -1}, "seed", V, "seed must be an integer from 0"),
    "temperature hot": ({"temperature": "hot"}, "temperature", V, "temperature must be a number from 0 to 2"),
    "temperature 3": ({"temperature": 3}, "temperature", V, "temperature must be"),
    "top_p 1.5": ({"top_p": 1.5}, "top_p", V, "top_p must be a number from 0 to 1"),
    "n 0": ({"n": 0}, "n", V, "n must be an integer from 1 to 16"),
    "n 17": ({"n": 17}, "n", V, "n must be"),
    "logprobs yes": ({"logprobs": "yes"}, "logprobs", V, "logprobs must be true or false"),
    "top_logprobs alone": ({"top_logprobs": 2}, "top_logprobs", V, "top_logprobs needs logprobs: true"),
    "top_logprobs 21": ({"logprobs": True, "top_logprobs": 21}, "top_logprobs", V, "from 0 to 20"),
    "presence_penalty 3": ({"presence_penalty": 3}, "presence_penalty", V, "from -2 to 2"),
    "frequency_penalty -2.5": ({"frequency_penalty": -2.5}, "frequency_penalty", V, "from -2 to 2"),
    "logit_bias key": ({"logit_bias": {"x": 1}}, "logit_bias", V, "expected a token id and a bias from -100 to 100"),
    "logit_bias 101": ({"logit_bias": {"5": 101}}, "logit_bias", V, "a bias from -100 to 100"),
    "logit_bias list": ({"logit_bias": [1]}, "logit_bias", V, "an object of at most 300 token ids"),
    "min_tokens -1": ({"min_tokens": -1}, "min_tokens", V, "min_tokens must be an integer"),
    "ignore_eos no": ({"ignore_eos": "no"}, "ignore_eos", V, "ignore_eos must be true or false"),
    "metadata numbers": ({"metadata": {"a": 1}}, "metadata", V, "metadata must be an object of strings"),
    "user number": ({"user": 5}, "user", V, "user must be a string"),
    "max_tokens 0": ({"max_tokens": 0}, "max_tokens", V, "max_tokens must be an integer from 1"),
    "stop empty": ({"stop": [""]}, "stop", V, "stop must be a non-empty string"),
    "stream yes": ({"stream": "yes"}, "stream", V, "stream must be true or false"),
    "no messages": ({"messages": []}, "messages", V, "messages must be a non-empty list"),
    "no model": ({"model": None}, "model", V, "model is required"),
    "ends with assistant": ({"messages": user_message("data:,", "a") + [{"role": "assistant", "content": "b"}]},
                            "messages", V, "the last message must be a user message"),
    "placeholder in text": ({"messages": [{"role": "user", "content": "look: <image>"}]}, "messages", V,
                            "may not contain <image>"),
}


def request(served: str, **changes) -> dict:
    body = {"model": served, "messages": user_message(data_url(picture(0))), "max_tokens": 8, "temperature": 0}
    body.update(changes)
    return body


@pytest.mark.parametrize("case", REFUSED)
def test_every_refusal_names_its_param_and_code(case):
    changes, param, code, words = REFUSED[case]
    with pytest.raises(ApiError) as refused:
        parse_request(request("m", **changes), "m")
    error = refused.value.body()["error"]
    assert (refused.value.status, error["param"], error["code"], error["type"]) == (400, param, code,
                                                                                    "invalid_request_error")
    assert words in error["message"] and "\n" not in error["message"]


def test_null_is_a_parameter_not_given():
    nulls = {key: None for key in ("logprobs", "top_logprobs", "tools", "tool_choice", "response_format", "user",
                                   "metadata", "stream", "stream_options", "seed", "n", "ignore_eos", "logit_bias")}
    assert parse_request(request("m", **nulls), "m") == parse_request(request("m"), "m")


def test_an_unknown_model_and_a_body_that_is_no_object():
    with pytest.raises(ApiError) as refused:
        parse_request(request("other"), "m")
    assert (refused.value.status, refused.value.param, refused.value.code) == (404, "model", "model_not_found")
    with pytest.raises(ApiError) as refused:
        parse_request([1], "m")
    assert (refused.value.status, refused.value.param, refused.value.code) == (400, None, "invalid_value")


HARMLESS = {"logprobs": False, "presence_penalty": 0, "frequency_penalty": 0, "response_format": {"type": "text"},
            "store": False, "tool_choice": "none", "metadata": {"who": "test"}, "parallel_tool_calls": True,
            "user": "someone", "seed": 2**32 - 1}


@pytest.fixture(scope="module")
def server(checkpoint):
    with live_server(checkpoint, max_batch=16, max_queue=8) as running:
        yield running


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=f"{server[0]}/v1", api_key="unused", max_retries=0)


def ask(client, model, picture_number=0, prompt="what is it", **options):
    return client.chat.completions.create(model=model, messages=user_message(data_url(picture(picture_number)), prompt),
                                          **{"temperature": 0, "max_tokens": 8, **options})


def test_the_harmless_defaults_clients_send_change_nothing(client, checkpoint):
    plain = ask(client, checkpoint.name)
    with_defaults = ask(client, checkpoint.name, **HARMLESS)
    assert with_defaults.choices[0].message.content == plain.choices[0].message.content
    assert with_defaults.choices[0].logprobs is None


@pytest.mark.parametrize("changes, param, words", [
    ({"logit_bias": {"100000": 5}}, "logit_bias", "token id 100000 is outside this model's vocabulary of"),
    ({"min_tokens": 9}, "min_tokens", "min_tokens 9 is above the 8 tokens this request may generate"),
    ({"n": 9}, "n", "n 9 is above the 8 requests this server queues"),
    ({"max_tokens": 10_000}, "max_tokens", "max_tokens 10000 is above this model's limit of"),
])
def test_refusals_that_need_the_model_name_their_param(server, checkpoint, changes, param, words):
    body = json.dumps(request(checkpoint.name, **changes)).encode()
    status, _, reply = http(f"{server[0]}/v1/chat/completions", body)
    error = json.loads(reply)["error"]
    assert (status, error["param"], error["code"]) == (400, param, "invalid_value")
    assert words in error["message"]


def test_n_choices_each_follow_their_own_seed_plain_and_streamed(client, checkpoint):
    options = dict(temperature=1.5, max_tokens=10)
    several = ask(client, checkpoint.name, n=3, seed=40, **options)
    alone = [ask(client, checkpoint.name, seed=40 + index, **options).choices[0].message.content for index in range(3)]
    assert [choice.index for choice in several.choices] == [0, 1, 2]
    assert [choice.message.content for choice in several.choices] == alone and len(set(alone)) > 1
    usage = several.usage
    assert usage.prompt_tokens == ask(client, checkpoint.name, seed=40, **options).usage.prompt_tokens
    assert usage.completion_tokens == sum(ask(client, checkpoint.name, seed=40 + i, **options).usage.completion_tokens
                                          for i in range(3))
    chunks = list(ask(client, checkpoint.name, n=3, seed=40, stream=True, stream_options={"include_usage": True},
                      **options))
    texts, finishes = ["", "", ""], [None] * 3
    for chunk in chunks[:-1]:
        (choice,) = chunk.choices
        texts[choice.index] += choice.delta.content or ""
        finishes[choice.index] = choice.finish_reason or finishes[choice.index]
    assert texts == alone and finishes == [choice.finish_reason for choice in several.choices]
    assert chunks[-1].choices == [] and chunks[-1].usage == usage


def test_logprobs_are_openais_shape_and_the_greedy_token_is_the_likeliest(client, checkpoint):
    reply = ask(client, checkpoint.name, logprobs=True, top_logprobs=3)
    content = reply.choices[0].logprobs.content
    assert "".join(entry.token for entry in content) == reply.choices[0].message.content
    assert len(content) == reply.usage.completion_tokens - (reply.choices[0].finish_reason == "stop")
    for entry in content:
        assert entry.bytes == list(entry.token.encode()) and entry.logprob <= 0
        values = [top.logprob for top in entry.top_logprobs]
        assert len(values) == 3 and values == sorted(values, reverse=True)
        assert entry.top_logprobs[0].token == entry.token and entry.top_logprobs[0].logprob == entry.logprob
    streamed = [c for c in ask(client, checkpoint.name, logprobs=True, top_logprobs=3, stream=True) if c.choices]
    entries = [entry for chunk in streamed if chunk.choices[0].logprobs for entry in chunk.choices[0].logprobs.content]
    assert [e.model_dump() for e in entries] == [e.model_dump() for e in content]
    alone = ask(client, checkpoint.name, logprobs=True)
    assert alone.choices[0].logprobs.content[0].top_logprobs == []


def test_logit_bias_ignore_eos_and_min_tokens(client, checkpoint, server):
    tokenizer = server[1].tokenizer
    (r,) = tokenizer.encode("r")
    forced = ask(client, checkpoint.name, logit_bias={str(r): 100}, max_tokens=5)
    assert forced.choices[0].message.content == "rrrrr"
    short = dict(picture_number=1, prompt=None, max_tokens=16)
    banned = ask(client, checkpoint.name, **short)
    first = banned.choices[0].message.content[0]
    (first_id,) = tokenizer.encode(first)
    assert ask(client, checkpoint.name, logit_bias={str(first_id): -100}, **short).choices[0].message.content[:1] \
        != first
    assert banned.choices[0].finish_reason == "stop" and banned.usage.completion_tokens < 10
    longer = ask(client, checkpoint.name, extra_body={"min_tokens": 10}, **short)
    assert longer.usage.completion_tokens >= 10
    endless = ask(client, checkpoint.name, extra_body={"ignore_eos": True}, **short)
    assert (endless.choices[0].finish_reason, endless.usage.completion_tokens) == ("length", 16)


def test_penalties_change_a_greedy_answer_that_repeats_itself(client, checkpoint):
    plain = ask(client, checkpoint.name, max_tokens=16).choices[0].message.content
    assert any(plain.count(char) > 1 for char in plain)
    penalized = ask(client, checkpoint.name, max_tokens=16, frequency_penalty=2, presence_penalty=2)
    assert penalized.choices[0].message.content != plain
    assert ask(client, checkpoint.name, max_tokens=16, frequency_penalty=0,
               presence_penalty=0).choices[0].message.content == plain
