"""One request never hurts another: sampling is finite for every accepted parameter (a temperature
below the floor is greedy, top_p 0 keeps the top token), and a request whose own sampling still
fails ends alone with an OpenAI-shaped error while the rest of its batch goes on."""

import threading
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import torch
from serve_helpers import data_url, live_server, picture, user_message

from moevlm.generate import sample_next
from moevlm.serve import engine as engine_module
from moevlm.serve.chat import parse_request, request_prompt
from moevlm.serve.engine import Engine, Job
from moevlm.serve.sampling import SamplingParams, adjusted, logprob_details

TINY = [1e-40, 5e-324, 1e-6]  # passed the 0-2 check, overflowed the softmax, failed the batch


@pytest.mark.parametrize("temperature", TINY)
def test_a_temperature_below_the_floor_is_greedy(temperature):
    logits = torch.randn(4, 50) * 30
    assert torch.equal(sample_next(logits, temperature, generator=torch.Generator().manual_seed(0)),
                       logits.argmax(-1))


def test_a_small_temperature_above_the_floor_with_huge_logits_samples_a_top_token():
    logits = torch.tensor([[3e4, 3e4, -3e4, 0.0]] * 3)
    for seed in range(20):
        token = sample_next(logits, 1e-5, generator=torch.Generator().manual_seed(seed))
        assert set(token.tolist()) <= {0, 1}


def test_top_p_zero_keeps_only_the_top_token_and_not_every_token():
    logits = torch.log(torch.tensor([[0.4, 0.35, 0.25], [0.1, 0.2, 0.7]]))
    draws = {tuple(sample_next(logits, 2.0, top_p=0.0, generator=torch.Generator().manual_seed(s)).tolist())
             for s in range(100)}
    assert draws == {(0, 2)}


def test_penalties_bias_and_the_eos_ban_follow_their_definitions():
    logits = torch.zeros(6)
    params = SamplingParams(presence_penalty=0.5, frequency_penalty=0.25, logit_bias={4: -100.0, 1: 2.0})
    out = adjusted(logits, params, generated=[3, 3, 3, 1], eos_id=2)
    # logit[j] - count[j] * frequency - (count[j] > 0) * presence, plus the bias
    assert out.tolist() == [0.0, 2.0 - 0.25 - 0.5, 0.0, -0.75 - 0.5, -100.0, 0.0]
    assert adjusted(logits, SamplingParams(min_tokens=3), [5, 5], eos_id=2)[2] == float("-inf")
    assert adjusted(logits, SamplingParams(min_tokens=2), [5, 5], eos_id=2)[2] == 0
    assert adjusted(logits, SamplingParams(ignore_eos=True), [5] * 9, eos_id=2)[2] == float("-inf")
    assert logits.tolist() == [0.0] * 6  # the model's logits are left alone


def test_logprob_details_are_the_raw_distribution():
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0])
    chosen, top = logprob_details(logits, 1, 2)
    expected = logits.log_softmax(-1)
    assert chosen == pytest.approx(float(expected[1]))
    assert [token for token, _ in top] == [0, 1] and top[0][1] == pytest.approx(float(expected[0]))


@pytest.fixture(scope="module")
def engine(checkpoint):
    engine = Engine(checkpoint, device="cpu", max_batch=16, max_queue=64)
    engine.start()
    assert engine.ready.wait(60) and engine.failed is None
    yield engine
    engine.stop(30)


def jobs_for(engine, model_name, requests) -> tuple[list[Job], list[list[tuple]], threading.Semaphore]:
    """One job per (request body, picture number), as the server makes them, each recording its events."""
    events, ended = [[] for _ in requests], threading.Semaphore(0)
    jobs = []
    for index, (body, number) in enumerate(requests):
        req = parse_request(body, model_name)
        ids = request_prompt(req, engine.tokenizer, engine.config.model.decoder.max_text_len, 1)

        def emit(event, index=index):
            events[index].append(event)
            if event[0] != "delta":
                ended.release()

        jobs.append(Job(prompt_ids=ids, pixels=engine.prepare_image(picture(number)), max_tokens=req.max_tokens,
                        emit=emit, sampling=SamplingParams(temperature=req.temperature), seed=req.seed))
    return jobs, events, ended


def answers(engine, model_name, requests, together: bool) -> list:
    """(text, finish) of each request, or its error message; all submitted at once or one by one."""
    jobs, events, ended = jobs_for(engine, model_name, requests)
    for group in ([jobs] if together else [[job] for job in jobs]):
        engine.submit_all(group)
        for _ in group:
            assert ended.acquire(timeout=60)
    out = []
    for got in events:
        if got[-1][0] == "error":
            out.append(("error", got[-1][1]))
        else:
            out.append(("".join(event[1] for event in got if event[0] == "delta"), got[-1][1]))
    return out


def greedy_requests(model_name, count=12) -> list[tuple[dict, int]]:
    return [({"model": model_name, "messages": user_message("unused", ["", "what is it"][i % 2] or None),
              "temperature": 0, "max_tokens": 6 + i % 5}, i) for i in range(count)]


def test_twelve_greedy_requests_and_one_at_temperature_1e_40_all_answer_in_one_batch(engine, checkpoint):
    requests = greedy_requests(checkpoint.name)
    alone = answers(engine, checkpoint.name, requests, together=False)
    tiny = ({**requests[0][0], "temperature": 1e-40}, 0)
    together = answers(engine, checkpoint.name, requests + [tiny], together=True)
    assert together[:12] == alone
    assert together[12] == alone[0]  # greedy, as its temperature is below the floor
    assert engine.metrics.peak_batch_size >= 13
    assert engine._prefill_seconds > 0  # measured: it bounds how long joiners wait for each other
    assert engine._ended  # the rows that left lately, whose clients joiners wait for


def test_a_request_whose_sampling_fails_ends_alone_and_the_batch_goes_on(engine, checkpoint, monkeypatch):
    requests = greedy_requests(checkpoint.name)
    alone = answers(engine, checkpoint.name, requests, together=False)
    real_pick = engine_module.pick

    def failing_pick(logits, params, generated, eos_id, generator):
        if params.temperature == 1.25:  # the marked request
            raise RuntimeError("probability tensor contains either inf, nan or element < 0")
        return real_pick(logits, params, generated, eos_id, generator)

    monkeypatch.setattr(engine_module, "pick", failing_pick)
    marked = ({**requests[0][0], "temperature": 1.25, "seed": 3}, 0)
    together = answers(engine, checkpoint.name, requests[:6] + [marked] + requests[6:], together=True)
    assert together[6] == ("error", "internal error while sampling this request")
    assert together[:6] + together[7:] == alone


def test_through_http_one_failing_request_gets_its_error_and_twelve_others_their_answers(checkpoint, monkeypatch):
    real_pick = engine_module.pick

    def failing_pick(logits, params, generated, eos_id, generator):
        if params.temperature == 1.25:
            raise RuntimeError("probability tensor contains either inf, nan or element < 0")
        return real_pick(logits, params, generated, eos_id, generator)

    with live_server(checkpoint, max_batch=16) as (url, engine):
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)

        def ask(index, temperature=0.0, stream=False):
            options = dict(model=checkpoint.name, messages=user_message(data_url(picture(index % 8)), "what is it"),
                           temperature=temperature, max_tokens=8, seed=1)
            if not stream:
                return client.chat.completions.create(**options).choices[0].message.content
            chunks = list(client.chat.completions.create(**options, stream=True))
            return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)

        alone = [ask(index) for index in range(12)]
        with ThreadPoolExecutor(13) as pool:
            together = list(pool.map(ask, range(12)))
            tiny = pool.submit(ask, 0, 1e-40)
            assert together == alone and tiny.result() == alone[0]
        monkeypatch.setattr(engine_module, "pick", failing_pick)
        with ThreadPoolExecutor(14) as pool:
            others = [pool.submit(ask, index, 0.0, index % 2 == 1) for index in range(12)]
            with pytest.raises(openai.InternalServerError) as failed:
                ask(0, 1.25)
            assert [other.result() for other in others] == alone
        assert failed.value.status_code == 500
        assert failed.value.body == {"message": "internal error while sampling this request", "type": "server_error",
                                     "param": None, "code": None}
        stream_failure = client.chat.completions.create(
            model=checkpoint.name, messages=user_message(data_url(picture(1))), temperature=1.25, max_tokens=8,
            stream=True)
        with pytest.raises(openai.APIError, match="internal error while sampling this request"):
            list(stream_failure)
