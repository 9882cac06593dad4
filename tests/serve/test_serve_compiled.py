"""The compiled server (serve/slots.py): the same answers as the eager engine while requests join and
leave mid-batch, routing traces from the eager lane, `--no-compile`, and the one-line fallback."""

import logging
import math
import threading

import pytest
from serve_helpers import picture, user_message
from torch._dynamo.utils import counters

from moevlm import compiled
from moevlm.serve.chat import parse_request, request_prompt
from moevlm.serve.engine import Engine, Job
from moevlm.serve.sampling import SamplingParams


def start(checkpoint, max_batch=4, **options) -> Engine:
    engine = Engine(checkpoint, device="cpu", max_batch=max_batch, max_queue=64, **options)
    engine.start()
    assert engine.ready.wait(600) and engine.failed is None
    return engine


@pytest.fixture(scope="module")
def engines(checkpoint):
    pair = start(checkpoint, compile=True), start(checkpoint)
    yield pair
    for engine in pair:
        engine.stop(30)


def run(engine, waves, text=None, **job_options) -> list[tuple]:
    """Each wave's jobs submitted together, on the engine's thread, as the previous wave's first job
    finishes (the rest still decoding), and admitted at once: (text, finish, per-token details) of
    every job, in order."""
    results, done, batches = [], [], []
    for wave in waves:
        jobs = []
        for number, max_tokens in wave:
            events: list[tuple] = []
            results.append(events)
            done.append(threading.Event())

            def emit(event, events=events, done=done[-1], first=not jobs, wave=len(batches)):
                events.append(event)
                if event[0] != "delta":
                    done.set()
                    if first and wave + 1 < len(batches):
                        engine.submit_all(batches[wave + 1])

            body = {"model": "m", "messages": user_message("unused", text)}
            prompt = request_prompt(parse_request(body, "m"), engine.tokenizer,
                                    engine.config.model.decoder.max_text_len, 1)
            options = {"sampling": SamplingParams(temperature=0), **job_options}
            jobs.append(Job(prompt_ids=prompt, max_tokens=max_tokens, emit=emit,
                            pixels=engine.prepare_image(picture(number)), **options))
        batches.append(jobs)
    engine._join_delay = lambda running, free: 0.0 if engine._waiting else math.inf
    engine.submit_all(batches[0])
    assert all(event.wait(120) for event in done)
    return [("".join(e[1] for e in got if e[0] == "delta"), got[-1][1],
             [detail for e in got if e[0] == "delta" for detail in e[2]]) for got in results]


# (picture, max_tokens): each wave joins when the one before's first row leaves, at most 4 rows running.
WAVES = [[(1, 3), (2, 12), (3, 7)], [(4, 2), (5, 10)], [(6, 9)]]


def test_greedy_answers_equal_the_eager_engines_as_rows_join_and_leave(engines):
    compiled_engine, eager_engine = engines
    graphs = counters["stats"]["unique_graphs"]
    got, expected = run(compiled_engine, WAVES), run(eager_engine, WAVES)
    assert counters["stats"]["unique_graphs"] == graphs  # every bucket was compiled at start
    assert [answer[:2] for answer in got] == [answer[:2] for answer in expected]
    assert len({text for text, _, _ in got}) > 3  # different answers: rows did not take each other's
    slots = compiled_engine.lanes[1].slots
    assert slots.decoder.eager_reason is None
    assert sorted(slots.decoder.compile_seconds) == [(size, slots.length) for size in (1, 2, 4)]


def test_routing_traces_and_logprobs_come_from_the_eager_lane_and_the_step(engines):
    compiled_engine, eager_engine = engines
    waves = [[(1, 6), (2, 9), (3, 7)], [(4, 4)]]
    routed = run(compiled_engine, waves, routing=True)
    assert routed == run(eager_engine, waves, routing=True)
    assert all(detail["experts"] for _, _, details in routed for detail in details)
    logprobs = SamplingParams(temperature=0, logprobs=True, top_logprobs=2)
    got = run(compiled_engine, waves, sampling=logprobs)
    expected = run(eager_engine, waves, sampling=logprobs)
    assert [answer[:2] for answer in got] == [answer[:2] for answer in expected]
    for (_, _, ours), (_, _, theirs) in zip(got, expected):
        assert [d["logprob"] for d in ours] == pytest.approx([d["logprob"] for d in theirs], abs=1e-4)


def test_no_compile_serves_eagerly(monkeypatch, tmp_path):
    from moevlm import cli
    from moevlm.serve import server

    seen = {}
    monkeypatch.setattr(server, "serve", lambda model_dir, **options: seen.update(options))
    monkeypatch.setattr(cli, "_checkpoint_folder", lambda args: tmp_path)
    cli.main(["serve", "--model", str(tmp_path)])
    assert seen["compile"] is True
    cli.main(["serve", "--model", str(tmp_path), "--no-compile"])
    assert seen["compile"] is False


def test_without_a_compiler_it_says_so_in_one_line_and_serves_eagerly(checkpoint, engines, monkeypatch, capsys,
                                                                       caplog):
    def refused(step, device, layers):
        raise RuntimeError("no C++ compiler\nsecond line")

    monkeypatch.setattr(compiled, "_compile", refused)
    with caplog.at_level(logging.INFO, logger="moevlm.serve"):
        engine = start(checkpoint, compile=True)
    try:
        assert capsys.readouterr().err == ("moevlm: compiled decoding unavailable (RuntimeError: no C++ compiler); "
                                           "decoding eagerly\n")
        length = engine.lanes[1].slots.length
        assert [r.getMessage().split(" in ")[0] for r in caplog.records if "decoding step" in r.getMessage()] == [
            f"decoding step eagerly (not compiled) for batch sizes 1,2,4 at cache length {length}"]
        waves = [[(1, 5), (2, 8)], [(3, 6)]]
        assert run(engine, waves) == run(engines[1], waves)
    finally:
        engine.stop(30)


def test_a_pretrained_lm_answers_as_its_eager_engine(pretrained_parts, tmp_path):
    """transformers' static cache: its layers' write position follows the table's packing."""
    from moevlm.cli import main
    from shapes import write_shapes_csv

    data = write_shapes_csv(tmp_path / "shapes.csv")
    assert main(["train", "--data", str(data), "--preset", "tiny", "--out", str(tmp_path / "run"), "--no-tracking",
                 "--set", f"model.vision=hf:{pretrained_parts['clip']}",
                 "--set", f"model.lm=hf:{pretrained_parts['llama']}", "--set", "moe.layers=all",
                 "--set", "train.max_steps=1", "--set", "train.batch_size=4", "--set", "decoder.max_text_len=48"]) == 0
    pair = start(tmp_path / "run", max_batch=2, compile=True), start(tmp_path / "run", max_batch=2)  # 2 graphs
    try:
        got, expected = (run(engine, WAVES, text="what is it") for engine in pair)
        assert got == expected and len({text for text, _, _ in got}) > 1
        assert pair[0].lanes[1].slots.decoder.eager_reason is None
    finally:
        for engine in pair:
            engine.stop(30)
