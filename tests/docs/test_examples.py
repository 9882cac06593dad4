"""Every shell and Python example of the README and the documentation pages runs (tests/docs/examples.py
says how each is marked and what is made tiny), and the few that cannot run here are named."""

from __future__ import annotations

import csv
import json
import re
import shutil
import tarfile

import pytest
from examples import EXAMPLE_LANGUAGES, ROOT, Workspace, blocks, data_url, pages
from PIL import Image

from moevlm.checkpoint import load_checkpoint
from moevlm.cli import main
from shapes import write_llava_data

# (page, how the block starts): the examples that need what no test machine has. Keep this short.
NOT_RUN = {
    ("README.md", "make demo"),
    ("docs/getting-started.md", "make demo"),
    ("docs/distributed.md", "torchrun --nnodes=2"),
    ("docs/distributed.md", "#!/bin/bash"),
    ("docs/distributed.md", "from pyspark"),
    ("docs/inference.md", "OMP_NUM_THREADS=1 python benchmarks/quantize_speed.py"),
    ("docs/inference.md", "OMP_NUM_THREADS=1 python benchmarks/compiled_decode.py"),
    ("docs/benchmarks.md", "OMP_NUM_THREADS=1 python benchmarks/peer.py"),
}
# A page whose examples use what another page's examples make (the staged recipe's runs/moe).
NEEDS = {"docs/api.md": ["docs/training.md"]}
HUB = {"google/siglip-base-patch16-224": "siglip", "TinyLlama/TinyLlama-1.1B-Chat-v1.0": "llama",
       "HuggingFaceTB/SmolLM2-360M-Instruct": "llama"}
RUNNABLE = [page for page in pages() if any(b.mark == "run" for b in blocks(page))]


def test_every_example_is_marked_and_the_ones_not_run_are_few_and_named():
    unmarked = [b.where for page in pages() for b in blocks(page) if b.lang in EXAMPLE_LANGUAGES and not b.mark]
    assert not unmarked, f"mark these <!-- run --> or <!-- not run: why -->: {unmarked}"
    marked = [b for page in pages() for b in blocks(page) if b.mark == "not run"]
    named = {(page, start) for page, start in NOT_RUN for b in marked if b.page == page and b.text.startswith(start)}
    assert named == NOT_RUN and len(marked) == len(NOT_RUN), [(b.where, b.text.splitlines()[0]) for b in marked]
    assert all(b.detail for b in marked)  # each says why
    assert {"README.md", "docs/training.md", "docs/export.md", "docs/serving.md"} <= set(RUNNABLE)


def test_the_readme_links_resolve():
    text = (ROOT / "README.md").read_text()
    for target in re.findall(r"\]\(([^)#\s]+)(?:#([\w-]+))?\)", text):
        path, anchor = ROOT / target[0], target[1] if len(target) > 1 else ""
        assert path.exists(), target
        if anchor:
            headings = re.findall(r"^#+ (.+)$", path.read_text(), re.M)
            slugs = {re.sub(r"[\s]+", "-", re.sub(r"[^\w\s-]", "", h.lower())).strip("-") for h in headings}
            assert anchor in slugs, target


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory, pretrained_parts):
    """What the pages name, made tiny, in a folder each page's workspace starts as a copy of."""
    root = tmp_path_factory.mktemp("stand_ins")
    pictures = tmp_path_factory.mktemp("pictures")
    data = write_llava_data(pictures)
    captions = [json.loads(line) for line in data["captions"].read_text().splitlines()]
    rows = json.loads(data["conversations"].read_text())
    for name in ("LLaVA-Pretrain", "LLaVA-Instruct", "runs/demo/data/val", "."):
        shutil.copytree(pictures, root / name, dirs_exist_ok=True)
    # Your own captions: a CSV of image paths and captions; a held-out file; a photo; JSONL for torchrun.
    for name, part in (("captions.csv", captions), ("held-out.csv", captions[:4])):
        with open(root / name, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerows([("image", "caption")] + [(row["image"], row["caption"]) for row in part])
    Image.open(pictures / "000.png").convert("RGB").save(root / "photo.jpg")
    shutil.copy(data["captions"], root / "train.jsonl")
    # The LLaVA-1.5 files of the staged recipe: captions as conversations, then conversations with a text-only row.
    pretrain = [{"image": row["image"], "conversations": [
        {"from": "human", "value": "<image>\nDescribe the image briefly."}, {"from": "gpt", "value": row["caption"]}]}
        for row in captions]
    (root / "LLaVA-Pretrain" / "blip_laion_cc_sbu_558k.json").write_text(json.dumps(pretrain))
    (root / "LLaVA-Instruct" / "llava_v1_5_mix665k.json").write_text(json.dumps(rows + [{"conversations": [
        {"from": "human", "value": "Hello"}, {"from": "gpt", "value": "Hi"}]}]))
    (root / "LLaVA-Instruct" / "val.json").write_text(json.dumps(rows[:3]))
    # WebDataset shards: a PNG and its caption per key.
    (root / "shards").mkdir()
    for shard in range(3):
        with tarfile.open(root / "shards" / f"{shard:05d}.tar", "w") as tar:
            for i in range(4):
                row = captions[4 * shard + i]
                tar.add(pictures / row["image"], f"{4 * shard + i:09d}.png")
                (pictures / "caption.txt").write_text(row["caption"])
                tar.add(pictures / "caption.txt", f"{4 * shard + i:09d}.txt")
    # `make demo`'s run, tiny: a model that exports (llama + siglip) and its validation scenes.
    with open(root / "runs/demo/data/val.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerows([("image", "caption")] + [(f"val/{i:06d}.png", row["caption"])
                                                   for i, row in enumerate(captions)])
    for i, row in enumerate(captions):
        (root / "runs/demo/data/val" / row["image"]).rename(root / "runs/demo/data/val" / f"{i:06d}.png")
    settings = ["decoder.arch=llama", "vision.arch=siglip", "vision.image_tokens=patches", "decoder.max_text_len=48",
                "train.max_steps=4"]
    assert main(["train", "--data", str(root / "runs/demo/data/val.csv"), "--preset", "tiny", "--no-tracking",
                 "--out", str(root / "runs/demo/model"), *[a for s in settings for a in ("--set", s)]]) == 0
    replacements = {hub: pretrained_parts[part] for hub, part in HUB.items()}
    replacements["data:image/png;base64,..."] = data_url(root / "runs/demo/data/val/000000.png")
    return root, replacements


def run_page(page: str, workspace: Workspace) -> None:
    for needed in NEEDS.get(page, []):
        run_page(needed, workspace)
    for block in blocks(page):
        if block.mark in ("run", "file"):
            workspace.run(block)


@pytest.mark.parametrize("page", RUNNABLE)
def test_the_examples_run(page, stand_ins, tmp_path, offline):
    root, replacements = stand_ins
    workspace = Workspace(tmp_path / "ws", dict(replacements), env={"HF_HUB_OFFLINE": "1"})
    shutil.copytree(root, workspace.path)
    try:
        run_page(page, workspace)
    finally:
        workspace.close()
    CHECKS.get(page, lambda ws: None)(workspace)


def staged_recipe_ran(workspace: Workspace) -> None:
    moe = load_checkpoint(workspace.path / "runs" / "moe")
    assert moe.config.model.decoder.moe_layer_indices == [1]
    assert (moe.config.model.decoder.moe.num_experts, moe.config.model.decoder.moe.top_k) == (4, 2)
    assert moe.config.train.stage == "moe" and moe.from_source  # the SigLIP tower is still referenced
    printed = "".join(workspace.output)
    assert "photo.jpg: " in printed and "exact_match" in printed


CHECKS = {"docs/training.md": staged_recipe_ran}
