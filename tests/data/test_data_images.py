import base64
import io
import struct
import urllib.parse
import zlib

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from hostile import huge_png
from moevlm.data import images as images_module
from moevlm.data.images import check_image, image_key, image_to_tensor, normalize, open_image


def save(img: Image.Image, fmt="PNG", **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def two_pixels(mode, first, second):
    img = Image.new(mode, (2, 1))
    img.putpixel((0, 0), first)
    img.putpixel((1, 0), second)
    return img


def palette_image(transparent: bool) -> Image.Image:
    img = Image.new("P", (2, 1))
    img.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    img.putpixel((0, 0), 0)
    img.putpixel((1, 0), 1)
    if transparent:
        img.info["transparency"] = 1
    return img


@pytest.mark.parametrize("name,img,fmt,expected", [
    ("L", two_pixels("L", 100, 0), "PNG", [(100, 100, 100), (0, 0, 0)]),
    ("LA", two_pixels("LA", (0, 0), (0, 255)), "PNG", [(255, 255, 255), (0, 0, 0)]),
    ("P", palette_image(False), "PNG", [(255, 0, 0), (0, 0, 255)]),
    ("P transparent", palette_image(True), "PNG", [(255, 0, 0), (255, 255, 255)]),
    ("RGBA", two_pixels("RGBA", (255, 0, 0, 0), (0, 0, 255, 255)), "PNG", [(255, 255, 255), (0, 0, 255)]),
    ("CMYK", two_pixels("CMYK", (0, 255, 255, 0), (0, 0, 0, 255)), "TIFF", [(255, 0, 0), (0, 0, 0)]),
    # Pillow's own I;16 -> RGB clips to 255; a mid grey must stay mid grey.
    ("I;16", two_pixels("I;16", 65535, 32896), "PNG", [(255, 255, 255), (128, 128, 128)]),
])
def test_pillow_modes_become_rgb(name, img, fmt, expected):
    data = save(img, fmt)
    assert Image.open(io.BytesIO(data)).mode == img.mode  # the file really holds that mode
    decoded = open_image(b64(data))
    assert decoded.mode == "RGB"
    assert [decoded.getpixel((x, 0)) for x in range(2)] == expected


def test_exif_orientation_is_applied(tmp_path):
    # Stored 20 wide, 10 high: left half red, right half blue. Orientation 6 means "rotate
    # 90 degrees clockwise to display", which puts the red half on top.
    img = Image.new("RGB", (20, 10), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 10, 10))
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "rotated.jpg"
    path.write_bytes(save(img, "JPEG", exif=exif, quality=95))
    decoded = open_image(str(path))
    assert decoded.size == (10, 20)
    top, bottom = decoded.getpixel((5, 2)), decoded.getpixel((5, 17))
    assert top[0] > 200 and top[2] < 60
    assert bottom[2] > 200 and bottom[0] < 60


def test_data_urls_paths_and_jpeg_base64(tmp_path, image_bytes):
    png = image_bytes((0, 255, 0))
    assert open_image("data:image/png;base64," + b64(png)).getpixel((0, 0)) == (0, 255, 0)
    assert open_image("data:image/png," + urllib.parse.quote_from_bytes(png)).getpixel((0, 0)) == (0, 255, 0)
    jpeg = b64(image_bytes((0, 0, 0), fmt="JPEG"))
    assert jpeg.startswith("/9j/")  # reads like an absolute path, must still be base64
    assert open_image(jpeg).size == (8, 8)
    (tmp_path / "x.png").write_bytes(png)
    assert open_image(str(tmp_path / "x.png")).getpixel((0, 0)) == (0, 255, 0)


def test_undecodable_inputs_raise_value_error_with_a_reason(tmp_path, image_bytes):
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "cut.png").write_bytes(image_bytes(size=(64, 64))[:60])
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    (tmp_path / "cut2.png").write_bytes(save(Image.fromarray(noise))[:-200])
    cases = {
        str(tmp_path / "empty.png"): "empty file",
        str(tmp_path / "cut.png"): "cannot decode image: ",
        str(tmp_path / "cut2.png"): "truncated",
        str(tmp_path / "missing.png"): "cannot read",
        "Zm9v" * 20 + "!": "cannot decode image: ",  # a base64 look-alike, not an image
        b64(b"this is not an image at all, only some text " * 3): "not in an image format Pillow can read",
        "data:image/png;base64,@@@": "not valid base64",
    }
    for ref, reason in cases.items():
        with pytest.raises(ValueError) as info:
            open_image(ref)
        assert str(info.value).startswith("cannot decode image: "), ref
        assert reason in str(info.value), (ref, str(info.value))
        assert "\n" not in str(info.value)


def dds_of_an_unknown_pixel_format() -> bytes:
    data = bytearray(save(Image.new("RGBA", (4, 4)), "DDS"))
    data[80:84] = struct.pack("<I", 130)  # the pixel format flags: a combination Pillow does not know
    return bytes(data)


def test_what_pillow_raises_for_corrupt_bytes_is_a_bad_image(monkeypatch, image_bytes):
    with pytest.raises(ValueError, match="^cannot decode image: Unknown pixel format flags 130$"):
        open_image(b64(dds_of_an_unknown_pixel_format()))  # Pillow raises NotImplementedError
    png = b64(image_bytes())
    # Seen when Pillow reads garbled files of some format: header fields of the wrong type
    # (TypeError, struct.error, AttributeError), short reads, bad compressed streams.
    for error in (SyntaxError("broken PNG file"), TypeError("bad tag"), struct.error("unpack requires 4 bytes"),
                  AttributeError("no attribute 'tile'"), IndexError("index out of range"), KeyError(37),
                  EOFError(), zlib.error("invalid distance"), ZeroDivisionError("division by zero")):
        def fail(self, error=error):
            raise error
        monkeypatch.setattr(ImageFile.ImageFile, "load", fail)
        with pytest.raises(ValueError, match="^cannot decode image: ") as info:
            open_image(png)
        assert "\n" not in str(info.value)


def test_running_out_of_memory_is_not_a_bad_image(monkeypatch, image_bytes):
    def out_of_memory(self):
        raise MemoryError

    monkeypatch.setattr(ImageFile.ImageFile, "load", out_of_memory)
    with pytest.raises(MemoryError):
        open_image(b64(image_bytes()))


def test_a_file_that_is_there_but_cannot_be_read_is_not_a_bad_image(monkeypatch, tmp_path, image_bytes):
    (tmp_path / "locked.png").write_bytes(image_bytes())

    def locked(path, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(images_module, "open", locked, raising=False)  # root reads any file, whatever its mode
    for read in (open_image, check_image):
        with pytest.raises(PermissionError):
            read(str(tmp_path / "locked.png"))
    # A missing file (or a folder, or a name too long for one) is the data's mistake: a bad row.
    monkeypatch.undo()
    (tmp_path / "folder.png").mkdir()
    for ref, reason in ((tmp_path / "gone.png", "No such file or directory"),
                        (tmp_path / "folder.png", "Is a directory"),
                        (tmp_path / ("x" * 300 + ".png"), "File name too long")):
        with pytest.raises(ValueError, match=f"^cannot decode image: cannot read {ref}: {reason}$"):
            open_image(str(ref))


def test_image_key_names_the_picture_not_the_spelling(tmp_path, image_bytes):
    red, blue = image_bytes((255, 0, 0)), image_bytes((0, 0, 255))
    (tmp_path / "red.png").write_bytes(red)
    (tmp_path / "link.png").symlink_to(tmp_path / "red.png")
    assert image_key(str(tmp_path / "link.png")) == image_key(str(tmp_path / "red.png")) == str(tmp_path / "red.png")
    inline = {image_key(b64(red)), image_key("data:image/png;base64," + b64(red)),
              image_key("data:image/png," + urllib.parse.quote_from_bytes(red)), image_key(b64(red).rstrip("=") + "\n")}
    assert len(inline) == 1 and inline != {image_key(b64(blue))}
    assert image_key("data:image/png;base64,@@@") == "data:image/png;base64,@@@"  # a bad row, kept apart


@pytest.mark.parametrize("side", [12, 20])  # 144 px: Pillow only warns; 400 px: Pillow raises
def test_decompression_bomb_is_refused(monkeypatch, image_bytes, side):
    data = image_bytes(size=(side, side))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(ValueError, match="cannot decode image: more than 100 pixels"):
        open_image(b64(data))


@pytest.mark.parametrize("side", [12_000, 20_000])  # 144 M pixels: Pillow only warns; 400 M: Pillow raises
def test_huge_images_and_bombs_are_refused_before_decoding(tmp_path, side):
    path = tmp_path / "huge.png"
    path.write_bytes(huge_png(side, side))  # under 50 kB on disk, up to 400 MB once decoded
    with pytest.raises(ValueError, match=f"^cannot decode image: more than {Image.MAX_IMAGE_PIXELS} pixels"):
        open_image(str(path))


def test_image_to_tensor_resizes_to_uint8_square():
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    img.paste((0, 0, 255), (20, 0, 40, 20))
    tensor = image_to_tensor(img, 8)
    assert tensor.shape == (3, 8, 8) and tensor.dtype == torch.uint8
    assert tensor[:, 4, 0].tolist() == [255, 0, 0] and tensor[:, 4, 7].tolist() == [0, 0, 255]
    grey = image_to_tensor(Image.new("RGB", (8, 8), (255, 255, 255)), 4, channels=1)
    assert grey.shape == (1, 4, 4) and grey.unique().tolist() == [255]


def test_normalize_maps_uint8_to_minus_one_one():
    x = torch.tensor([0, 255, 128], dtype=torch.uint8).view(1, 3, 1, 1)
    y = normalize(x)
    assert y.dtype == torch.float32
    assert y.flatten().tolist() == pytest.approx([-1.0, 1.0, 128 / 127.5 - 1], abs=1e-6)


def noise_image(width=30, height=20) -> Image.Image:
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8))


def test_scratch_preparer_is_the_plain_resize(tmp_path):
    from moevlm.config import ModelConfig, VisionConfig
    from moevlm.data.images import image_preparer

    prepare = image_preparer(ModelConfig(vision=VisionConfig(image_size=8, patch_size=4, channels=1)))
    img = noise_image()
    assert torch.equal(prepare(img), image_to_tensor(img, 8, 1))
    assert prepare.save(tmp_path) == [] and list(tmp_path.iterdir()) == []


def test_pretrained_preparer_uses_the_processor_for_resize_and_crop_only(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import transformers

    from moevlm.config import ModelConfig, VisionConfig
    from moevlm.data.images import image_preparer
    from moevlm.errors import MoevlmError

    processor = transformers.CLIPImageProcessorPil(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
    processor.save_pretrained(str(tmp_path / "clip"))
    cfg = ModelConfig(vision=VisionConfig(pretrained=str(tmp_path / "clip"), image_size=16, patch_size=8))
    prepare = image_preparer(cfg)
    img = noise_image()
    pixels = prepare(img)
    assert pixels.dtype == torch.uint8 and pixels.shape == (3, 16, 16)
    # What the processor gives on the 0..255 scale, before its rescale and mean/std.
    full = processor(images=img, return_tensors="np")["pixel_values"][0]
    mean = np.array(processor.image_mean)[:, None, None]
    std = np.array(processor.image_std)[:, None, None]
    assert np.abs((full * std + mean) * 255 - pixels.numpy()).max() < 0.51
    assert prepare.save(tmp_path / "ckpt") == ["preprocessor_config.json"]
    # A checkpoint's own copy wins over the source; no copy and no source: one line that says so.
    moved = ModelConfig(vision=VisionConfig(pretrained=str(tmp_path / "gone"), image_size=16, patch_size=8))
    assert torch.equal(image_preparer(moved, tmp_path / "ckpt")(img), pixels)
    with pytest.raises(MoevlmError, match="gone: cannot load the image processor") as info:
        image_preparer(moved, tmp_path / "elsewhere")
    assert "\n" not in str(info.value)
    wrong = ModelConfig(vision=VisionConfig(pretrained=str(tmp_path / "clip"), image_size=32, patch_size=8))
    with pytest.raises(MoevlmError, match=r"shape \(3, 16, 16\), not \(3, 32, 32\)"):
        image_preparer(wrong)(img)
