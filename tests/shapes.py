"""Small image-caption data sets written on the fly for tests."""

import base64
import csv
import io

from PIL import Image, ImageDraw

COLORS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30),
          "black": (0, 0, 0), "white": (255, 255, 255)}


def write_shapes_csv(path, rows=12):
    """A seed-format CSV (base64 PNG + caption): coloured squares or bars, captioned by both."""
    names = list(COLORS)
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["b64string_images", "caption"])
        for i in range(rows):
            color, shape = names[i % len(names)], ("square", "bar")[(i // len(names)) % 2]
            image = Image.new("RGB", (24, 24), (128, 128, 128))
            box = (4, 4, 20, 20) if shape == "square" else (2, 9, 22, 15)
            ImageDraw.Draw(image).rectangle(box, fill=COLORS[color])
            buf = io.BytesIO()
            image.save(buf, format="PNG")
            writer.writerow([base64.b64encode(buf.getvalue()).decode(), f"a {color} {shape}"])
    return path


def write_llava_data(folder, rows=12):
    """PNG files plus two LLaVA-style sets over them: ``captions`` (JSONL, image + caption, for
    stage pretrain) and ``conversations`` (JSON, for stage instruct). Returns their paths."""
    import json

    names = list(COLORS)
    captions, conversations = [], []
    for i in range(rows):
        color, shape = names[i % len(names)], ("square", "bar")[(i // len(names)) % 2]
        image = Image.new("RGB", (40, 40), (128, 128, 128))
        box = (6, 6, 34, 34) if shape == "square" else (2, 15, 38, 25)
        ImageDraw.Draw(image).rectangle(box, fill=COLORS[color])
        image.save(folder / f"{i:03d}.png")
        captions.append({"image": f"{i:03d}.png", "caption": f"a {color} {shape}"})
        conversations.append({"image": f"{i:03d}.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat colour is it?"}, {"from": "gpt", "value": color},
            {"from": "human", "value": "And the shape?"}, {"from": "gpt", "value": f"a {shape}"}]})
    (folder / "captions.jsonl").write_text("".join(json.dumps(row) + "\n" for row in captions))
    (folder / "conversations.json").write_text(json.dumps(conversations))
    return {"captions": folder / "captions.jsonl", "conversations": folder / "conversations.json"}


def train_tiny(root, *settings):
    """A `tiny`-preset run trained on ``write_shapes_csv(root / "shapes.csv")`` with the
    ``--set`` ``settings``, untracked: its folder, ``root / "run"``."""
    from moevlm.cli import main

    data = write_shapes_csv(root / "shapes.csv")
    sets = [arg for setting in settings for arg in ("--set", setting)]
    assert main(["train", "--data", str(data), "--preset", "tiny", "--out", str(root / "run"), "--no-tracking",
                 *sets]) == 0
    return root / "run"
