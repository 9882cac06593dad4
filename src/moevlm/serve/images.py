"""Images of a chat request: ``data:`` URLs always; ``http(s):`` and ``file:`` URLs only when the server
allows them, then read with a size and time limit. Bytes and pixels are bounded before decoding, so a
small file that unpacks to gigapixels (a decompression bomb) is refused from its header."""

from __future__ import annotations

import base64
import binascii
import io
import urllib.parse
import urllib.request
import warnings
from dataclasses import dataclass

from PIL import Image

from moevlm.data.images import open_image_bytes
from moevlm.serve.errors import ApiError


@dataclass(frozen=True)
class ImageLimits:
    max_bytes: int = 10 * 2**20
    max_pixels: int = 40_000_000
    allow_urls: bool = False  # http(s): and file: URLs
    fetch_timeout: float = 10.0


def _data_url_bytes(url: str) -> bytes:
    header, sep, payload = url.partition(",")
    if not sep or not header.endswith(";base64"):
        raise ApiError(400, "image_url: a data: URL must be base64 (data:image/png;base64,...)", "messages")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, "image_url: the data: URL is not valid base64", "messages") from None


def _fetch(url: str, limits: ImageLimits) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=limits.fetch_timeout) as response:  # noqa: S310 (opted in)
            data = response.read(limits.max_bytes + 1)
    except (OSError, ValueError) as err:
        raise ApiError(400, f"image_url: cannot fetch {url}: {getattr(err, 'reason', None) or err}",
                       "messages") from None
    return data


def image_bytes(url: str, limits: ImageLimits) -> bytes:
    scheme = urllib.parse.urlsplit(url).scheme.lower()
    if scheme == "data":
        data = _data_url_bytes(url)
    elif scheme in ("http", "https", "file"):
        if not limits.allow_urls:
            raise ApiError(400, f"image_url: {scheme}: URLs are refused by this server (send the image as a "
                                "base64 data: URL, or start it with --allow-http-images)", "messages")
        data = _fetch(url, limits)
    else:
        raise ApiError(400, "image_url: expected a base64 data: URL", "messages")
    if len(data) > limits.max_bytes:
        raise ApiError(413, f"image_url: the image is over {limits.max_bytes} bytes", "messages")
    if not data:
        raise ApiError(400, "image_url: no image bytes", "messages")
    return data


def load_image(url: str, limits: ImageLimits) -> Image.Image:
    """The upright RGB image an ``image_url`` names, or ApiError."""
    data = image_bytes(url, limits)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own bound is below
            width, height = Image.open(io.BytesIO(data)).size  # the header only
    except Image.DecompressionBombError:
        width = height = limits.max_pixels  # over any sane bound
    except Exception:  # noqa: BLE001 (Pillow raises many kinds for data it cannot read)
        raise ApiError(400, "image_url: not an image Pillow can read", "messages") from None
    if width * height > limits.max_pixels:
        raise ApiError(413, f"image_url: the image has {width}x{height} pixels, over the limit of "
                            f"{limits.max_pixels}", "messages")
    try:
        return open_image_bytes(data)
    except (ValueError, OSError) as err:
        raise ApiError(400, f"image_url: {err}", "messages") from None
