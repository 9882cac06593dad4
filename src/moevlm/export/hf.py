"""``export_hf``: a moevlm checkpoint folder -> a transformers LLaVA folder (see the package docstring)."""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from moevlm import __version__
from moevlm.checkpoint import STATE, VERSION_KEY, is_transformers_llava, load_checkpoint
from moevlm.data.chat import MOEVLM_LAYOUT_MARKER
from moevlm.errors import ExportError
from moevlm.export.blockers import check_exportable
from moevlm.export.card import carried_card, hub_ids, model_card, parameter_counts, run_part
from moevlm.export.language import TextPart, pretrained_text_part, scratch_text_part
from moevlm.export.portable import follow_umask, portable_config, portable_tokenizer_config
from moevlm.export.processor import (
    IMAGE_TOKEN,
    SCRATCH_TEMPLATE,
    image_processor,
    pretrained_template,
    pretrained_tokenizer,
    scratch_tokenizer,
    write_generation_config,
    write_processor,
)
from moevlm.export.publish import push_to_hub, register_in_mlflow
from moevlm.export.vision import VisionPart, pretrained_vision_part, scratch_vision_part
from moevlm.models.hf_vision import HFVisionTower
from moevlm.models.lora import has_lora, merge_lora

# The card's example names no folder of this machine, so that an export of an export writes the same card.
LOAD_EXAMPLE = """
from transformers import AutoModelForImageTextToText, AutoProcessor
from PIL import Image, ImageOps
model_id = "."  # this folder, or its Hub id once uploaded
model = AutoModelForImageTextToText.from_pretrained(model_id)
processor = AutoProcessor.from_pretrained(model_id, backend="pil")
messages = [{{"role": "user", "content": [{{"type": "image"}}, {{"type": "text", "text": "{prompt}"}}]}}]
text = processor.apply_chat_template(messages, add_generation_prompt=True)
image = ImageOps.exif_transpose(Image.open("image.png"))
if image.mode.startswith("I;16"):
    image = image.point(lambda v: v / 257 + 0.5).convert("L")
inputs = processor(images=image, text=text, return_tensors="pt")
ids = model.generate(**inputs, max_new_tokens=64)
print(processor.decode(ids[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
"""


@dataclass
class ExportResult:
    out: Path
    text_model: str  # the text config's model_type
    parameters: int
    active_parameters: int
    registered_version: str | None = None
    hub_url: str | None = None


def export_hf(model_dir: Path, out: Path, *, register: str | None = None, tracking_uri: str | None = None,
              hub_repo: str | None = None) -> ExportResult:
    """Write ``model_dir``'s model as a transformers LLaVA folder ``out`` (a new or empty folder)."""
    model_dir, out = Path(model_dir), Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"{out}: exists and is not an empty folder; export writes a new folder")
    bundle = load_checkpoint(model_dir)
    config = bundle.config
    check_exportable(config, str(model_dir))
    model = bundle.model.float().eval()
    if has_lora(model):
        merge_lora(model)
    mc = config.model
    if isinstance(model.vision, HFVisionTower):
        vision = pretrained_vision_part(model.vision, mc)
    else:
        vision = scratch_vision_part(model.vision, mc)
    if mc.decoder.pretrained is None:
        tokenizer = scratch_tokenizer(bundle.tokenizer)
        special = {"pad": tokenizer.pad_token_id, "bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id}
        text = scratch_text_part(model.decoder, mc, special)
        template = SCRATCH_TEMPLATE
    else:
        tokenizer = pretrained_tokenizer(bundle.tokenizer._tok)
        special = {"pad": bundle.tokenizer.pad_id, "bos": bundle.tokenizer.bos_id, "eos": bundle.tokenizer.eos_id}
        pad = tokenizer.pad_token_id
        copy_row = pad if pad is not None and pad != tokenizer.eos_token_id else (tokenizer.unk_token_id or 0)
        text = pretrained_text_part(model.lm, mc, tokenizer.convert_tokens_to_ids(IMAGE_TOKEN), copy_row)
        template = pretrained_template(tokenizer.chat_template)
    assert tokenizer.convert_tokens_to_ids(IMAGE_TOKEN) == text.image_token_id, "image token ids disagree"
    weights = _llava_weights(vision, model.projector, text)
    # From the written config, so that an imported export (whose MoE layers transformers builds) counts alike.
    experts = text.config.get("num_local_experts") or text.config.get("num_experts") or 0
    counts = parameter_counts(weights, experts, text.config.get("num_experts_per_tok") or 0)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    state = _trainer_state(model_dir)
    try:
        _write(partial, model_dir, mc, vision, text, weights, tokenizer, template, special, counts, state)
        follow_umask(partial)
        if out.exists():
            out.rmdir()
        partial.rename(out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    result = ExportResult(out, text.config["model_type"], *counts)
    if register is not None:
        uri, run_id = _tracking_of(model_dir, tracking_uri, state.get("mlflow_run_id"))
        result.registered_version = register_in_mlflow(out, register, uri, run_id)
    if hub_repo is not None:
        result.hub_url = push_to_hub(out, hub_repo)
    return result


def _llava_weights(vision: VisionPart, projector, text: TextPart) -> dict[str, torch.Tensor]:
    weights = {"vision_tower." + name: t for name, t in vision.weights.items()}
    weights.update({"multi_modal_projector.linear_1.weight": projector[0].weight,
                    "multi_modal_projector.linear_1.bias": projector[0].bias,
                    "multi_modal_projector.linear_2.weight": projector[2].weight,
                    "multi_modal_projector.linear_2.bias": projector[2].bias})
    weights.update({"language_model." + name: t for name, t in text.weights.items()})
    # Own contiguous copies: safetensors refuses tensors that share memory (q/k/v views of one qkv).
    return {name: t.detach().to(torch.float32).contiguous().clone() for name, t in weights.items()}


def _write(folder: Path, model_dir: Path, mc, vision: VisionPart, text: TextPart, weights, tokenizer, template,
           special, counts, state: dict) -> None:
    """``state``: the checkpoint's trainer_state.json (empty for an imported folder)."""
    # Lazy: transformers takes seconds to import.
    from transformers import LlavaConfig

    llava = LlavaConfig(vision_config=vision.config, text_config=text.config, image_token_index=text.image_token_id,
                        image_seq_length=mc.vision.num_image_tokens, projector_hidden_act="gelu",
                        vision_feature_select_strategy=vision.select_strategy,
                        vision_feature_layer=vision.feature_layer, multimodal_projector_bias=True,
                        tie_word_embeddings=text.config["tie_word_embeddings"],
                        architectures=["LlavaForConditionalGeneration"],
                        # Which release wrote the folder, beside transformers' own "transformers_version".
                        **{VERSION_KEY: __version__})
    llava.text_config.architectures = text.config["architectures"]  # vLLM picks the LM class by it
    llava.save_pretrained(str(folder))
    portable_config(folder)
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    source_images = None
    if mc.vision.pretrained is not None:  # the checkpoint keeps its tower's own processor
        # Lazy: transformers takes seconds to import.
        from transformers import AutoImageProcessor

        source_images = AutoImageProcessor.from_pretrained(str(model_dir))
    images = image_processor(vision, mc.vision.image_size, source_images)
    # The longest input_ids the model was trained for, image tokens included: there (not as
    # generation_config's max_length, which warns beside every max_new_tokens) moevlm reads it back.
    tokenizer.model_max_length = tokenizer.init_kwargs["model_max_length"] = \
        mc.vision.num_image_tokens + mc.decoder.max_text_len
    write_processor(folder, tokenizer, images, vision, mc.vision.patch_size, template)
    portable_tokenizer_config(folder)
    suppress = [text.image_token_id] if text.image_token_id >= text.config["vocab_size"] - 1 else []
    write_generation_config(folder, special, suppress)
    has_picture = (model_dir / "expert_load.png").is_file()
    if has_picture:
        shutil.copyfile(model_dir / "expert_load.png", folder / "expert_load.png")
    carried, run = carried_card(model_dir) if is_transformers_llava(model_dir) else ([], None)
    if run is None:
        run = run_part(state.get("history", {}), state.get("mlflow_run_id"), has_picture)
        carried = hub_ids([s for s in (mc.vision.pretrained, mc.decoder.pretrained) if s])
    # A scratch model answers what it was trained on: plain captions without a prompt.
    prompt = "" if template and MOEVLM_LAYOUT_MARKER in template else "Describe the image."
    card = model_card(text.config, vision.config, counts, run, carried, mc.vision.num_image_tokens,
                      LOAD_EXAMPLE.format(prompt=prompt))
    (folder / "README.md").write_text(card)


def _trainer_state(model_dir: Path) -> dict:
    try:
        return json.loads((model_dir / STATE).read_text())
    except (OSError, ValueError):
        return {}


def _tracking_of(model_dir: Path, tracking_uri: str | None, run_id: str | None) -> tuple[str, str | None]:
    """The tracking store and run the checkpoint was trained in: ``tracking_uri``, else the run
    folder's own ``mlflow.db`` (the checkpoint's folder or the run folder above ``checkpoints/``)."""
    if tracking_uri is not None:
        return tracking_uri, run_id
    for folder in (model_dir, model_dir.parent.parent):
        if (folder / "mlflow.db").is_file():
            return f"sqlite:///{(folder / 'mlflow.db').resolve()}", run_id
    return f"sqlite:///{(model_dir / 'mlflow.db').resolve()}", None
