"""The README's staged-recipe walk-through, command for command, on tiny local models and data."""

import json
import re
import shlex
from pathlib import Path

import pytest

from moevlm.checkpoint import load_checkpoint
from moevlm.cli import main
from shapes import write_llava_data

README = Path(__file__).resolve().parents[1] / "README.md"


def walkthrough_commands() -> list[str]:
    text = README.read_text()
    section = text[text.index("### Pretrained parts: the staged recipe"):]
    block = section[section.index("```bash\n") + len("```bash\n"):]
    block = block[:block.index("```")]
    joined = block.replace("\\\n", " ")
    return [line.strip() for line in joined.splitlines() if line.strip().startswith("moevlm ")]


def test_the_readme_lists_the_three_stages_caption_and_eval():
    commands = walkthrough_commands()
    assert [re.search(r"--stage (\w+)", c).group(1) for c in commands if "--stage" in c] == \
        ["pretrain", "instruct", "moe"]
    assert commands[-2].startswith("moevlm caption") and commands[-1].startswith("moevlm eval")


@pytest.fixture
def stand_ins(tmp_path, pretrained_parts, offline):
    """What each name in the walk-through stands for here: tiny local models and data."""
    data = write_llava_data(tmp_path)
    rows = json.loads(data["conversations"].read_text())
    pretrain = [{"image": row["image"], "conversations": [
        {"from": "human", "value": "<image>\nDescribe the image briefly."},
        {"from": "gpt", "value": json.loads(data["captions"].read_text().splitlines()[i])["caption"]}]}
        for i, row in enumerate(rows)]
    (tmp_path / "pretrain.json").write_text(json.dumps(pretrain))
    # LLaVA-1.5's mix has text-only rows: the walk-through skips them.
    (tmp_path / "instruct.json").write_text(json.dumps(rows + [{"conversations": [
        {"from": "human", "value": "Hello"}, {"from": "gpt", "value": "Hi"}]}]))
    (tmp_path / "val.json").write_text(json.dumps(rows[:3]))
    return {
        "google/siglip-base-patch16-224": pretrained_parts["siglip"],
        "TinyLlama/TinyLlama-1.1B-Chat-v1.0": pretrained_parts["llama"],
        "LLaVA-Pretrain/blip_laion_cc_sbu_558k.json": str(tmp_path / "pretrain.json"),
        "LLaVA-Instruct/llava_v1_5_mix665k.json": str(tmp_path / "instruct.json"),
        "LLaVA-Instruct/val.json": str(tmp_path / "val.json"),
        "photo.jpg": str(tmp_path / "000.png"),
        "runs/": f"{tmp_path}/runs/",
    }


def test_the_readme_walkthrough_runs_on_tiny_models(stand_ins, tmp_path, capsys):
    for command in walkthrough_commands():
        for name, local in stand_ins.items():
            command = command.replace(name, local)
        argv = shlex.split(command)[1:]
        if argv[0] == "train":
            argv = [a if not a.isdigit() or argv[i - 1] != "--max-steps" else "2" for i, a in enumerate(argv)]
            argv += ["--no-tracking", "--set", "train.batch_size=4", "--set", "train.val_generate=2",
                     "--set", "decoder.max_text_len=160"]
        assert main(argv) == 0, command
    out = capsys.readouterr().out
    assert f"{stand_ins['photo.jpg']}: " in out and '"exact_match"' not in out and "exact_match" in out
    moe = load_checkpoint(tmp_path / "runs" / "moe")
    assert moe.config.model.decoder.moe_layer_indices == [1]
    assert (moe.config.model.decoder.moe.num_experts, moe.config.model.decoder.moe.top_k) == (4, 2)
    assert moe.config.train.stage == "moe" and moe.from_source  # the SigLIP tower is still referenced
