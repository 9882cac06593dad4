"""A run trained through the command line, then exported: transformers captions as moevlm does (the
site's own lines in docs/export.md, without a warning), moevlm captions the export as the run, an export of the export
is byte-identical, and --register versions it in the run's own MLflow store."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from export_helpers import hf_messages
from PIL import Image

from moevlm.cli import main
from shapes import write_shapes_csv

EXPORT_PAGE = Path(__file__).resolve().parents[2] / "docs" / "export.md"


def test_train_export_and_caption_with_transformers_and_with_moevlm(tmp_path, capsys):
    from mlflow import MlflowClient
    from transformers import AutoModelForImageTextToText, AutoProcessor

    data = write_shapes_csv(tmp_path / "shapes.csv")
    run, out = tmp_path / "run", tmp_path / "hf"
    settings = ["model.decoder.arch=llama", "model.vision.arch=siglip", "model.vision.image_tokens=patches",
                "train.max_steps=30", "train.lr=3e-3", "data.val_fraction=0.25"]
    assert main(["train", "--data", str(data), "--preset", "tiny", "--out", str(run),
                 *[arg for setting in settings for arg in ("--set", setting)]]) == 0
    assert main(["export", "--model", str(run), "--to", "hf", "--out", str(out), "--register", "shapes"]) == 0
    run_id = json.loads((run / "trainer_state.json").read_text())["mlflow_run_id"]
    client = MlflowClient(tracking_uri=f"sqlite:///{run / 'mlflow.db'}")
    assert client.get_model_version("shapes", "1").run_id == run_id
    assert (out / "expert_load.png").is_file() and "![expert load](expert_load.png)" in (out / "README.md").read_text()

    images = [tmp_path / "a.png", tmp_path / "b.png"]
    Image.new("RGB", (30, 20), (200, 10, 10)).save(images[0])
    Image.new("RGB", (24, 24), (10, 10, 200)).save(images[1])
    capsys.readouterr()
    assert main(["caption", "--model", str(run), *map(str, images), "--json"]) == 0
    ours = [json.loads(line)["text"] for line in capsys.readouterr().out.splitlines()]
    assert main(["caption", "--model", str(out), *map(str, images), "--json"]) == 0
    assert any(ours) and [json.loads(line)["text"] for line in capsys.readouterr().out.splitlines()] == ours

    # The export page's five lines, on this run's export and first image.
    text = EXPORT_PAGE.read_text()
    section = text[text.index("## Export to transformers"):]
    script = section[section.index("```python\n") + len("```python\n"):]
    script = script[:script.index("```")]
    assert len(script.strip().splitlines()) == 5
    script = script.replace("runs/demo/hf", str(out)).replace("runs/demo/data/val/000000.png", str(images[0]))
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("transformers").addHandler(handler)
    try:
        exec(compile(script, "docs/export.md", "exec"), {})
    finally:
        logging.getLogger("transformers").removeHandler(handler)
    assert capsys.readouterr().out.strip() == ours[0]
    assert not [r.getMessage() for r in records if r.levelno >= logging.WARNING]  # "Both max_new_tokens and ..."

    # Export, import, export: the same bytes, the run's figures and expert picture in the card included.
    assert main(["export", "--model", str(out), "--to", "hf", "--out", str(tmp_path / "again")]) == 0
    assert "## Training figures" in (out / "README.md").read_text()
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(p.name for p in (tmp_path / "again").iterdir())
    for name in names:
        assert (out / name).read_bytes() == (tmp_path / "again" / name).read_bytes(), name

    # What the model card's example does, on a batch of two.
    model = AutoModelForImageTextToText.from_pretrained(out)
    processor = AutoProcessor.from_pretrained(out, backend="pil")
    text = processor.apply_chat_template(hf_messages(""), add_generation_prompt=True)
    inputs = processor(images=[Image.open(p) for p in images], text=[text, text], return_tensors="pt", padding=True)
    ids = model.generate(**inputs, max_new_tokens=64, do_sample=False)
    theirs = processor.batch_decode(ids[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert theirs == ours
