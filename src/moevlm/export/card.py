"""The exported folder's ``README.md``: a Hugging Face model card (metadata header, architecture,
parameter counts, the run's figures, how to load it)."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from moevlm import __version__

# The card's part that comes from the training run (figures, MLflow run, expert load): an export of an
# export has no run, so it carries this part of its source's card over unchanged.
RUN_BEGIN, RUN_END = "<!-- moevlm run -->", "<!-- /moevlm run -->"
# What a Hub model id looks like ("gpt2", "org/name"); anything else is a local path, which the
# card's base_model must not name.
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)?")


def parameter_counts(weights: dict[str, torch.Tensor], experts: int, top_k: int) -> tuple[int, int]:
    """(total, active per token): a token runs top_k of each MoE layer's experts."""
    total = sum(t.numel() for t in weights.values())
    expert = sum(t.numel() for name, t in weights.items() if ".experts." in name)
    return total, total - (expert * (experts - top_k) // experts if experts else 0)


def _run_figures(history: dict) -> list[str]:
    """The last validation figures of the run's history (trainer_state.json), as table rows."""
    rows = []
    for key in ("val/loss", "val/exact_match", "val/bleu4", "train/loss"):
        if history.get(key):
            step, value = history[key][-1]
            rows.append(f"| {key} | {value:.4f} | {step} |")
    return rows


def hub_ids(sources: list[str]) -> list[str]:
    """The sources that are Hub model ids: not a path, not a folder here."""
    return sorted({s for s in sources if _HUB_ID.fullmatch(s) and not Path(s).expanduser().exists()})


def carried_card(folder: Path) -> tuple[list[str], str | None]:
    """An exported folder's card: its base_model ids and its run part (None when it has no card)."""
    try:
        card = (folder / "README.md").read_text()
    except OSError:
        return [], None
    header = card.split("\n---\n", 1)[0]
    models = re.search(r"^base_model:\n((?:- .*\n?)+)", header, re.MULTILINE)
    ids = [line[2:].strip() for line in models.group(1).splitlines()] if models else []
    begin, end = card.find(RUN_BEGIN), card.find(RUN_END)
    return ids, card[begin:end + len(RUN_END)] if 0 <= begin < end else None


def run_part(history: dict, run_id: str | None, has_expert_picture: bool) -> str:
    """The card's figures, MLflow run and expert-load picture, between the RUN markers."""
    lines = [RUN_BEGIN]
    figures = _run_figures(history)
    if figures:
        lines += ["## Training figures", "", "Last values logged by the training run (validation split):", "",
                  "| metric | value | step |", "|---|---|---|", *figures, ""]
    if run_id:
        lines += [f"MLflow run: `{run_id}`.", ""]
    if has_expert_picture:
        lines += ["## Expert load", "", "Tokens routed to each expert on the validation rows (image and text "
                  "tokens apart):", "", "![expert load](expert_load.png)", ""]
    return "\n".join(lines + [RUN_END])


def model_card(text_config: dict, vision_config: dict, counts: tuple[int, int], run: str, base_models: list[str],
               num_image_tokens: int, load_example: str) -> str:
    """``run``: ``run_part``'s text; ``base_models``: Hub ids only."""
    experts = text_config.get("num_local_experts") or text_config.get("num_experts")
    header = ["---", "library_name: transformers", "pipeline_tag: image-text-to-text",
              "tags:", "- moevlm", "- llava", f"- {text_config['model_type']}"]
    if experts:
        header.append("- mixture-of-experts")
    if base_models:
        header += ["base_model:"] + [f"- {source}" for source in base_models]
    header.append("---")
    total, active = counts
    title = f"LLaVA with a {text_config['architectures'][0].removesuffix('ForCausalLM')} text model"
    lines = [*header, "", f"# {title}", "",
             "A vision-language model trained with [moevlm](https://pypi.org/project/moevlm/) and exported "
             f"to transformers' `LlavaForConditionalGeneration` by moevlm {__version__}.", "",
             "| part | |", "|---|---|",
             f"| vision | {vision_config['model_type']}: {vision_config['num_hidden_layers']} layers, width "
             f"{vision_config['hidden_size']}, {vision_config['image_size']} px, patch {vision_config['patch_size']} |",
             f"| image tokens | {num_image_tokens} per image |",
             f"| language model | {text_config['architectures'][0]}: {text_config['num_hidden_layers']} layers, "
             f"width {text_config['hidden_size']}, vocabulary {text_config['vocab_size']} |"]
    if experts:
        lines.append(f"| experts | {experts} per MoE layer, top-{text_config['num_experts_per_tok']} |")
    lines += [f"| parameters | {total:,} in all, {active:,} active per token |", "", run, ""]
    lines += ["## Use", "", "```python", load_example.strip(), "```", "",
              "Load the image processor with `backend=\"pil\"`: it resizes with Pillow's bicubic filter, as the "
              "model was trained; torchvision's resize gives slightly different pixels. Open images upright "
              "(`ImageOps.exif_transpose`), and give 16-bit grey images as 8 bits scaled (`v / 257`), as moevlm "
              "reads them; Pillow's and transformers' own conversion clips them at 255.", ""]
    return "\n".join(lines)
