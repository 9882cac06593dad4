"""How a request handler waits for its jobs' events: also for the client to leave, the request's deadline
(``--request-timeout``) and the server's shutdown past ``--grace``, whichever comes first.

Events cross from the engine thread to the event loop through one ``Handoff`` per server: a decoding
step emits one event per running request, and each ``call_soon_threadsafe`` wakes the loop through a
pipe (a system call, and a turn of the GIL each way). So the first event of a batch schedules one
delivery and the events emitted before the loop runs it ride along with it: one wake-up of the loop
per step, not one per token per request. A handler reads every event that has arrived at once.
"""

from __future__ import annotations

import asyncio
import collections
import threading
import time

GONE, TIMEOUT, CLOSING = ("gone",), ("timeout",), ("closing",)


async def client_gone(receive) -> None:
    """Returns once the client has disconnected (``receive``: the request's ASGI receive). Call after
    the body was read: from then on the ASGI server's receive() only ever says ``http.disconnect``."""
    while (await receive())["type"] != "http.disconnect":
        pass


class Closing:
    """Set by the server once ``--grace`` has run out: every inbox waiting then, or made later, ends with CLOSING."""

    def __init__(self):
        self._set = False
        self._inboxes: set[Inbox] = set()

    def is_set(self) -> bool:
        return self._set

    def set(self) -> None:
        self._set = True
        for inbox in list(self._inboxes):
            inbox.end(CLOSING)


class Inbox:
    """One request's events (``(choice index, event)``), put by the ``Handoff`` on the event loop.
    ``deadline`` is a ``time.perf_counter`` time. Call ``close`` when the request is over."""

    def __init__(self, deadline: float, closing: Closing):
        self._loop = asyncio.get_running_loop()
        self._events: collections.deque[tuple] = collections.deque()
        self._waiter: asyncio.Future | None = None
        self._ended: tuple | None = None
        self._closing = closing
        self._timer = self._loop.call_later(max(deadline - time.perf_counter(), 0), self.end, TIMEOUT)
        closing._inboxes.add(self)
        if closing.is_set():
            self.end(CLOSING)

    def put(self, item: tuple) -> None:
        self._events.append(item)
        self._wake()

    def end(self, why: tuple) -> None:
        """The wait ends with ``why`` (TIMEOUT, CLOSING, GONE) once no event is left to read."""
        if self._ended is None:
            self._ended = why
            self._wake()

    def watch(self, gone: asyncio.Future) -> None:
        """``gone`` finishing (the client left) ends the wait with GONE."""
        gone.add_done_callback(lambda future: None if future.cancelled() else self.end(GONE))

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def next(self) -> list[tuple] | tuple:
        """Every event that has arrived (a list, oldest first), waiting for one if none has; or, once
        none is left, GONE, TIMEOUT or CLOSING."""
        while not self._events and self._ended is None:
            self._waiter = self._loop.create_future()
            await self._waiter
        if self._events:
            events = list(self._events)
            self._events.clear()
            return events
        return self._ended

    def close(self) -> None:
        self._timer.cancel()
        self._closing._inboxes.discard(self)


class Handoff:
    """The engine thread's way to the inboxes: ``emitter(inbox, index)`` is a job's ``emit``."""

    def __init__(self):
        self._lock = threading.Lock()
        self._pending: list[tuple[Inbox, tuple]] = []
        self._loop: asyncio.AbstractEventLoop | None = None

    def emitter(self, inbox: Inbox, index: int):
        self._loop = inbox._loop  # one server, one loop
        return lambda event: self._post(inbox, (index, event))

    def _post(self, inbox: Inbox, item: tuple) -> None:
        with self._lock:
            self._pending.append((inbox, item))
            if len(self._pending) > 1:
                return  # a delivery is scheduled already and will take this one too
        self._loop.call_soon_threadsafe(self._deliver)

    def _deliver(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, []
        for inbox, item in pending:
            inbox.put(item)
