import re

import pytest

from moevlm.config import Config, load_config
from moevlm.errors import ConfigError


def test_seed_preset_has_the_original_sizes():
    c = load_config("seed").model
    vision = c.vision
    assert (vision.image_size, vision.patch_size, vision.width, vision.depth, vision.heads) == (96, 16, 512, 3, 8)
    assert (c.decoder.width, c.decoder.depth, c.decoder.heads) == (128, 8, 8)
    assert (c.decoder.moe.num_experts, c.decoder.moe.top_k, c.vision.num_image_tokens) == (8, 2, 1)
    assert c.tokenizer.kind == "char"


def test_derived_values_follow_overrides():
    c = load_config("default", overrides=["decoder.width=64", "vision.patch_size=8", "moe.layers=every-other"])
    assert c.model.decoder.ffn_hidden == 256
    assert c.model.vision.num_patches == 16
    assert c.model.decoder.moe_layer_indices == [1, 3]


def test_yaml_file_then_set_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: 3e-4\n  batch_size: 4\nmodel:\n  decoder:\n    moe:\n      top_k: 1\n")
    c = load_config("tiny", path, ["train.batch_size=2"])
    assert (c.train.lr, c.train.batch_size, c.model.decoder.moe.top_k) == (3e-4, 2, 1)


def test_round_trip_through_dict_keeps_every_value():
    c = load_config("seed", overrides=["moe.capacity_factor=1.25", "moe.layers=[0, 3]"])
    again = Config.from_dict(c.to_dict())
    assert again == c


@pytest.mark.parametrize("override,message", [
    ("train.lr=fast", "train.lr must be float"),
    ("train.batch_size=2.5", "train.batch_size must be int"),
    ("train.batch_size=0", "train.batch_size must be >= 1"),
    ("moe.top_k=9", "moe.top_k 9 must be between 1 and moe.num_experts"),
    ("vision.patch_size=5", "not a multiple of vision.patch_size"),
    ("decoder.heads=3", "not divisible by decoder.heads"),
    ("data.on_bad_row=ignore", "data.on_bad_row must be error or skip"),
    ("train.keep_checkpoints=0", "train.keep_checkpoints must be >= 1"),
    ("train.max_bad_steps=-1", "train.max_bad_steps must be >= 0"),
    ("train.nope=1", "unknown config key train.nope"),
    ("train.eval_every=0", "train.eval_every must be >= 1 or null"),
    ("train.ema_decay=1", "train.ema_decay must be in [0, 1)"),
    ("train.label_smoothing=-0.1", "train.label_smoothing must be in [0, 1)"),
    ("data.aug_translate=1.5", "data.aug_translate must be in [0, 1)"),
    ("lr", "expected key=value"),
])
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config("default", overrides=[override])


def test_bad_yaml_and_unknown_preset(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config("default", path)
    with pytest.raises(ConfigError, match="unknown preset"):
        load_config("huge")


def test_hf_shorthand_and_lm_alias_set_the_pretrained_sources_in_any_order(tmp_path):
    a = load_config("tiny", overrides=["model.vision=hf:org/clip", "vision.feature_layer=-1", "model.lm=hf:org/lm",
                                       "lm.lora_rank=8"])
    b = load_config("tiny", overrides=["vision.feature_layer=-1", "lm.lora_rank=8", "vision.pretrained=org/clip",
                                       "decoder.pretrained=org/lm"])
    assert a == b
    assert (a.model.vision.pretrained, a.model.vision.feature_layer) == ("org/clip", -1)
    assert (a.model.decoder.pretrained, a.model.decoder.lora_rank, a.model.tokenizer.kind) == ("org/lm", 8, "hf")
    assert a.model.vision.image_tokens == "patches" and a.model.decoder.moe_layer_indices == []  # dense until upcycled
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  vision: hf:org/clip\n  lm: hf:org/lm\n")
    assert load_config("tiny", path).model.decoder.pretrained == "org/lm"
    assert Config.from_dict(a.to_dict()) == a


@pytest.mark.parametrize("override,message", [
    ("model.vision=clip", "config key model.vision takes a section or hf:<hub id or folder>, not 'clip'"),
    ("model.lm=hf:", "takes a section or hf:"),
    ("decoder.lora_rank=4", "decoder.lora_rank needs a pretrained LM"),
    ("tokenizer.kind=hf", "tokenizer.kind hf needs a pretrained LM"),
    ("train.stage=finetune", "train.stage must be full, pretrain, instruct, moe, not 'finetune'"),
    ("train.trainable=[projector, head]", "train.trainable must be a non-empty list of vision, projector, lm, moe"),
    ("train.lr_lm=0", "train.lr_lm must be positive"),
    ("moe.activation=relu", "moe.activation must be gelu, gelu_tanh, swiglu, not 'relu'"),
])
def test_bad_pretrained_and_stage_values_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")):
        load_config("tiny", overrides=[override])


def test_a_model_section_from_a_checkpoint_replaces_the_presets():
    model = load_config("seed").to_dict()["model"]
    config = load_config("tiny", overrides=["moe.num_experts=2", "moe.top_k=1"], model=model)
    assert config.model.vision.image_size == 96 and config.model.decoder.moe.num_experts == 2
    assert config.train.batch_size == load_config("tiny").train.batch_size


def test_every_key_has_its_help_and_the_cli_lists_them(capsys):
    from moevlm.cli import main
    from moevlm.config import describe_fields

    rows = describe_fields()
    assert all(text for _, _, text in rows), [key for key, _, text in rows if not text]
    keys = {key for key, _, _ in rows}
    assert {"train.lr", "model.decoder.moe.capacity_factor", "data.on_bad_row"} <= keys
    assert not {key for key in keys if key.endswith(("num_image_tokens", "moe_layer_indices"))}  # derived
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--help-config"])
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    assert "model.decoder.moe.capacity_factor" in printed and "train.lr " in printed


def test_configs_are_frozen_and_updated_through_validation():
    import dataclasses

    config = load_config("tiny")
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.train.lr = 1.0
    changed = config.updated({"model.decoder.moe.layers": "every-other"})
    assert changed.model.decoder.moe_layer_indices == [1] and config.model.decoder.moe_layer_indices == [0, 1]
    with pytest.raises(ConfigError, match="decoder.heads"):
        config.updated({"model.decoder.heads": 5})


def test_validation_comes_every_five_percent_of_the_run_unless_eval_every_says():
    assert load_config("default").train.validation_interval == 100  # 2,000 steps
    assert load_config("default", overrides=["train.max_steps=30"]).train.validation_interval == 2
    assert load_config("default", overrides=["train.max_steps=5"]).train.validation_interval == 1
    assert load_config("default", overrides=["train.eval_every=7"]).train.validation_interval == 7
