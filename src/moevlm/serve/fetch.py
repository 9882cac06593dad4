"""Image bytes a request names by ``file:`` or ``http(s):`` URL, fetched only where the server allows it.

``file:`` URLs resolve under one folder (``--allowed-local-media-path``): no escape through ``..`` or
symlinks, regular files only (never a FIFO, a device or /proc's descriptors). ``http(s):`` URLs
(``--allow-http-images``) are read with one deadline for the whole fetch, the byte limit while
reading, and redirects only to the same scheme. At most ``max_fetches`` run at once; one more is
refused at once (429) rather than waiting, so hanging fetches hold few worker threads and never
starve requests with ``data:`` URLs. Error messages name neither the server's files nor its ports.
"""

from __future__ import annotations

import http.client
import os
import socket
import stat
import threading
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

from moevlm.serve.errors import ApiError

MAX_REDIRECTS = 3
CHUNK = 64 * 1024


@dataclass(frozen=True)
class FetchPolicy:
    allow_http: bool = False
    local_media: Path | None = None  # resolved folder that file: URLs may name files under
    timeout: float = 10.0  # seconds for a whole http(s) fetch, connecting and redirects included
    max_fetches: int = 8  # http(s) fetches at once


class Fetcher:
    """Reads file: and http(s): URLs under a ``FetchPolicy``; safe to share between threads."""

    def __init__(self, policy: FetchPolicy):
        self.policy = policy
        self._slots = threading.BoundedSemaphore(policy.max_fetches)

    def read(self, url: str, max_bytes: int) -> bytes:
        scheme = urllib.parse.urlsplit(url).scheme.lower()
        if scheme == "file":
            return self._read_file(url, max_bytes)
        if not self.policy.allow_http:
            raise ApiError(400, f"image_url: {scheme}: URLs are refused by this server (send the image as a base64 "
                                "data: URL, or start the server with --allow-http-images)", "messages",
                           "image_url_refused")
        if not self._slots.acquire(blocking=False):
            raise ApiError(429, f"image_url: {self.policy.max_fetches} image fetches are running already; retry "
                                "later", "messages", "too_many_fetches")
        try:
            return self._read_http(url, max_bytes)
        finally:
            self._slots.release()

    def _read_file(self, url: str, max_bytes: int) -> bytes:
        root = self.policy.local_media
        if root is None:
            raise ApiError(400, "image_url: file: URLs are refused by this server (send the image as a base64 "
                                "data: URL, or start the server with --allowed-local-media-path DIR)", "messages",
                           "image_url_refused")
        parts = urllib.parse.urlsplit(url)
        unreadable = ApiError(400, "image_url: no readable image file at that path under the server's media "
                                   "folder", "messages", "image_unreadable")
        if parts.netloc not in ("", "localhost"):
            raise unreadable
        try:
            path = Path(urllib.parse.unquote(parts.path)).resolve(strict=True)
        except (OSError, RuntimeError, ValueError):
            raise unreadable from None
        if not path.is_relative_to(root):
            raise unreadable
        try:
            # O_NONBLOCK: opening a FIFO must not wait for a writer; O_NOFOLLOW: the resolved path
            # may not have become a symlink since.
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0))
        except (OSError, ValueError):
            raise unreadable from None
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            os.close(fd)
            raise unreadable
        with os.fdopen(fd, "rb") as file:
            if info.st_size > max_bytes:
                raise _too_large(max_bytes)
            try:
                data = file.read(max_bytes + 1)
            except OSError:
                raise unreadable from None
        if len(data) > max_bytes:
            raise _too_large(max_bytes)
        return data

    def _read_http(self, url: str, max_bytes: int) -> bytes:
        deadline = time.monotonic() + self.policy.timeout
        failed = ApiError(400, f"image_url: the image could not be fetched (within {self.policy.timeout:g} s, "
                               "answering 200)", "messages", "image_fetch_failed")
        scheme = urllib.parse.urlsplit(url).scheme.lower()
        for _ in range(MAX_REDIRECTS + 1):
            parts = urllib.parse.urlsplit(url)
            if parts.scheme.lower() != scheme or not parts.hostname:
                raise ApiError(400, "image_url: a redirect to another scheme is refused", "messages",
                               "image_fetch_failed")
            try:
                port = parts.port
                kind = http.client.HTTPSConnection if scheme == "https" else http.client.HTTPConnection
                connection = kind(parts.hostname, port, timeout=_left(deadline))
            except ValueError:
                raise failed from None
            # The socket's timeout bounds each read; the watchdog bounds the whole fetch, also against
            # a server that drips its headers a byte at a time.
            watchdog = threading.Timer(max(deadline - time.monotonic(), 0), _cut, (connection,))
            watchdog.start()
            response = None
            try:
                target = urllib.parse.urlunsplit(("", "", parts.path or "/", parts.query, ""))
                connection.request("GET", target, headers={"User-Agent": "moevlm", "Accept": "image/*"})
                response = connection.getresponse()
                if response.status in (301, 302, 303, 307, 308) and response.getheader("Location"):
                    url = urllib.parse.urljoin(url, response.getheader("Location"))
                    continue
                if response.status != 200:
                    raise failed
                declared = response.getheader("Content-Length", "")
                if declared.isdigit() and int(declared) > max_bytes:
                    raise _too_large(max_bytes)
                return _read_body(response, deadline, max_bytes)
            except (OSError, http.client.HTTPException, ValueError):
                raise failed from None
            finally:
                watchdog.cancel()
                if response is not None:
                    response.close()
                connection.close()
        raise failed


def _cut(connection) -> None:
    sock = connection.sock
    if sock is not None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def _left(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError
    return left


def _read_body(response, deadline: float, max_bytes: int) -> bytes:
    """The body, read in chunks under one deadline: a server that drips bytes is cut off on time."""
    chunks, size = [], 0
    while True:
        _left(deadline)
        chunk = response.read1(CHUNK)
        if not chunk:
            _left(deadline)  # an end that the watchdog made is no end of the image
            return b"".join(chunks)
        size += len(chunk)
        if size > max_bytes:
            raise _too_large(max_bytes)
        chunks.append(chunk)


def _too_large(max_bytes: int) -> ApiError:
    return ApiError(413, f"image_url: the image is over {max_bytes} bytes", "messages", "image_too_large")
