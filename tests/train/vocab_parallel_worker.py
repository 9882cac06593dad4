"""One rank of tests/train/test_vocab_parallel.py, started by torchrun over gloo with 2 processes.
For each case (the scratch decoder and a transformers Llama, both untied; the head frozen in stage
pretrain and learning in stage instruct; vocabularies of 51 and 261 rows, split unevenly), the
same model is built on both ranks and kept whole as the one-process reference, then sharded by
``distributed.parallelize`` (FSDP2, the head split by vocabulary rows). Each rank runs its half of a 4-row batch as
``TrainStep`` does (its share of the loss, times the world size), the reference the whole batch;
then, in eval mode without gradients, both compute the labelled logits and a generation prefill.
Rank 0 writes OUT/<case>.pt: the summed loss, every parameter's whole gradient, the eval logits of
both ranks, and the reference's of the same.

usage: python -m torch.distributed.run --standalone --nproc_per_node=2 vocab_parallel_worker.py \
    SIGLIP LLAMA LLAMA_ODD OUT
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from moevlm.config import load_config
from moevlm.models.factory import build_model
from moevlm.train.distributed import close_world, configure_world, join_world, parallelize
from moevlm.train.run import fresh_model, prepare_config
from moevlm.train.stages import freeze_for_stage
from moevlm.train.step import TrainStep
from moevlm.train.vocab_parallel import VocabParallelHead

SMOOTHING = 0.1


def cases(siglip: str, llama: str, llama_odd: str) -> dict[str, list[str]]:
    # The scratch decoder's vocabulary: 51 (rows 26 + 25), its tokenizer's replaced.
    scratch = ["decoder.tie_embeddings=false", "moe.router_noise=false", "decoder.dropout=0.0",
               "decoder.vocab_size=51"]
    return {"scratch-frozen": [*scratch, "train.stage=pretrain"],
            "scratch-learning": [*scratch, "train.stage=instruct"],
            "hf-frozen": [f"model.vision=hf:{siglip}", f"model.lm=hf:{llama}", "train.stage=pretrain"],
            "hf-learning": [f"model.vision=hf:{siglip}", f"model.lm=hf:{llama}", "train.stage=instruct"],
            "hf-odd-vocabulary": [f"model.vision=hf:{siglip}", f"model.lm=hf:{llama_odd}", "train.stage=instruct"],
            # FSDP2 gathers and computes in bf16: the head's slice too (compared within bf16 rounding)
            "hf-learning-bf16": [f"model.vision=hf:{siglip}", f"model.lm=hf:{llama}", "train.stage=instruct",
                                 "dist.mixed_precision=bf16"],
            # rank 1's rows have no labelled position (its loss share is 0, its collectives run all the same)
            "scratch-nothing-labelled-on-rank-1": [*scratch, "train.stage=instruct"]}


def built(config):
    """The model ``fresh_model`` gives; a scratch decoder with config's own vocabulary size."""
    if config.model.decoder.pretrained is not None:
        prepared = fresh_model(config)
        return prepared.model, prepared.config
    config = prepare_config(config)
    torch.manual_seed(config.train.seed)
    return build_model(config.model, load_weights=True), config


def batch(model, config, vocab: int, labelled_rows: tuple[int, ...]) -> tuple:
    """4 rows: rows 0-1 are rank 0's, rows 2-3 rank 1's, with ``labelled_rows`` labelled positions each."""
    gen = torch.Generator().manual_seed(1)
    size = config.model.vision.image_size
    images = torch.rand(4, 3, size, size, generator=gen) * 2 - 1
    text = torch.randint(3, vocab, (4, 9), generator=gen)
    if model.images_in_text:
        image_ids = torch.full((4, model.num_image_tokens), config.model.decoder.image_token_id)
        ids = torch.cat([text[:, :1], image_ids, text[:, 1:]], 1)
    else:
        ids = text
    labels = torch.full_like(ids, -100)
    for row, labelled in enumerate(labelled_rows):
        if labelled:
            labels[row, -labelled - 1:-1] = ids[row, -labelled:]
    return images, ids, torch.ones_like(ids), labels


def run(config, world, labelled_rows: tuple[int, ...]) -> dict:
    model, config = built(config)
    model.train()
    reference = copy.deepcopy(model)
    freeze_for_stage(model, config.train)
    freeze_for_stage(reference, config.train)
    vocab = config.model.decoder.vocab_size
    images, ids, mask, labels = batch(model, config, vocab, labelled_rows)
    whole = reference(images, ids, mask, labels, label_smoothing=SMOOTHING)
    whole.loss.backward()

    parallelize(model, world, config, torch.device("cpu"))
    head = model.lm.get_output_embeddings() if hasattr(model, "lm") else model.decoder.lm_head
    assert isinstance(head, VocabParallelHead), type(head)
    gathered = []
    head.forward = lambda hidden, forward=head.forward: gathered.append(1) or forward(hidden)
    mine = slice(2 * world.rank, 2 * world.rank + 2)
    out = model(images[mine], ids[mine], mask[mine], labels[mine], label_smoothing=SMOOTHING)
    step = SimpleNamespace(model=model)
    _, loss = TrainStep._share_of_batch(step, out, int((labels[mine] != -100).sum()), int((labels != -100).sum()))
    (loss * world.size).backward()
    assert not gathered, "the head was gathered whole in training"
    summed = loss.detach().clone()
    dist.all_reduce(summed)
    grads = {}
    for name, param in model.named_parameters():
        grad = param.grad
        grads[name] = None if grad is None else (grad.full_tensor() if isinstance(grad, DTensor) else grad)

    model.eval()
    reference.eval()
    with torch.no_grad():
        logits = model(images[mine], ids[mine], mask[mine], labels[mine]).logits
        prefill = model.prefill(images[mine], ids[mine][:, :-3], mask[mine][:, :-3])[0]
        sizes = [torch.zeros(1, dtype=torch.long) for _ in range(2)]
        dist.all_gather(sizes, torch.tensor([logits.size(0)]))
        padded = logits.new_zeros(int(max(sizes)), logits.size(1))
        padded[:logits.size(0)] = logits
        parts = [torch.empty_like(padded) for _ in range(2)]
        dist.all_gather(parts, padded)
        prefills = [torch.empty_like(prefill) for _ in range(2)]
        dist.all_gather(prefills, prefill)
        ref_logits = reference(images, ids, mask, labels).logits
        ref_prefill = reference.prefill(images, ids[:, :-3], mask[:, :-3])[0]
    return {"loss": float(summed), "ref_loss": float(whole.loss),
            "grads": grads, "ref_grads": {name: p.grad for name, p in reference.named_parameters()},
            "local_rows": head.weight.to_local().shape[0], "vocab": vocab,
            "logits": torch.cat([part[:int(size)] for part, size in zip(parts, sizes)]), "ref_logits": ref_logits,
            "prefill": torch.cat(prefills), "ref_prefill": ref_prefill}


def main(siglip: str, llama: str, llama_odd: str, out: Path) -> None:
    device = torch.device("cpu")
    world = None
    for case, overrides in cases(siglip, llama, llama_odd).items():
        config = load_config("tiny", overrides=[*overrides, "dist.strategy=fsdp"])
        if world is None:
            world = join_world(config, device)
            configure_world(world, config, device)
        result = run(config, world, (5, 5, 0, 0) if case.startswith("scratch-nothing") else (5, 5, 2, 1))
        if world.is_main:
            torch.save(result, out / f"{case}.pt")
    close_world(world)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], Path(sys.argv[4]))
