"""The engine -> event loop handoff (one wake-up of the loop per batch of events, every event delivered
in order), a handler's wait (all arrived events at once; timeout, shutdown and a client leaving), and
the engine's admission of joining requests (together, not one prefill each)."""

import asyncio
import threading
import time

from serve_helpers import data_url, picture

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
        assert not asyncio.ensure_future(cancelled.next()).done()
        for inbox in (late, watched, waiting, cancelled):
            inbox.close()

    asyncio.run(scenario())


def waiting_engine(prefill_seconds: float, waiting: int, waited: float) -> Engine:
    """An engine (not started) with ``waiting`` jobs queued ``waited`` seconds ago."""
    engine = Engine("unused", max_batch=4)
    engine._prefill_seconds = prefill_seconds
    engine.submit_all([Job(prompt_ids=[1], pixels=None, max_tokens=1, emit=print) for _ in range(waiting)])
    for job in engine._waiting:
        job.queued -= waited
    return engine


def test_joining_requests_wait_to_fill_the_free_rows_or_for_one_prefill_time():
    assert waiting_engine(10.0, 2, 0.0)._take(free=3, idle=False) == []  # fewer than the free rows, not long
    assert len(waiting_engine(10.0, 3, 0.0)._take(free=3, idle=False)) == 3  # they fill the free rows
    assert len(waiting_engine(10.0, 2, 11.0)._take(free=3, idle=False)) == 2  # waited longer than a prefill
    assert len(waiting_engine(10.0, 1, 0.0)._take(free=3, idle=True)) == 1  # an idle engine takes one at once
    assert waiting_engine(10.0, 2, 11.0)._take(free=0, idle=False) == []


def test_a_request_with_only_data_urls_is_prepared_in_one_trip_to_a_decoding_thread():
    loader = ImageLoader(ImageLimits(max_decodes=1))
    url = data_url(picture(0))
    # with one decoding thread, a second trip from inside it would wait for itself forever
    image = loader.submit(loader.load, url, lambda decoded: decoded.size).result(timeout=10)
    assert image == (24, 24)
    assert loader.load(url).size == (24, 24)  # from elsewhere, through the decoding thread
    assert not loader.needs_fetching([url, "DATA:image/png;base64,AAAA"]) and not loader.needs_fetching([])
    assert loader.needs_fetching([url, "file:///tmp/x.png"]) and loader.needs_fetching([None])
