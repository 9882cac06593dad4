"""Small examples of each data format, built on the fly: COCO captions, a mixed LLaVA file,
a `datasets` Dataset (saved to disk, to Parquet, to Arrow), an image folder."""

import io
import json

from PIL import Image

COLORS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (40, 60, 220), "white": (250, 250, 250)}


def png(color, size=8) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), COLORS.get(color, color)).save(buf, format="PNG")
    return buf.getvalue()


def write_coco(folder, captions_per_image=3, split="train2017"):
    """annotations/captions_<split>.json + <split>/*.png: one image per colour, several captions each."""
    (folder / split).mkdir(parents=True)
    (folder / "annotations").mkdir()
    images, annotations = [], []
    for image_id, color in enumerate(COLORS, start=1):
        name = f"{image_id:012d}.png"
        (folder / split / name).write_bytes(png(color))
        images.append({"id": image_id, "file_name": name, "width": 8, "height": 8})
        for k in range(captions_per_image):
            annotations.append({"id": len(annotations) + 1, "image_id": image_id,
                                "caption": ["a", "one", "the"][k % 3] + f" {color} square"})
    path = folder / "annotations" / f"captions_{split}.json"
    path.write_text(json.dumps({"info": {}, "images": images, "annotations": annotations}))
    return path


def write_mixed_llava(folder, rows=8):
    """LLaVA-style JSON where every other row is a text-only conversation (no image key)."""
    items = []
    for i in range(rows):
        color = list(COLORS)[i % 4]
        if i % 2:
            items.append({"id": f"t{i}", "conversations": [
                {"from": "human", "value": f"what is {i} plus one?"}, {"from": "gpt", "value": f"{i + 1}"}]})
        else:
            name = f"img{i}.png"
            (folder / name).write_bytes(png(color))
            items.append({"id": f"i{i}", "image": name, "conversations": [
                {"from": "human", "value": "<image>\nwhat colour?"}, {"from": "gpt", "value": color}]})
    path = folder / "mixed.json"
    path.write_text(json.dumps(items))
    return path


def write_llava_with_repeats(folder):
    """30 LLaVA rows: 11 with an image (rows 1-11), 10 text-only (12-21), then rows 12-20 again (22-30)."""
    folder.mkdir(parents=True, exist_ok=True)
    items = []
    for i in range(11):
        color = list(COLORS)[i % 4]
        (folder / f"img{i}.png").write_bytes(png(color))
        items.append({"image": f"img{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nwhat colour?"}, {"from": "gpt", "value": color}]})
    for i in range(10):
        items.append({"conversations": [{"from": "human", "value": f"what is {i} plus one?"},
                                        {"from": "gpt", "value": f"{i + 1}"}]})
    items += items[11:20]
    path = folder / "repeats.json"
    path.write_text(json.dumps(items))
    return path


def hf_dataset(rows=8, text="caption"):
    """A datasets.Dataset with an Image() column and a caption (or ShareGPT conversations) column."""
    import datasets

    colors = [list(COLORS)[i % 4] for i in range(rows)]
    features = {"image": datasets.Image()}
    if text == "caption":
        columns = {"caption": [f"a {c} square" for c in colors]}
        features["caption"] = datasets.Value("string")
    else:
        columns = {"conversations": [[{"from": "human", "value": "<image>\ncolour?"}, {"from": "gpt", "value": c}]
                                     for c in colors]}
        features["conversations"] = [{"from": datasets.Value("string"), "value": datasets.Value("string")}]
    columns["image"] = [{"bytes": png(c), "path": None} for c in colors]
    return datasets.Dataset.from_dict(columns, features=datasets.Features(features))


def write_image_folder(folder, rows=8):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(rows):
        color = list(COLORS)[i % 4]
        (folder / f"{i:03d}.png").write_bytes(png(color))
        (folder / f"{i:03d}.txt").write_text(f"a {color} square\n")
    return folder
