"""The written JSON files made readable alike by transformers 4.x (>= 4.57), 5.x and vLLM, and the
same when an export is read back and exported again.

transformers 5 writes only what 5 reads: ``rope_parameters`` (4.x reads ``rope_theta`` and, without it,
silently takes the text class's default, 1e6 for Mixtral), ``dtype`` (4.x also reads ``torch_dtype``)
and the tokenizer class ``TokenizersBackend``, which 4.x does not have (``PreTrainedTokenizerFast`` is
the same fast tokenizer in both). A tokenizer loaded from a folder and saved again also gains keys
about where it was loaded from, which an export must not carry.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

# Keys transformers 5 adds to tokenizer_config.json on a save after a load; none says how to tokenize.
_LOAD_RECORDS = ("is_local", "local_files_only", "model_specific_special_tokens", "name_or_path")
TOKENIZER_CLASS = "PreTrainedTokenizerFast"


def _rewrite(path: Path, change) -> None:
    values = json.loads(path.read_text())
    change(values)
    # As transformers writes its configs: sorted keys, 2 spaces, a final newline.
    path.write_text(json.dumps(values, indent=2, sort_keys=True) + "\n")


def portable_config(folder: Path) -> None:
    """config.json: ``rope_theta`` (and ``rope_scaling`` when not the default) beside
    ``rope_parameters``; ``dtype`` and ``torch_dtype`` float32, the dtype the weights are written in."""
    def change(config: dict) -> None:
        text = config["text_config"]
        rope = text.get("rope_parameters") or {}
        if "rope_theta" in rope:
            text["rope_theta"] = rope["rope_theta"]
        if rope.get("rope_type", "default") != "default":
            text["rope_scaling"] = {key: value for key, value in rope.items() if key != "rope_theta"}
        for part in (config, text, config["vision_config"]):
            part["dtype"] = part["torch_dtype"] = "float32"

    _rewrite(folder / "config.json", change)


def portable_tokenizer_config(folder: Path) -> None:
    """tokenizer_config.json: a class transformers 4 and 5 both have, the inputs the model takes, and
    nothing about where the tokenizer was loaded from."""
    def change(config: dict) -> None:
        for key in _LOAD_RECORDS:
            config.pop(key, None)
        config["tokenizer_class"] = TOKENIZER_CLASS
        # 4.x's PreTrainedTokenizerFast returns token_type_ids too, which the MoE text models'
        # forward refuses: model(**processor(...)) would fail.
        config["model_input_names"] = ["input_ids", "attention_mask"]
        if not config.get("extra_special_tokens"):
            config.pop("extra_special_tokens", None)

    _rewrite(folder / "tokenizer_config.json", change)


def follow_umask(folder: Path) -> None:
    """``tempfile.mkdtemp`` makes the folder 0700 and safetensors writes 0600: give the folder and
    its files the modes a plain ``mkdir`` and ``open`` would have."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for path in folder.iterdir():
        path.chmod(0o666 & ~umask)
