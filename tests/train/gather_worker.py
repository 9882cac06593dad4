"""One rank of tests/train/test_gather_policy.py, started by torchrun over gloo with 2 processes: a
pretrained tower and untied LM (tiny, on disk) in stage pretrain (frozen LM, trainable projector),
sharded by ``distributed.parallelize`` on the CPU, once with ``gather_one_unit_at_a_time`` (cpu) and
once without it (FSDP2's defaults). At each unit's forward and backward it records which units are gathered
(hold plain tensors instead of DTensor shards, or are being gathered) and whether FSDP2 keeps an all-gather buffer; then
the losses of 3 AdamW steps. Written to OUT/rank<r>.json ({"cpu": ..., "default": ...}).

usage: python -m torch.distributed.run --standalone --nproc_per_node=2 gather_worker.py SIGLIP LLAMA OUT
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from moevlm.config import load_config
from moevlm.train import distributed
from moevlm.train.distributed import close_world, configure_world, join_world, parallelize
from moevlm.train.run import fresh_model
from moevlm.train.stages import freeze_for_stage
from moevlm.train.trainer import build_optimizer


def main(siglip: str, llama: str, out: Path) -> None:
    config = load_config("tiny", overrides=[f"model.vision=hf:{siglip}", f"model.lm=hf:{llama}",
                                            "train.stage=pretrain", "dist.strategy=fsdp", "train.lr=1e-2"])
    device = torch.device("cpu")
    world = join_world(config, device)
    configure_world(world, config, device)
    seen = {"cpu": run(config, world, device)}
    distributed.gather_one_unit_at_a_time = lambda model, units: None  # FSDP2's defaults
    seen["default"] = run(config, world, device)
    (out / f"rank{world.rank}.json").write_text(json.dumps(seen))
    close_world(world)


def run(config, world, device) -> dict:
    prepared = fresh_model(config)
    model, config = prepared.model.train(), prepared.config
    trainable = freeze_for_stage(model, config.train)
    parallel = parallelize(model, world, config, device)
    optimizer = build_optimizer(trainable, config.train)
    units = {name: module for name, module in model.named_modules() if isinstance(module, FSDPModule) and name}
    events: list = []

    def gathering(unit) -> bool:
        """Its weights gathered (plain tensors in place of DTensor shards), or their all-gather
        under way (a prefetch: the buffer holds them until the unit copies them out)."""
        pending = any(group._all_gather_result is not None for group in unit._get_fsdp_state()._fsdp_param_groups)
        return pending or not isinstance(next(unit.parameters()), DTensor)

    def note(when: str, name: str) -> None:
        gathered = sorted(other for other, unit in units.items() if gathering(unit))
        kept = model._get_fsdp_state()._comm_ctx.all_gather_state is not None
        events.append([when, name, gathered, kept])

    def before(name):
        def hook(module, args):
            note("forward", name)
            if args and isinstance(args[0], torch.Tensor) and args[0].requires_grad:
                # Its gradient is done once this unit's backward is, before FSDP reshards it.
                args[0].register_hook(lambda grad: note("backward", name))
        return hook

    for name, unit in units.items():
        unit.register_forward_pre_hook(before(name))
    gen = torch.Generator().manual_seed(1)
    size = config.model.vision.image_size
    images = torch.rand(2, 3, size, size, generator=gen) * 2 - 1
    image_ids = torch.full((2, config.model.vision.num_image_tokens), config.model.decoder.image_token_id)
    text = torch.randint(3, 250, (2, 6), generator=gen)
    ids = torch.cat([text[:, :1], image_ids, text[:, 1:]], 1)
    labels = torch.full_like(ids, -100)
    labels[:, -5:-1] = ids[:, -4:]
    losses = []
    for _ in range(3):
        loss = parallel.forward(images, ids, torch.ones_like(ids), labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return {"units": sorted(units), "events": events, "losses": losses}


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], Path(sys.argv[3]))
