"""Image decoding: a path, base64 string or data: URL in, an RGB image or uint8 tensor out."""

from __future__ import annotations

import base64
import binascii
import io
import os
import re
import urllib.parse
import warnings

import numpy as np
import torch
from PIL import Image, ImageOps

# Base64 of even the smallest real image is longer than this; shorter strings made only
# of base64 letters ("cat", "img/0001") are far more likely to be file names.
_MIN_BASE64_CHARS = 64
_BASE64 = re.compile(r"[A-Za-z0-9+/_\-\s]+=*\s*")


def looks_like_base64(ref: str) -> bool:
    """Whether a reference reads as inline base64 rather than a file name."""
    return len(ref) >= _MIN_BASE64_CHARS and "." not in ref and _BASE64.fullmatch(ref) is not None


def open_image(ref: str) -> Image.Image:
    """Decode a path, base64 string or data: URL into an upright RGB image.

    Raises ValueError("cannot decode image: REASON") for anything unreadable.
    """
    data = _read_bytes(ref)
    if not data:
        raise ValueError("cannot decode image: empty file" if _is_path(ref) else
                         "cannot decode image: no image bytes")
    try:
        # Pillow only warns between MAX_IMAGE_PIXELS and twice that; a data file from
        # elsewhere should not get to allocate gigabytes, so the warning stops it too.
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            img.load()
            img = ImageOps.exif_transpose(img)
        return _to_rgb(img)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ValueError(f"cannot decode image: more than {Image.MAX_IMAGE_PIXELS} pixels "
                         "(a decompression bomb?)") from None
    except Image.UnidentifiedImageError:
        raise ValueError("cannot decode image: not in an image format Pillow can read") from None
    except Exception as err:  # noqa: BLE001
        # Pillow's decoders signal corrupt input with many exception types (OSError,
        # SyntaxError, struct.error, IndexError ...); all of them mean "bad image data".
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ValueError(f"cannot decode image: {reason}") from None


def image_to_tensor(img: Image.Image, size: int, channels: int = 3) -> torch.Tensor:
    """Resize (bicubic, antialiased when shrinking) to a uint8 (channels, size, size) tensor."""
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, not {channels}")
    img = img.convert("L" if channels == 1 else "RGB")
    if img.size != (size, size):
        img = img.resize((size, size), Image.Resampling.BICUBIC)
    array = np.asarray(img, dtype=np.uint8).reshape(size, size, channels)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


def normalize(images_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 (..., C, H, W) in [0, 255] -> float32 in [-1, 1]."""
    assert images_uint8.dtype == torch.uint8, images_uint8.dtype
    return images_uint8.float().div_(127.5).sub_(1.0)


def _is_path(ref: str) -> bool:
    return not ref.startswith("data:") and not (looks_like_base64(ref) and not os.path.isfile(ref))


def _read_bytes(ref: str) -> bytes:
    if ref.startswith("data:"):
        header, sep, payload = ref.partition(",")
        if not sep:
            raise ValueError("cannot decode image: data: URL without a comma")
        if header.endswith(";base64"):
            return _b64decode(payload)
        return urllib.parse.unquote_to_bytes(payload)
    if _is_path(ref):
        try:
            with open(ref, "rb") as f:
                return f.read()
        except OSError as err:
            raise ValueError(f"cannot decode image: cannot read {ref}: {err.strerror or err}") from None
    return _b64decode(ref)


def _b64decode(text: str) -> bytes:
    compact = "".join(text.split()).replace("-", "+").replace("_", "/")  # url-safe too
    compact += "=" * (-len(compact) % 4)  # padding is often dropped
    try:
        return base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError) as err:
        raise ValueError(f"cannot decode image: not valid base64 ({err})") from None


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode.startswith("I") or img.mode == "F":
        grey = _deep_to_8bit(np.asarray(img), sixteen_bit=img.mode.startswith("I;16"))
        return Image.fromarray(grey, "L").convert("RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        # Transparent areas become white, as a viewer would show them on a page.
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def _deep_to_8bit(values: np.ndarray, sixteen_bit: bool) -> np.ndarray:
    """Deep grey levels -> 0..255 by scaling: Pillow's own convert clips them at 255."""
    values = values.astype(np.float64)
    top = values.max(initial=0.0)
    if sixteen_bit or 255 < top <= 65535:
        values = values * (255.0 / 65535.0)
    elif top > 65535:
        values = values * (255.0 / top)
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)
