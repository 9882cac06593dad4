"""What an export must keep at the edges: keys transformers 4.x and 5.x both read, a re-export
byte-identical to the export, the chat template's ids and the image processor's pixels equal to
moevlm's on system, text-only and multi-turn conversations and on awkward images, no warning
from the card's own example, and files that follow the umask."""

from __future__ import annotations

import json
import logging
import os
import re
from importlib.metadata import version

import numpy as np
import pytest
import torch
from export_helpers import pretrained_checkpoint, scratch_checkpoint
from PIL import Image

from moevlm.checkpoint import VERSION_KEY, load_model
from moevlm.cli import main
from moevlm.data.images import image_preparer, normalize, open_image
from moevlm.export.hf import export_hf


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    root = tmp_path_factory.mktemp("scratch")
    checkpoint = scratch_checkpoint(root / "ckpt", ["moe.layers=every-other"])
    export_hf(checkpoint, root / "hf")
    return checkpoint, root / "hf"


@pytest.fixture(scope="module")
def pretrained(pretrained_parts, tmp_path_factory):
    root = tmp_path_factory.mktemp("pretrained")
    checkpoint = pretrained_checkpoint(root / "ckpt", pretrained_parts["siglip"], pretrained_parts["llama"], layers=[1])
    export_hf(checkpoint, root / "hf")
    return checkpoint, root / "hf"


@pytest.fixture(params=["scratch", "pretrained"])
def exported(request):
    return request.getfixturevalue(request.param)


def test_the_written_keys_are_those_transformers_4_and_5_both_read(exported):
    _, out = exported
    config = json.loads((out / "config.json").read_text())
    text = config["text_config"]
    # transformers 4.x reads rope_theta only; without it Mixtral's default, 1e6, is used silently.
    assert text["rope_theta"] == text["rope_parameters"]["rope_theta"] == 10000.0
    for part in (config, text, config["vision_config"]):
        assert part["dtype"] == part["torch_dtype"] == "float32"
    assert text["architectures"] in (["MixtralForCausalLM"], ["Qwen2MoeForCausalLM"])  # vLLM picks the LM by it
    assert config["vision_config"]["vision_use_head"] is False  # vLLM assumes a head when absent
    tokenizer = json.loads((out / "tokenizer_config.json").read_text())
    assert tokenizer["tokenizer_class"] == "PreTrainedTokenizerFast"  # 4.x has no TokenizersBackend
    # 4.x's fast tokenizer would add token_type_ids, which the MoE text models' forward refuses
    assert tokenizer["model_input_names"] == ["input_ids", "attention_mask"]
    assert not {"is_local", "local_files_only", "model_specific_special_tokens"} & set(tokenizer)
    generation = json.loads((out / "generation_config.json").read_text())
    assert "max_length" not in generation  # it warns beside every generate(max_new_tokens=...)


def test_the_card_and_the_config_name_the_installed_moevlm(exported):
    _, out = exported
    installed = version("moevlm")
    assert f"exported to transformers' `LlavaForConditionalGeneration` by moevlm {installed}." in \
        (out / "README.md").read_text()
    assert json.loads((out / "config.json").read_text())[VERSION_KEY] == installed
    # Lazy: transformers takes seconds to import.
    from transformers import AutoConfig

    assert getattr(AutoConfig.from_pretrained(out), VERSION_KEY) == installed  # kept, not refused


def test_export_import_export_is_byte_identical(exported, tmp_path):
    checkpoint, out = exported
    first = export_hf(checkpoint, tmp_path / "one")
    again = export_hf(out, tmp_path / "two")
    assert (again.parameters, again.active_parameters) == (first.parameters, first.active_parameters)
    assert first.active_parameters < first.parameters  # the MoE layers count top-k of their experts
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(p.name for p in (tmp_path / "two").iterdir())
    for name in names:
        assert (out / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name
    _, _, config = load_model(out)
    _, _, source = load_model(checkpoint)
    assert config.model.decoder.max_text_len == source.model.decoder.max_text_len


def test_the_card_names_hub_ids_only_and_a_re_export_keeps_them_and_the_run(tmp_path):
    from moevlm.export.card import carried_card, hub_ids

    folder = tmp_path / "llama"
    folder.mkdir()
    assert hub_ids([str(folder), "./llama", "~/x", "HuggingFaceTB/SmolLM2-135M", "gpt2", "a/b/c"]) == \
        ["HuggingFaceTB/SmolLM2-135M", "gpt2"]
    (tmp_path / "README.md").write_text("---\ntags:\n- moevlm\nbase_model:\n- org/lm\n- org/vision\n---\n\n# x\n"
                                        "<!-- moevlm run -->\nMLflow run: `abc`.\n<!-- /moevlm run -->\n")
    assert carried_card(tmp_path) == (["org/lm", "org/vision"],
                                      "<!-- moevlm run -->\nMLflow run: `abc`.\n<!-- /moevlm run -->")


def test_the_card_of_a_model_on_local_parts_names_no_local_path(pretrained):
    card = (pretrained[1] / "README.md").read_text()
    assert "base_model" not in card and "/tmp" not in card and str(pretrained[1]) not in card


def test_the_scratch_card_asks_what_the_model_was_trained_on(scratch, tmp_path):
    export_hf(scratch[1], tmp_path / "again")
    for out in (scratch[1], tmp_path / "again"):  # a plain caption: no prompt, also after import
        assert '{"type": "text", "text": ""}' in (out / "README.md").read_text()


def _conversations(image: bool) -> dict[str, tuple[list[dict], list[tuple[str, str]]]]:
    """name -> (messages as a transformers user writes them, moevlm's turns for the same)."""
    def user(text, with_image):
        return {"role": "user", "content": ([{"type": "image"}] if with_image else []) +
                ([{"type": "text", "text": text}] if text else [])}

    def said(text):
        return {"role": "assistant", "content": [{"type": "text", "text": text}]}

    return {
        # moevlm's readers and server put system texts before the first prompt, joined by a newline
        "system": ([{"role": "system", "content": "be short"}, user("What is it?", image), said("a red circle")],
                   [("be short\nWhat is it?", "a red circle")]),
        "plain": ([user("", image), said("a blue square")], [("", "a blue square")]),
        "multi-turn": ([user("What is it?", image), said("a red circle"), user("Describe it.", False),
                        said("two green triangles")],
                       [("What is it?", "a red circle"), ("Describe it.", "two green triangles")]),
    }


@pytest.mark.parametrize("image", [True, False], ids=["image", "text-only"])
def test_the_exported_chat_template_gives_moevlm_s_ids(exported, image):
    from transformers import AutoProcessor

    checkpoint, out = exported
    model, tokenizer, config = load_model(checkpoint)
    processor = AutoProcessor.from_pretrained(out, backend="pil")
    n, image_id = config.model.vision.num_image_tokens, json.loads((out / "config.json").read_text())[
        "image_token_index"]
    picture = Image.new("RGB", (40, 40), (200, 10, 10))
    cases = [(name, messages, tokenizer.encode_conversation(turns, 200, image=image)[0], False)
             for name, (messages, turns) in _conversations(image).items()]
    if image:  # what generation starts from: the prompt, then the template's generation prompt
        messages, turns = _conversations(image)["system"]
        cases.append(("system, prompt", messages[:2], tokenizer.prompt_ids(turns[0][0]), True))
    for name, messages, ours, prompt_only in cases:
        if image and not model.images_in_text:
            ours = [image_id] * n + ours
        ours = [image_id if i == getattr(model, "image_token_id", None) else i for i in ours]
        text = processor.apply_chat_template(messages, add_generation_prompt=prompt_only)
        theirs = processor(text=text, images=picture if image else None, return_tensors="pt")
        assert theirs["input_ids"][0].tolist() == ours, (name, text)


def _awkward_images(folder) -> dict[str, str]:
    """Files that decode differently by mode: 16-bit grey, EXIF-rotated JPEG, palette with
    transparency, grey with alpha, CMYK."""
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (30, 20, 3), dtype=np.uint8)
    ramp = (np.arange(30 * 20, dtype=np.uint32).reshape(30, 20) * 109 % 65536).astype(np.uint16)
    paths = {}
    Image.fromarray(ramp).save(paths.setdefault("16-bit grey", str(folder / "grey16.png")))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to show it upright"
    Image.fromarray(rgb).save(paths.setdefault("EXIF-rotated", str(folder / "rotated.jpg")), exif=exif, quality=95)
    palette = Image.fromarray(rgb).convert("P")
    palette.save(paths.setdefault("palette with transparency", str(folder / "palette.png")), transparency=3)
    alpha = Image.fromarray(np.dstack([rgb[..., 0], rgb[..., 1]]), "LA")
    alpha.save(paths.setdefault("grey with alpha", str(folder / "la.png")))
    Image.fromarray(rgb).convert("CMYK").save(paths.setdefault("CMYK", str(folder / "cmyk.jpg")))
    return paths


def _card_opening(out) -> str:
    """The card's lines from opening the image to before the processor call."""
    card = (out / "README.md").read_text()
    lines = card[card.index("image = "):card.index("inputs = ")]
    assert "exif_transpose" in lines
    return lines


def test_the_exported_processor_gives_moevlm_s_pixels_on_awkward_images(exported, tmp_path):
    from transformers import AutoProcessor

    checkpoint, out = exported
    _, _, config = load_model(checkpoint)
    prepare = image_preparer(config.model, checkpoint)
    processor = AutoProcessor.from_pretrained(out, backend="pil")
    mean = torch.tensor(processor.image_processor.image_mean).view(-1, 1, 1)
    std = torch.tensor(processor.image_processor.image_std).view(-1, 1, 1)
    opening = _card_opening(out)
    for name, path in _awkward_images(tmp_path).items():
        ours = normalize(prepare(open_image(path)))
        scope = {}
        exec("from PIL import Image, ImageOps\n" + opening.replace('"image.png"', repr(path)), scope)
        theirs = processor.image_processor(images=scope["image"], return_tensors="pt")["pixel_values"][0]
        torch.testing.assert_close(theirs, ((ours + 1) / 2 - mean) / std, atol=1e-5, rtol=0, msg=name)


def test_the_card_s_example_generates_without_a_warning(scratch, tmp_path):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    checkpoint, out = scratch
    card = (out / "README.md").read_text()
    script = card[card.index("```python\n") + len("```python\n"):]
    script = script[:script.index("```")]
    Image.new("RGB", (30, 20), (200, 10, 10)).save(tmp_path / "image.png")
    script = script.replace('"."', repr(str(out))).replace('"image.png"', repr(str(tmp_path / "image.png")))
    assert "max_new_tokens" in script and "AutoModelForImageTextToText" in script
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    try:
        exec(compile(script, "README.md", "exec"), {"AutoModelForImageTextToText": AutoModelForImageTextToText,
                                                    "AutoProcessor": AutoProcessor})
    finally:
        logger.removeHandler(handler)
    warnings = [r.getMessage() for r in records if r.levelno >= logging.WARNING]
    assert not [w for w in warnings if "max_length" in w or "max_new_tokens" in w], warnings


def test_the_export_follows_the_umask(scratch, tmp_path):
    before = os.umask(0o027)
    try:
        export_hf(scratch[0], tmp_path / "hf")
    finally:
        os.umask(before)
    assert (tmp_path / "hf").stat().st_mode & 0o777 == 0o750
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "hf").iterdir()}
    assert set(modes.values()) == {0o640}, modes


def test_a_model_that_cannot_be_exported_exactly_is_refused_in_one_line_and_nothing_is_written(tmp_path, capsys):
    checkpoint = scratch_checkpoint(tmp_path / "ckpt", ["vision.arch=vit", "decoder.arch=gpt", "projector.kind=linear",
                                                        "vision.patch_size=8", "vision.image_tokens=pooled"])
    assert main(["export", "--model", str(checkpoint), "--to", "hf", "--out", str(tmp_path / "hf")]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert err.count("\n") == 0 and "Traceback" not in captured.err, err
    assert re.search(r"cannot export exactly: vision\.arch vit .*; projector\.kind linear .*; decoder\.arch gpt", err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no folder, no partial folder
