import io

import pytest
from PIL import Image


def encode_image(color=(255, 0, 0), size=(8, 8), mode="RGB", fmt="PNG") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, format=fmt)
    return buf.getvalue()


@pytest.fixture
def image_bytes():
    """A function making encoded image bytes of one solid colour."""
    return encode_image
