"""One process of tests/train/test_meta_init.py, started by torchrun over gloo (2 processes): for each
case (a JSON list of config overrides), the meta-device start-up (build on meta, fully_shard,
materialize) as ``moevlm train`` does it, while a dispatch mode notes the largest storage any
operation creates and every read from the sources notes its rows. Each rank writes its shards,
the rows each covers, the buffers, what it measured and rank 0's fingerprint to OUT/<case>-rank<r>.pt;
the test compares them with a one-process build (no assertion here, so a failure cannot leave the
other rank waiting).

usage: python -m torch.distributed.run --standalone --nproc_per_node=2 meta_init_worker.py OUT CASES.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode

from moevlm.config import load_config
from moevlm.train import materialize as meta
from moevlm.train.distributed import close_world, configure_world, join_world, parallelize
from moevlm.train.run import fresh_model_on_meta
from moevlm.train.stages import freeze_for_stage, still_from_source


class LargestStorage(TorchDispatchMode):
    """The bytes of the largest storage an operation's output lives in (a view: its base's). A
    tensor safetensors makes over a file's mapped bytes (``set_`` to that storage) is left out:
    only the pages of the rows copied from it are ever read."""

    def __init__(self):
        super().__init__()
        self.largest = 0
        self.mapped: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(tensor, DTensor):
                tensor = tensor._local_tensor
            if not isinstance(tensor, torch.Tensor) or tensor.is_meta:
                continue
            storage = tensor.untyped_storage()
            if func is torch.ops.aten.set_.source_Storage:
                self.mapped.add(storage.data_ptr())
            elif storage.data_ptr() not in self.mapped:
                self.largest = max(self.largest, storage.nbytes())
        return out


def main() -> None:
    out, cases = Path(sys.argv[1]), json.loads(Path(sys.argv[2]).read_text())
    reads: list[tuple[str, int]] = []
    rows = meta.SafetensorsSource.rows

    def noted_rows(self, name, start, stop):
        part = rows(self, name, start, stop)
        reads.append((name, part.shape[0] if part.dim() else 1))
        return part

    meta.SafetensorsSource.rows = noted_rows
    meta._HASH_ELEMENTS = 100  # the fingerprint reads each tensor in several parts
    world = None
    for case, overrides in cases.items():
        config = load_config("tiny", overrides=[*overrides, "dist.strategy=fsdp"])
        world = world or join_world(config, torch.device("cpu"))
        configure_world(world, config, torch.device("cpu"))
        prepared, start = fresh_model_on_meta(config)
        model = prepared.model
        freeze_for_stage(model, prepared.config.train)
        from_source = still_from_source(prepared.from_source, model)
        reads.clear()
        with LargestStorage() as mode:
            parallelize(model, world, prepared.config, torch.device("cpu"))
            meta.materialize(model, start, torch.device("cpu"))
        read = list(reads)
        fingerprint = meta.source_fingerprint(model, start, from_source) if world.is_main else None
        shards = {}
        for name, param in model.named_parameters():
            local, first, last = meta.local_rows(param)
            shards[name] = (local.detach().clone(), first, last)
        torch.save({"shards": shards, "buffers": {name: b.clone() for name, b in model.named_buffers()},
                    "meta_left": [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta],
                    "largest_storage": mode.largest, "reads": read, "fingerprint": fingerprint,
                    "from_source": sorted(from_source), "rng": torch.random.get_rng_state()},
                   out / f"{case}-rank{world.rank}.pt")
    close_world(world)


if __name__ == "__main__":
    main()
