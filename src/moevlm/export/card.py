"""The exported folder's ``README.md``: a Hugging Face model card (metadata header, architecture,
parameter counts, the run's figures, how to load it)."""

from __future__ import annotations

import torch


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


def model_card(name: str, text_config: dict, vision_config: dict, counts: tuple[int, int], history: dict,
               run_id: str | None, sources: list[str], num_image_tokens: int, load_example: str,
               has_expert_picture: bool) -> str:
    experts = text_config.get("num_local_experts") or text_config.get("num_experts")
    header = ["---", "library_name: transformers", "pipeline_tag: image-text-to-text",
              "tags:", "- moevlm", "- llava", f"- {text_config['model_type']}"]
    if experts:
        header.append("- mixture-of-experts")
    if sources:
        header += ["base_model:"] + [f"- {source}" for source in sources]
    header.append("---")
    total, active = counts
    lines = [*header, "", f"# {name}", "",
             "A vision-language model trained with [moevlm](https://pypi.org/project/moevlm/) and exported "
             "to transformers' `LlavaForConditionalGeneration`.", "",
             "| part | |", "|---|---|",
             f"| vision | {vision_config['model_type']}: {vision_config['num_hidden_layers']} layers, width "
             f"{vision_config['hidden_size']}, {vision_config['image_size']} px, patch {vision_config['patch_size']} |",
             f"| image tokens | {num_image_tokens} per image |",
             f"| language model | {text_config['architectures'][0]}: {text_config['num_hidden_layers']} layers, "
             f"width {text_config['hidden_size']}, vocabulary {text_config['vocab_size']} |"]
    if experts:
        lines.append(f"| experts | {experts} per MoE layer, top-{text_config['num_experts_per_tok']} |")
    lines += [f"| parameters | {total:,} in all, {active:,} active per token |", ""]
    figures = _run_figures(history)
    if figures:
        lines += ["## Training figures", "", "Last values logged by the training run (validation split):", "",
                  "| metric | value | step |", "|---|---|---|", *figures, ""]
    if run_id:
        lines += [f"MLflow run: `{run_id}`.", ""]
    if has_expert_picture:
        lines += ["## Expert load", "", "Tokens routed to each expert on the validation rows (image and text "
                  "tokens apart):", "", "![expert load](expert_load.png)", ""]
    lines += ["## Use", "", "```python", load_example.strip(), "```", "",
              "Load the image processor with `backend=\"pil\"`: it resizes with Pillow's bicubic filter, as the "
              "model was trained; torchvision's resize gives slightly different pixels.", ""]
    return "\n".join(lines)
