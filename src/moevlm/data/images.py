"""Image decoding: a path, base64 string or data: URL in, an RGB image or uint8 tensor out;
``image_preparer`` picks how a model's images are resized (its own way, or a pretrained
vision tower's image processor)."""

from __future__ import annotations

import base64
import binascii
import errno
import hashlib
import io
import os
import re
import struct
import urllib.parse
import warnings
import zlib
from pathlib import Path
from typing import Protocol, Union

import numpy as np
import torch
from PIL import Image, ImageOps

from moevlm.errors import MoevlmError

# Base64 of even the smallest real image is longer than this; shorter strings made only
# of base64 letters ("cat", "img/0001") are far more likely to be file names.
_MIN_BASE64_CHARS = 64
_BASE64 = re.compile(r"[A-Za-z0-9+/_\-\s]+=*\s*")


# What Pillow raises for bytes it cannot decode, found by feeding it truncated and garbled
# files of every format it writes: OSError (truncated, broken stream, unknown format),
# ValueError, SyntaxError, RuntimeError (NotImplementedError: an unknown compression), and
# TypeError, AttributeError and struct.error from header fields of the wrong kind, plus the
# lookup, EOF, arithmetic and zlib errors its plugins let through. The bytes are in memory by
# then, so none of these is about the disk; MemoryError is not about the data and stops the run.
_BAD_DATA = (OSError, ValueError, SyntaxError, RuntimeError, TypeError, AttributeError, LookupError, EOFError,
             ArithmeticError, struct.error, zlib.error)
# A path that names no readable image file is a bad row; other errors reading one
# (permissions, I/O) are the machine's, and stop the run even with on_bad_row=skip.
_MISSING_FILE = (FileNotFoundError, IsADirectoryError, NotADirectoryError)
_MISSING_ERRNOS = (errno.ENAMETOOLONG, errno.ELOOP)


class StoredImage(Protocol):
    """An image inside a container file (a tar shard, an Arrow table), read only when decoded.

    Implementations are small picklable values (a path and where the bytes are), so they travel
    to DataLoader workers, and hashable, so rows can share one decoded copy."""

    def read_bytes(self) -> bytes:
        """The encoded image; ValueError("cannot decode image: ...") if it is not there."""

    @property
    def key(self) -> str:
        """Which picture this is, for the image-level train/validation split (e.g. "a.tar#0007")."""


# What a data row names its image with: a path, base64 string or data: URL, or a stored image.
ImageRef = Union[str, StoredImage]


def looks_like_base64(ref: str) -> bool:
    """Whether a reference reads as inline base64 rather than a file name."""
    return len(ref) >= _MIN_BASE64_CHARS and "." not in ref and _BASE64.fullmatch(ref) is not None


def open_image(ref: ImageRef) -> Image.Image:
    """Decode a path, base64 string, data: URL or stored image into an upright RGB image.

    Raises ValueError("cannot decode image: REASON") for data that is not a usable image (a
    missing file included), OSError for a file that is there but cannot be read.
    """
    return _open(ref, decode=True)


def image_key(ref: ImageRef) -> str:
    """Which picture a reference names, for keeping it on one side of the train/validation
    split without decoding it: a file's real path (symlinks followed), or for base64 and data:
    URLs a hash of the image bytes, so one picture pasted into several rows counts once. A
    file and the same bytes pasted inline are two pictures here. A stored image: its own key."""
    if not isinstance(ref, str):
        return ref.key
    if _is_path(ref):
        return os.path.realpath(ref)
    try:
        data = _read_bytes(ref)
    except ValueError:  # not even base64: a bad row, found when the dataset decodes it
        return ref
    return "sha256:" + hashlib.sha256(data).hexdigest()


def check_image(ref: ImageRef) -> None:
    """What can be told without decoding the pixels: the bytes are there, in a format Pillow
    reads, with a size under the pixel limit. Raises ValueError as ``open_image`` does."""
    _open(ref, decode=False)


def open_image_bytes(data: bytes) -> Image.Image:
    """Decode image bytes already in memory (a request's upload) as ``open_image`` decodes a reference."""
    return _decode(data, decode=True)


def _open(ref: ImageRef, decode: bool) -> Image.Image | None:
    data = _read_bytes(ref)
    if not data:
        raise ValueError("cannot decode image: empty file" if _is_path(ref) else
                         "cannot decode image: no image bytes")
    return _decode(data, decode)


def _decode(data: bytes, decode: bool) -> Image.Image | None:
    """``decode`` False: check the header only (format, size), return None."""
    try:
        # Pillow only warns between MAX_IMAGE_PIXELS and twice that; a data file from
        # elsewhere should not get to allocate gigabytes, so the warning stops it too.
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))  # reads the header only
            if not decode:
                return None
            img.load()
            img = ImageOps.exif_transpose(img)
        return _to_rgb(img)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ValueError(f"cannot decode image: more than {Image.MAX_IMAGE_PIXELS} pixels "
                         "(a decompression bomb?)") from None
    except Image.UnidentifiedImageError:
        raise ValueError("cannot decode image: not in an image format Pillow can read") from None
    except _BAD_DATA as err:
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


class ScratchImages:
    """A model trained from scratch: bicubic resize to ``(channels, size, size)``."""

    def __init__(self, size: int, channels: int = 3):
        if channels not in (1, 3):  # checked up front, or every image would fail on it
            raise ValueError(f"channels must be 1 or 3, not {channels}")
        self.size, self.channels = size, channels

    def __call__(self, img: Image.Image) -> torch.Tensor:
        return image_to_tensor(img, self.size, self.channels)

    def save(self, folder: str | Path) -> list[str]:
        return []  # everything needed is in the model config


PROCESSOR_FILE = "preprocessor_config.json"


class ProcessorImages:
    """A pretrained vision tower: its own image processor's resize and crop, kept as uint8.

    Rescaling and the tower's mean/std normalisation are left out: the model receives images
    in [-1, 1] like every moevlm model and normalises them itself (models/hf_vision.py), so
    the dataset keeps one compact uint8 copy of each image and augmentation stays the same.
    """

    def __init__(self, processor, size: int):
        self.processor, self.size = processor, size

    def __call__(self, img: Image.Image) -> torch.Tensor:
        pixels = self.processor(images=img.convert("RGB"), do_rescale=False, do_normalize=False,
                                return_tensors="np")["pixel_values"][0]
        pixels = np.asarray(pixels)
        if pixels.dtype != np.uint8:  # some backends give floats, still on the 0..255 scale
            pixels = np.clip(np.rint(pixels), 0, 255).astype(np.uint8)
        if pixels.shape != (3, self.size, self.size):
            raise MoevlmError(f"the image processor gave images of shape {tuple(pixels.shape)}, "
                             f"not (3, {self.size}, {self.size}) as vision.image_size says")
        return torch.from_numpy(pixels.copy())

    def save(self, folder: str | Path) -> list[str]:
        written = self.processor.save_pretrained(str(folder))
        return sorted({Path(path).name for path in written if Path(path).is_file()})


def image_preparer(model_cfg, folder: str | Path | None = None) -> ScratchImages | ProcessorImages:
    """PIL image -> uint8 (C, S, S) as the model expects, with ``save(folder) -> file names``.

    With a pretrained vision tower the image processor comes from ``folder`` when it holds
    one (a checkpoint), else from the tower's source (``vision.pretrained``).
    """
    vision = model_cfg.vision
    if vision.pretrained is None:
        return ScratchImages(vision.image_size, vision.channels)
    # Lazy: transformers takes seconds to import.
    from transformers import AutoImageProcessor  # only for pretrained towers

    source = str(folder) if folder is not None and (Path(folder) / PROCESSOR_FILE).is_file() else vision.pretrained
    try:
        processor = AutoImageProcessor.from_pretrained(source)
    except (OSError, ValueError) as err:
        offline = (" (with HF_HUB_OFFLINE=1 give a local folder or a cached hub id)"
                   if os.environ.get("HF_HUB_OFFLINE") else "")
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise MoevlmError(f"{source}: cannot load the image processor{offline}: {reason}") from None
    return ProcessorImages(processor, vision.image_size)


def normalize(images_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 (..., C, H, W) in [0, 255] -> float32 in [-1, 1]."""
    assert images_uint8.dtype == torch.uint8, images_uint8.dtype
    return images_uint8.float().div_(127.5).sub_(1.0)


def _is_path(ref: ImageRef) -> bool:
    if not isinstance(ref, str) or ref.startswith("data:"):
        return False
    return not (looks_like_base64(ref) and not os.path.isfile(ref))


def _read_bytes(ref: ImageRef) -> bytes:
    if not isinstance(ref, str):
        return ref.read_bytes()
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
            if isinstance(err, _MISSING_FILE) or err.errno in _MISSING_ERRNOS:
                raise ValueError(f"cannot decode image: cannot read {ref}: {err.strerror or err}") from None
            raise
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
