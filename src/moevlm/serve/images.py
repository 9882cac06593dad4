"""Images of a chat request: ``data:`` URLs always; ``file:`` and ``http(s):`` URLs only where the server
allows them (serve/fetch.py). Memory is bounded by pixels, not bytes: the size is read from the header
(without Pillow's own decompression-bomb cut-off, so the message says what the header says) and an
image over the pixel limit is refused before decoding; ``max_decodes`` threads decode (and prepare)
every image, so at most that many are in memory at once."""

from __future__ import annotations

import base64
import binascii
import io
import re
import threading
import urllib.parse
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, TypeVar

from PIL import Image

from moevlm.data.images import open_image_bytes
from moevlm.serve.errors import ApiError
from moevlm.serve.fetch import Fetcher, FetchPolicy

# 4096 x 4096: a hundred times the pixels the models look at (224-384 px squares), and above a
# 12-megapixel phone photo; decoded as RGB it takes 50 MB.
DEFAULT_MAX_PIXELS = 4096 * 4096
WHITESPACE = re.compile(r"\s+")
T = TypeVar("T")


@dataclass(frozen=True)
class ImageLimits:
    max_bytes: int = 10 * 2**20
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_decodes: int = 2  # images decoded at once, server-wide
    fetch: FetchPolicy = field(default_factory=FetchPolicy)


class ImageLoader:
    """``load(url)``: the upright RGB image an ``image_url`` names, or ApiError. Shared by all requests."""

    def __init__(self, limits: ImageLimits):
        self.limits = limits
        self.fetcher = Fetcher(limits.fetch)
        # Decoding on a few threads of its own, not on each request's: every thread that decodes a large
        # image keeps its own malloc arena of freed memory, so decoding on 40 request threads two at a
        # time would still hold 40 arenas' worth.
        self._decoders = ThreadPoolExecutor(max_workers=limits.max_decodes, thread_name_prefix="moevlm-decode")
        self._here = threading.local()  # .decoding: this thread is one of the decoding threads

    def load(self, url: str, prepare: Callable[[Image.Image], T] | None = None) -> Image.Image | T:
        """``prepare`` (e.g. the model's resize) runs on the decoding thread too, so that a large decoded
        image is dropped before another takes its place."""
        data = self.image_bytes(url)
        width, height = header_size(data)
        if width * height > self.limits.max_pixels:
            raise ApiError(413, f"image_url: the image has {width}x{height} pixels, over the limit of "
                                f"{self.limits.max_pixels}", "messages", "image_too_large")
        if getattr(self._here, "decoding", False):
            return _decode(data, prepare)
        return self._decoders.submit(_decode, data, prepare).result()

    @staticmethod
    def needs_fetching(urls: list) -> bool:
        """Whether some of ``urls`` is not a data: URL (so reading it may wait on a file or the network)."""
        return not all(isinstance(url, str) and url[:5].lower() == "data:" for url in urls)

    def submit(self, work: Callable[..., T], *args) -> Future:
        """Runs ``work(*args)`` on a decoding thread, where ``load`` decodes without another trip. For a
        request with nothing to fetch, one trip off the event loop instead of two (each is a turn of the
        GIL); one that fetches must not hold a decoding thread while it waits."""
        return self._decoders.submit(self._decoding, work, *args)

    def _decoding(self, work: Callable[..., T], *args) -> T:
        self._here.decoding = True
        try:
            return work(*args)
        finally:
            self._here.decoding = False

    def image_bytes(self, url: str) -> bytes:
        if not isinstance(url, str):
            raise ApiError(400, "image_url: the url must be a string", "messages", "invalid_image_url")
        scheme = urllib.parse.urlsplit(url).scheme.lower()
        if scheme == "data":
            data = data_url_bytes(url)
        elif scheme in ("http", "https", "file"):
            data = self.fetcher.read(url, self.limits.max_bytes)
        else:
            raise ApiError(400, "image_url: expected a base64 data: URL", "messages", "invalid_image_url")
        if len(data) > self.limits.max_bytes:
            raise ApiError(413, f"image_url: the image is over {self.limits.max_bytes} bytes", "messages",
                           "image_too_large")
        if not data:
            raise ApiError(400, "image_url: no image bytes", "messages", "invalid_image")
        return data


def _decode(data: bytes, prepare):
    try:
        image = open_image_bytes(data)
    except (ValueError, OSError) as err:
        raise ApiError(400, f"image_url: {err}", "messages", "invalid_image") from None
    return image if prepare is None else prepare(image)


def data_url_bytes(url: str) -> bytes:
    """The bytes of a base64 ``data:`` URL: standard or URL-safe alphabet, line breaks and missing
    padding allowed (what MIME encoders and JavaScript's base64url write)."""
    header, sep, payload = url.partition(",")
    if not sep or not header.lower().endswith(";base64"):
        raise ApiError(400, "image_url: a data: URL must be base64 (data:image/png;base64,...)", "messages",
                       "invalid_image_url")
    payload = WHITESPACE.sub("", urllib.parse.unquote(payload) if "%" in payload else payload)
    payload += "=" * (-len(payload) % 4)
    try:
        if "-" in payload or "_" in payload:
            return base64.b64decode(payload, altchars=b"-_", validate=True)
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, "image_url: the data: URL is not valid base64", "messages", "invalid_image_url") from None


def header_size(data: bytes) -> tuple[int, int]:
    """(width, height) as the image's header says, read the way ``Image.open`` reads it but without
    its decompression-bomb cut-off (which would hide the size); ApiError for data Pillow cannot read."""
    Image.init()
    prefix = data[:16]
    for name in Image.ID:
        factory, accept = Image.OPEN[name]
        try:
            accepted = not accept or accept(prefix)
            if accepted and not isinstance(accepted, str):
                return factory(io.BytesIO(data), "").size
        except Exception:  # noqa: BLE001 (a plugin that does not recognise the data raises anything)
            continue
    raise ApiError(400, "image_url: not an image Pillow can read", "messages", "invalid_image")
