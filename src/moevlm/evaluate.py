"""Evaluation on a data set: token loss and perplexity, greedy captions scored by exact match,
BLEU-4 and CIDEr-D, and per-layer expert load split into image and text tokens."""

from __future__ import annotations

import logging
import math
from functools import partial
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from moevlm.checkpoint import load_model
from moevlm.data.dataset import ImageTextDataset, collate, usable_batch
from moevlm.data.images import image_key
from moevlm.data.sources import read_data
from moevlm.data.tokenizer_factory import TextTokenizer
from moevlm.data.training_data import dataset_for
from moevlm.device import autocast_dtype, resolve_device
from moevlm.errors import ConfigError
from moevlm.generate import generate_texts
from moevlm.metrics import bleu4, cider_d, exact_match, expert_balance
from moevlm.models.protocol import VisionLanguageModel
from moevlm.models.vlm import expert_dropped

log = logging.getLogger(__name__)

# Room past the reference's length: end-of-turn and special tokens that decoding drops.
_SPARE_TOKENS = 8


def generation_limit(tokenizer: TextTokenizer, references: list[str]) -> int:
    """New tokens to generate for rows scored against ``references``: twice the longest in
    tokens, plus a few. By then a caption is far from an exact match, and an untrained model,
    which never writes <eos>, would otherwise run on to decoder.max_text_len (1,024 in llava)."""
    return 2 * max(len(tokenizer.encode(text)) for text in references) + _SPARE_TOKENS


@torch.no_grad()
def evaluate(model: VisionLanguageModel, dataset: ImageTextDataset, tokenizer: TextTokenizer, *, batch_size: int = 64,
             max_generate: int | None = None, max_new_tokens: int | None = None,
             amp_dtype: torch.dtype | None = None, compile: bool = False) -> dict:
    """Returns exact_match, bleu4, cider_d, loss, perplexity, num_samples, expert_load (per layer),
    expert_balance, with moe.capacity_factor dropped (per layer: the share of real assignments
    training would drop; inference drops none), plus expert_load_counts (tensor) and
    predictions [(reference, prediction)].

    ``max_generate`` limits how many images are captioned (None: all, 0: none, and exact_match,
    bleu4 and cider_d are then 0 over none); the loss uses every row. Rows with the same image and first
    prompt (COCO's captions of one picture) are generated once, from that prompt (``<image>``
    placeholder and all: the tokenizer places or drops it as in training), and scored against
    all their first turns' answers, as COCO evaluation does; ``predictions`` pairs each with its
    first reference. Text-only rows count in the loss only. Generation stops at ``max_new_tokens``
    (None: twice the longest reference of the batch, in tokens, plus a few, see
    ``generation_limit``) or at ``decoder.max_text_len``, whichever comes first. ``compile``: generate
    with the compiled decoding step (moevlm.compiled).
    """
    model.eval()
    device = next(model.parameters()).device
    autocast = partial(torch.autocast, device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None)
    loss_sum, token_count = 0.0, 0
    load, dropped = None, 0
    # Its own generator, so evaluating never moves the global RNG that training uses.
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, generator=torch.Generator(),
                        collate_fn=partial(collate, pad_id=tokenizer.pad_id))
    for batch in loader:
        batch = usable_batch(batch, dataset.on_bad_row)
        if batch is None:
            continue
        mixed = {} if bool(batch["has_image"].all()) else {"has_image": batch["has_image"].to(device)}
        batch = {k: v.to(device) for k, v in batch.items()}
        labels = batch["labels"]
        with autocast():  # given labels, the logits are those of the labelled positions only
            out = model(batch["images"], batch["input_ids"], batch["attention_mask"], labels, **mixed)
        labelled = labels[labels != -100]
        loss_sum += torch.nn.functional.cross_entropy(out.logits.float(), labelled, reduction="sum").item()
        token_count += labelled.numel()
        batch_load = model.expert_load()
        load = batch_load if load is None else load + batch_load
        dropped = dropped + expert_dropped(model.moe_layers)

    groups = reference_groups(dataset)
    count = len(groups) if max_generate is None else min(max_generate, len(groups))
    references, predictions = [], []
    for start in range(0, count, batch_size):
        chunk = groups[start:min(count, start + batch_size)]
        images, rows = dataset.images_of([group[0] for group in chunk])
        if not rows:
            continue
        kept = [group for group in chunk if group[0] in rows]
        prompts = [dataset.samples[group[0]].turns[0][0] for group in kept]
        answers = [[dataset.samples[i].turns[0][1] for i in group] for group in kept]
        limit = (generation_limit(tokenizer, [a for refs in answers for a in refs]) if max_new_tokens is None
                 else max_new_tokens)
        with autocast():
            predictions += generate_texts(model, tokenizer, images, prompts, max_new_tokens=limit, compile=compile)
        references += answers

    loss = loss_sum / max(1, token_count)
    result = {
        "exact_match": exact_match(predictions, references),
        "bleu4": bleu4(predictions, references) if predictions else 0.0,
        # Its document frequencies come from the references of the images captioned here.
        "cider_d": cider_d(predictions, references),
        "loss": loss,
        "perplexity": math.exp(min(loss, 50.0)),
        "num_samples": len(dataset),
        "predictions": [(refs[0], prediction) for refs, prediction in zip(references, predictions)],
    }
    if load is not None and load.numel():
        result["expert_load"] = {f"layer_{i}": {"image": row[0].tolist(), "text": row[1].tolist()}
                                 for i, row in zip(model.cfg.decoder.moe_layer_indices, load)}
        result["expert_balance"] = expert_balance(load)
        result["expert_load_counts"] = load
        if model.cfg.decoder.moe.capacity_factor is not None:
            # Eval is dropless, so load counts every real assignment: the share training would drop.
            result["dropped"] = {f"layer_{i}": d / max(1, r) for i, d, r in
                                 zip(model.cfg.decoder.moe_layer_indices, dropped.tolist(), load.sum((1, 2)).tolist())}
    return result


def reference_groups(dataset: ImageTextDataset) -> list[list[int]]:
    """Rows with an image, grouped by (image, first prompt), in order of first appearance."""
    groups: dict[tuple[str, str], list[int]] = {}
    for index, sample in enumerate(dataset.samples):
        if sample.image is not None:
            groups.setdefault((image_key(sample.image), sample.turns[0][0]), []).append(index)
    return list(groups.values())


def evaluate_file(model_dir: str | Path, data: str | Path, *, device: str = "auto", max_new_tokens: int | None = None,
                  generate: bool = True, image_root: str | None = None, quantize: str | None = None,
                  compile: bool = False) -> dict:
    """``moevlm eval``: ``evaluate`` of the checkpoint in ``model_dir`` on a data file, on ``device``.
    ``generate`` False: loss and perplexity only (no exact match, BLEU or CIDEr-D in the result). ``image_root``:
    ``data.image_root`` for this file (the training run's would point at its own images). ``quantize``:
    ``--quantize`` (int8, nf4; models/quantized.py). ``compile``: ``--compile`` (moevlm.compiled)."""
    if max_new_tokens is not None and max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens must be at least 1, not {max_new_tokens}")
    where = resolve_device(device, key="--device")
    model, tokenizer, config = load_model(model_dir, device=where, quantize=quantize)
    config = config.updated({"data.image_root": image_root})
    samples, skipped = read_data(data, config.data)
    dataset = dataset_for(samples, tokenizer, config, augment=None, folder=model_dir)
    skipped.update(dataset.skipped)
    if skipped:
        log.warning("data.on_bad_row=skip: skipped %s", skipped)
    result = evaluate(model, dataset, tokenizer, batch_size=config.train.batch_size,
                      amp_dtype=autocast_dtype("auto", where), max_generate=None if generate else 0,
                      max_new_tokens=max_new_tokens, compile=compile)
    if not generate:  # nothing was captioned: no scores to report
        del result["exact_match"], result["bleu4"], result["cider_d"]
    return result
