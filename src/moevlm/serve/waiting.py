"""How a request handler waits for its job's next event: also for the client to leave, the request's
deadline (``--request-timeout``) and the server's shutdown past ``--grace``, whichever comes first."""

from __future__ import annotations

import asyncio
import time

GONE, TIMEOUT, CLOSING = ("gone",), ("timeout",), ("closing",)


async def client_gone(request) -> None:
    """Returns once the client has disconnected. Call after the body was read: from then on the ASGI
    server's receive() only ever says ``http.disconnect``."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def next_event(events: asyncio.Queue, deadline: float, closing: asyncio.Event,
                     gone: asyncio.Future | None = None) -> tuple:
    """The job's next event, or GONE (``gone`` finished), TIMEOUT (``deadline``, a perf_counter time,
    passed) or CLOSING (``closing`` set)."""
    if not events.empty():
        return events.get_nowait()
    getter = asyncio.ensure_future(events.get())
    closer = asyncio.ensure_future(closing.wait())
    waiting = {getter, closer} | ({gone} if gone is not None else set())
    try:
        done, _ = await asyncio.wait(waiting, timeout=max(deadline - time.perf_counter(), 0),
                                     return_when=asyncio.FIRST_COMPLETED)
    finally:
        closer.cancel()
        if not getter.done():
            getter.cancel()
    if getter in done:
        return getter.result()
    if closer in done:
        return CLOSING
    return GONE if gone is not None and gone in done else TIMEOUT
