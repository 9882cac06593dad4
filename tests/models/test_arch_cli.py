"""decoder.arch=llama + vision.arch=siglip through the command line: train, then caption from the
checkpoint, whose config.json rebuilds the same architecture."""

import json

from PIL import Image

from moevlm.cli import main
from shapes import write_shapes_csv


def test_train_then_caption_a_llama_siglip_model(tmp_path, capsys):
    data = write_shapes_csv(tmp_path / "shapes.csv")
    run = tmp_path / "run"
    settings = ["model.decoder.arch=llama", "model.vision.arch=siglip", "model.vision.image_tokens=patches",
                "model.decoder.kv_heads=1", "train.max_steps=4", "data.val_fraction=0.25"]
    assert main(["train", "--data", str(data), "--preset", "tiny", "--out", str(run), "--no-tracking",
                 *[arg for setting in settings for arg in ("--set", setting)]]) == 0
    saved = json.loads((run / "config.json").read_text())["model"]
    assert (saved["decoder"]["arch"], saved["decoder"]["kv_heads"], saved["vision"]["arch"]) == ("llama", 1, "siglip")
    assert saved["decoder"]["moe"]["activation"] == "swiglu"
    Image.new("RGB", (30, 20), (200, 10, 10)).save(tmp_path / "a.png")
    capsys.readouterr()
    assert main(["caption", "--model", str(run), str(tmp_path / "a.png"), "--json", "--max-new-tokens", "5"]) == 0
    line = json.loads(capsys.readouterr().out)
    assert line["image"] == str(tmp_path / "a.png") and len(line["text"]) <= 5
