"""The engine -> event loop handoff (one wake-up of the loop per batch of events, every event delivered
in order), a handler's wait (all arrived events at once; timeout, shutdown and a client leaving), and
the engine's admission of joining requests (together, not one prefill each)."""

import asyncio
import json
import math
import socket
import threading
import time

import pytest
from serve_helpers import data_url, live_server, picture, user_message

from moevlm.serve.engine import Engine, Job
from moevlm.serve.images import ImageLimits, ImageLoader
from moevlm.serve.waiting import CLOSING, GONE, TIMEOUT, Closing, Handoff, Inbox


def test_one_wake_up_of_the_loop_carries_every_event_posted_before_it_in_order():
    async def scenario():
        loop = asyncio.get_running_loop()
        wake_ups = []
        real = loop.call_soon_threadsafe
        loop.call_soon_threadsafe = lambda *args: (wake_ups.append(args), real(*args))[1]
        handoff, closing = Handoff(), Closing()
        inboxes = [Inbox(time.perf_counter() + 60, closing) for _ in range(3)]
        emits = [handoff.emitter(inbox, 0) for inbox in inboxes]

        def engine_step(step):  # what a decoding step emits: one event per running request
            for row, emit in enumerate(emits):
                emit(("delta", f"{step}.{row}", []))

        worker = threading.Thread(target=lambda: [engine_step(step) for step in range(5)])
        worker.start()
        worker.join()  # the loop was busy (here: blocked) all along, so one wake-up is scheduled
        assert len(wake_ups) == 1
        got = [await inbox.next() for inbox in inboxes]
        assert got == [[(0, ("delta", f"{step}.{row}", [])) for step in range(5)] for row in range(3)]
        engine_step(5)
        assert len(wake_ups) == 2  # once delivered, the next event wakes the loop again
        assert await inboxes[2].next() == [(0, ("delta", "5.2", []))]
        for inbox in inboxes:
            inbox.close()
        loop.call_soon_threadsafe = real

    asyncio.run(scenario())


def test_a_wait_ends_at_the_deadline_on_closing_and_when_the_client_leaves_after_the_events_left():
    async def scenario():
        closing = Closing()
        late = Inbox(time.perf_counter() + 0.01, closing)
        assert await late.next() is TIMEOUT
        watched = Inbox(time.perf_counter() + 60, closing)
        gone = asyncio.get_running_loop().create_future()
        watched.watch(gone)
        watched.put((0, ("delta", "a", [])))
        gone.set_result(None)
        await asyncio.sleep(0)
        assert await watched.next() == [(0, ("delta", "a", []))]  # what arrived first is read first
        assert await watched.next() is GONE
        waiting = Inbox(time.perf_counter() + 60, closing)
        reader = asyncio.ensure_future(waiting.next())
        await asyncio.sleep(0)
        closing.set()
        assert await reader is CLOSING
        assert await Inbox(time.perf_counter() + 60, closing).next() is CLOSING  # made after closing
        cancelled = Inbox(time.perf_counter() + 60, Closing())
        left = asyncio.get_running_loop().create_future()
        cancelled.watch(left)
        left.cancel()  # the handler cancelling its watcher is not the client leaving
        await asyncio.sleep(0)
        reader = asyncio.ensure_future(cancelled.next())
        await asyncio.sleep(0.01)
        assert not reader.done()
        reader.cancel()
        for inbox in (late, watched, waiting, cancelled):
            inbox.close()

    asyncio.run(scenario())


def waiting_engine(prefill_seconds: float, waiting: int, waited: float) -> Engine:
    """An engine (not started) with ``waiting`` jobs queued ``waited`` seconds ago."""
    engine = Engine("unused", max_batch=8)
    engine._prefill_seconds = prefill_seconds
    engine.submit_all([Job(prompt_ids=[1], pixels=None, max_tokens=1, emit=print) for _ in range(waiting)])
    for job in engine._waiting:
        job.queued -= waited
    return engine


def test_joining_requests_wait_until_they_are_as_many_as_the_running_ones_or_for_three_prefills():
    assert waiting_engine(10.0, 2, 0.0)._take(running=3) == []  # fewer than the running rows, not long
    assert len(waiting_engine(10.0, 3, 0.0)._take(running=3)) == 3  # as many as the running rows
    assert waiting_engine(10.0, 2, 29.0)._take(running=3) == []
    assert len(waiting_engine(10.0, 2, 31.0)._take(running=3)) == 2  # waited three prefills' time
    assert waiting_engine(10.0, 5, 31.0)._take(running=8) == []  # no free row (max_batch 8)
    assert len(waiting_engine(10.0, 6, 0.0)._take(running=5)) == 3  # as many as there are free rows


def test_joiners_also_wait_for_the_rows_that_just_ended_whose_clients_may_come_back():
    assert len(waiting_engine(10.0, 1, 0.0)._take(running=0)) == 1  # nothing ended lately: at once
    engine = waiting_engine(10.0, 2, 1.0)
    engine._ended.append((time.perf_counter() - 5.0, 4))  # four rows ended 5 s ago
    assert engine._join_delay(running=0, free=8) == pytest.approx(29.0, abs=0.5)
    engine._ended[0] = (time.perf_counter() - 5.0, 2)
    assert engine._join_delay(running=0, free=8) == 0  # as many as ended
    assert engine._join_delay(running=1, free=7) == pytest.approx(29.0, abs=0.5)  # fewer than both
    engine._ended[0] = (time.perf_counter() - 31.0, 4)
    assert engine._join_delay(running=0, free=8) == 0  # too long ago, and forgotten
    assert not engine._ended
    assert waiting_engine(10.0, 0, 0.0)._join_delay(running=0, free=8) == math.inf


def test_one_client_after_another_never_waits_for_its_own_earlier_rows():
    engine = waiting_engine(10.0, 0, 0.0)
    for _ in range(3):  # each request ends, and its client's next one comes back at once
        engine._ended.append((time.perf_counter(), 1))
        engine.submit(Job(prompt_ids=[1], pixels=None, max_tokens=1, emit=print))
        assert len(engine._take(running=0)) == 1 and not engine._ended
    engine._ended.append((time.perf_counter(), 3))
    engine.submit_all([Job(prompt_ids=[1], pixels=None, max_tokens=1, emit=print) for _ in range(3)])
    assert len(engine._take(running=0)) == 3 and not engine._ended  # as many as ended: all came back
    engine._ended.append((time.perf_counter(), 4))
    engine._came_back(1)
    assert [rows for _, rows in engine._ended] == [3]


def test_a_request_with_only_data_urls_is_prepared_in_one_trip_to_a_decoding_thread():
    loader = ImageLoader(ImageLimits(max_decodes=1))
    url = data_url(picture(0))
    # with one decoding thread, a second trip from inside it would wait for itself forever
    image = loader.submit(loader.load, url, lambda decoded: decoded.size).result(timeout=10)
    assert image == (24, 24)
    assert loader.load(url).size == (24, 24)  # from elsewhere, through the decoding thread
    assert not loader.needs_fetching([url, "DATA:image/png;base64,AAAA"]) and not loader.needs_fetching([])
    assert loader.needs_fetching([url, "file:///tmp/x.png"]) and loader.needs_fetching([None])


def chunked_frames(port: int, body: dict) -> list[bytes]:
    """The HTTP/1.1 chunks of one streamed response, as the server framed them."""
    payload = json.dumps(body).encode()
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(payload), payload))
        raw = b""
        while chunk := sock.recv(65536):
            raw += chunk
    head, rest = raw.split(b"\r\n\r\n", 1)
    assert b"chunked" in head.lower()
    frames = []
    while True:
        size, rest = rest.split(b"\r\n", 1)
        if int(size, 16) == 0:
            return frames
        frames.append(rest[:int(size, 16)])
        rest = rest[int(size, 16) + 2:]


def test_a_stream_sends_the_role_with_the_first_token_and_the_end_in_one_piece(checkpoint):
    with live_server(checkpoint) as (url, _engine):
        body = {"model": checkpoint.name, "messages": user_message(data_url(picture(1))), "temperature": 0,
                "max_tokens": 6, "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True}
        frames = chunked_frames(int(url.rsplit(":", 1)[1]), body)
    events = [[json.loads(line[6:]) if line != b"data: [DONE]" else "[DONE]"
               for line in frame.split(b"\n\n") if line] for frame in frames]
    assert [chunk["choices"][0]["delta"].get("role") for chunk in events[0]] == ["assistant", None]
    assert events[0][1]["choices"][0]["delta"]["content"]  # the first token rides with the role
    *_, finish, usage, done = events[-1]
    assert finish["choices"][0]["finish_reason"] == "length" and usage["usage"]["completion_tokens"] == 6
    assert done == "[DONE]"
    assert sum(len(frame) for frame in events) == 1 + 6 + 2 + 1  # role, tokens, finish, usage, [DONE]
