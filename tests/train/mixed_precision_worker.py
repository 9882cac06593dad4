"""One rank of tests/train/test_mixed_precision.py, started by torchrun over gloo with 2 processes:
the tiny model sharded by ``distributed.parallelize`` (FSDP2) under ``dist.mixed_precision=MODE``,
a few AdamW steps on a fixed batch. What it saw goes to OUT/rank<r>.json for the test to assert on:
the dtypes a block's linear layer computed in (a forward hook), the dtypes of the optimizer's
parameters and of their gradients, and the losses.

usage: python -m torch.distributed.run --standalone --nproc_per_node=2 mixed_precision_worker.py MODE OUT
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from moevlm.config import load_config
from moevlm.models.factory import build_model
from moevlm.train.distributed import close_world, configure_world, join_world, parallelize
from moevlm.train.optimizer import build_optimizer


def main(mode: str, out: Path) -> None:
    config = load_config("tiny", overrides=["decoder.vocab_size=23", "moe.router_noise=false",
                                            "dist.strategy=fsdp", f"dist.mixed_precision={mode}", "train.lr=1e-2"])
    device = torch.device("cpu")
    world = join_world(config, device)
    configure_world(world, config, device)
    torch.manual_seed(0)
    model = build_model(config.model).train()
    parallel = parallelize(model, world, config, device)
    optimizer = build_optimizer({"lm": list(model.parameters())}, config.train)
    seen: dict[str, str] = {}
    attention = model.decoder.blocks[0].attn
    attention.register_forward_hook(lambda module, args, output: seen.update(
        input=str(args[0].dtype), output=str(output.dtype),
        weight=str(next(module.parameters()).dtype)))
    gen = torch.Generator().manual_seed(1)
    size = config.model.vision.image_size
    images = torch.rand(4, 3, size, size, generator=gen) * 2 - 1
    ids = torch.randint(3, 23, (4, 12), generator=gen)
    losses = []
    for _ in range(4):
        loss = parallel.forward(images, ids, torch.ones_like(ids), ids).loss
        loss.backward()
        grads = {str(p.grad.dtype) for group in optimizer.param_groups for p in group["params"]}
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    shards = {str(p.dtype) for group in optimizer.param_groups for p in group["params"]}
    states = {str(v.dtype) for state in optimizer.state.values() for v in state.values() if v.dim() > 0}
    (out / f"rank{world.rank}.json").write_text(json.dumps(
        {"seen": seen, "params": sorted(shards), "grads": sorted(grads), "states": sorted(states),
         "sharded": all(type(p).__name__ == "DTensor" for p in model.decoder.blocks[0].parameters()),
         "losses": losses}))
    close_world(world)


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
