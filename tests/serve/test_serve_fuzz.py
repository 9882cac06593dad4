"""Schemathesis fuzzes the server on 127.0.0.1 from its own OpenAPI schema (/openapi.json): valid and
invalid bodies, paths and headers for every operation. No answer is a 5xx, and every error has
OpenAI's shape. Bounded: a fixed number of examples per operation, derandomized.

(Driven through Hypothesis directly: schemathesis' pytest fixture loader does not work with pytest 9.)"""

import json

import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from serve_helpers import data_url, live_server, picture

from moevlm.serve.schema import ErrorResponse

EXAMPLES = {"POST /v1/chat/completions": 150}  # per generation mode; 40 for the other operations


STATUSES = []
IMAGE = data_url(picture(0))


def with_a_real_conversation(body) -> None:
    """One user message with a decodable picture, so that the other fields are fuzzed past the
    conversation's checks (which a generated conversation seldom passes)."""
    if isinstance(body, dict) and "messages" in body:
        body["messages"] = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": IMAGE}},
                                                         {"type": "text", "text": "what is it"}]}]


def check(case) -> None:
    if len(STATUSES) % 2:  # every other case: the other half fuzzes the conversation too
        with_a_real_conversation(case.body)
    response = case.call(timeout=60)
    STATUSES.append(response.status_code)
    where = f"{case.method} {case.formatted_path}: {response.status_code} {response.text[:300]}"
    assert response.status_code < 500, where
    if response.status_code >= 400:
        assert response.headers["content-type"][0].startswith("application/json"), where
        ErrorResponse.model_validate(json.loads(response.text))


def test_no_server_error_and_every_error_is_openai_shaped(checkpoint):
    with live_server(checkpoint, max_batch=4, request_timeout=30) as (url, _):
        schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
        operations = [result.ok() for result in schema.get_all_operations()]
        assert {f"{op.method.upper()} {op.path}" for op in operations} >= {
            "POST /v1/chat/completions", "GET /v1/models", "GET /v1/models/{model_id}", "GET /metrics"}
        unsatisfiable = []
        for operation in operations:
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
                cases = operation.as_strategy(generation_mode=mode)
                examples = EXAMPLES.get(f"{operation.method.upper()} {operation.path}", 40)
                run = settings(max_examples=examples, deadline=None, derandomize=True, database=None,
                               suppress_health_check=list(HealthCheck))(given(case=cases)(check))
                try:
                    run()
                except Unsatisfiable:  # an operation without parameters has no invalid input
                    assert mode is GenerationMode.NEGATIVE
                    unsatisfiable.append(f"{operation.method.upper()} {operation.path}")
        assert "POST /v1/chat/completions" not in unsatisfiable
    assert 200 in STATUSES and 400 in STATUSES  # the fuzzer got through to the model, and was refused
