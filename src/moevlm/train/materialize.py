"""Meta-device start-up under FSDP2: no rank ever holds the whole model.

Today's start-up builds the whole model on every rank (pretrained weights read in full), then
shards it. Here, for a fresh run under ``dist.strategy=fsdp`` (``dist.meta_init``):

1. ``build_on_meta``: the model is built with its parameters on the meta device (shapes only, no
   memory) and its buffers real (the rotary frequencies, position ids: small, and computed by
   the constructors as in any build);
2. ``distributed.parallelize`` shards it (``fully_shard`` per block, then the root);
3. ``materialize``: each rank allocates its own shards only (``to_empty``) and fills them:
   - pretrained tensors: each rank reads its own rows of each tensor from the source's
     safetensors files (``safe_open(...).get_slice``), converted to float32;
   - upcycled experts (moe layers on a dense LM): the dense MLP of one layer at a time is read
     and copied into the experts this rank holds, through the same ``read_dense_mlp`` as
     ``install_moe_layers``;
   - fresh weights (projector, a scratch vision encoder, routers): drawn again from
     ``train.seed`` in the order the one-process build draws them, then sliced, so every rank
     starts from exactly the weights one process starts from (and trains to the same losses).

A scratch decoder (no pretrained LM), LoRA adapters, expert parallelism and a LLaVA checkpoint as
a source keep today's start-up (``meta_start_applies``), as do DDP, ``--from`` and ``--resume``.
The models know nothing of this: the distributed parts are all here.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from torch.distributed.tensor import DTensor, Shard
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from moevlm.config import Config
from moevlm.errors import MoevlmError
from moevlm.models.factory import build_model
from moevlm.models.hf_config import LM_KEY, VISION_KEY, hf_config_object
from moevlm.models.hf_vision import HFVisionTower, pixel_stats
from moevlm.models.moe_install import DenseWeights, MoEMLP, experts_from_dense, read_dense_mlp
from moevlm.models.projector import build_projector
from moevlm.models.vit import ViT

# Rows read at once when a tensor is hashed from its file: bounds the memory of the fingerprint.
_HASH_ELEMENTS = 1 << 22


def meta_start_applies(config: Config, world_active: bool) -> bool:
    """Whether a fresh run starts on the meta device: several ranks, dist.meta_init, a pretrained
    LM (whose weights come from files), no LoRA adapters and no expert parallelism."""
    return (world_active and config.dist.meta_init and config.dist.strategy != "ddp"
            and config.model.decoder.pretrained is not None and not config.model.decoder.lora_rank
            and config.dist.expert_parallel == 1 and _source_is_plain(config))


def _source_is_plain(config: Config) -> bool:
    """A LLaVA checkpoint as a source keeps today's start-up: its key layout is not the part's."""
    return all(section.hf_config is None or section.hf_config.get("model_type") != "llava"
               for section in (config.model.vision, config.model.decoder) if section.pretrained is not None)


@contextlib.contextmanager
def parameters_on_meta():
    """Modules built inside keep their parameters on the meta device and their buffers real.
    (Each parameter is created by its module, then moved to meta at once: the memory of an empty
    tensor is never written, so it is never touched.)"""
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None and not param.is_meta:
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


@dataclass
class MetaStart:
    """What the meta build keeps for ``materialize``: the config, and the dense MLPs the MoE layers
    replaced (on meta; their weights are read again from the LM's files)."""
    config: Config
    dense_mlps: dict[str, nn.Module] = field(default_factory=dict)  # MoEMLP's name in the model -> dense MLP


def build_on_meta(config: Config) -> tuple[nn.Module, MetaStart]:
    """The model of ``config`` (prepared by ``prepare_config``) with its parameters on meta."""
    start = MetaStart(config)
    with parameters_on_meta():
        model = build_model(config.model, load_weights=False)
    # install_moe_layers replaced the dense MLPs; a dense LM of the same config still has them.
    if config.model.decoder.moe_layer_indices:
        # Lazy: transformers takes seconds to import.
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            dense_lm = AutoModelForCausalLM.from_config(hf_config_object(config.model.decoder.hf_config),
                                                        dtype=torch.float32)
        dense = dict(dense_lm.named_modules())
        for name, module in model.named_modules():
            if isinstance(module, MoEMLP):
                start.dense_mlps[name] = dense[name.removeprefix("lm.")]
    return model, start


def tied_names(model: nn.Module) -> set[str]:
    """Names whose parameter is an earlier name's (a tied LM head); meta tensors have no storage
    to compare, so they are told by identity."""
    seen, tied = set(), set()
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) in seen:
            tied.add(name)
        seen.add(id(tensor))
    return tied


# -- slices of sharded tensors ------------------------------------------------------------------

def local_rows(param: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """This rank's part of ``param`` (a plain tensor: all of it) and the rows [start, stop) of the
    whole tensor it holds. FSDP2 shards dim 0 only."""
    if not isinstance(param, DTensor):
        return param.data, 0, param.shape[0] if param.dim() else 0
    assert all(p == Shard(0) for p in param.placements), f"unexpected placements {param.placements}"
    shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
    local = param.to_local()
    assert tuple(local.shape) == tuple(shape), (tuple(local.shape), tuple(shape))
    start = offset[0] if param.dim() else 0
    return local, start, start + (shape[0] if param.dim() else 0)


def fill_rows(param: torch.Tensor, whole: torch.Tensor) -> None:
    """This rank's rows of ``param`` from ``whole`` (a tensor of the whole shape, or one that
    broadcasts to it)."""
    local, start, stop = local_rows(param)
    if param.dim() == 0:
        local.copy_(whole)
    else:
        local.copy_(whole.expand(param.shape)[start:stop])


# -- pretrained sources -------------------------------------------------------------------------

class SafetensorsSource:
    """The safetensors files of a pretrained source (a local folder, or a hub id: its snapshot in
    the hub cache, downloaded as from_pretrained would), read one slice at a time.

    Each read opens its file anew: safetensors maps the whole file, and the pages a read touches
    stay in the process's resident set until the mapping goes; so a rank's memory holds its
    shards and one slice being read, not every row it has read as well."""

    def __init__(self, source: str, key: str):
        folder = Path(source) if Path(source).is_dir() else Path(_snapshot(source, key))
        files = sorted(folder.glob("*.safetensors"))
        if not files:
            raise MoevlmError(f"{key} {source!r}: no .safetensors files in {folder} (meta-device start-up reads "
                              f"safetensors only; set dist.meta_init=false)")
        self.source, self.key = source, key
        self._where: dict[str, str] = {}
        self._shapes: dict[str, list[int]] = {}
        for path in files:
            with safe_open(str(path), framework="pt") as handle:
                for name in handle.keys():
                    self._where[name] = str(path)
                    self._shapes[name] = list(handle.get_slice(name).get_shape())

    def has(self, name: str) -> bool:
        return name in self._where

    def shape(self, name: str) -> list[int]:
        self._check(name)
        return self._shapes[name]

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of tensor ``name`` (a scalar: itself), in the file's dtype."""
        return self._read(name, slice(start, stop))

    def whole(self, name: str) -> torch.Tensor:
        return self._read(name, slice(None))

    def _read(self, name: str, rows: slice) -> torch.Tensor:
        self._check(name)
        with safe_open(self._where[name], framework="pt") as handle:
            part = handle.get_slice(name)
            return (part[rows] if self._shapes[name] else part[:]).clone()

    def _check(self, name: str) -> None:
        if name not in self._where:
            raise MoevlmError(f"{self.key} {self.source!r}: its safetensors files hold no tensor {name!r}")


def _snapshot(source: str, key: str) -> str:
    # Lazy: only a hub id needs the hub.
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(source, allow_patterns=["*.safetensors", "*.json"])
    except Exception as err:  # the hub's errors are many; one line names the source
        raise MoevlmError(f"{key} {source!r}: cannot find its weights ({str(err).splitlines()[0]})") from None


def _sources(config: Config) -> dict[str, SafetensorsSource]:
    """Our name prefix -> the source whose tensors live under it (the part's own state_dict names)."""
    model = config.model
    sources = {"lm.": SafetensorsSource(model.decoder.pretrained, LM_KEY)}
    if model.vision.pretrained is not None:
        sources["vision.model."] = SafetensorsSource(model.vision.pretrained, VISION_KEY)
    return sources


# -- materialize --------------------------------------------------------------------------------

def materialize(model: nn.Module, start: MetaStart, device: torch.device) -> None:
    """Allocate this rank's shards of the (sharded, meta) ``model`` on ``device`` and fill them: the
    weights one process would start from."""
    config = start.config
    buffers = [(module, name, buffer) for module in model.modules() for name, buffer in module._buffers.items()
               if buffer is not None]
    model.to_empty(device=device)
    for module, name, buffer in buffers:  # to_empty left them empty; the constructors' values stand
        module._buffers[name] = buffer.to(device)
    _reset_meta_attributes(model, device)
    params = dict(model.named_parameters(remove_duplicate=True))
    filled: set[str] = set()
    sources = _sources(config)
    with torch.no_grad():
        _fill_fresh(model, config, params, filled)
        _fill_experts(model, start, sources["lm."], params, filled)
        for name, param in params.items():
            if name in filled:
                continue
            prefix = next((p for p in sources if name.startswith(p)), None)
            if prefix is None:
                raise MoevlmError(f"meta-device start-up: nothing fills {name}")  # a part this file does not know
            local, first, last = local_rows(param)
            local.copy_(sources[prefix].rows(name.removeprefix(prefix), first, last))
            filled.add(name)
        if isinstance(model.vision, HFVisionTower):
            mean, std = pixel_stats(config.model.vision.pretrained, config.model.vision.hf_config["model_type"])
            model.vision.pixel_mean.copy_(torch.tensor(mean))
            model.vision.pixel_std.copy_(torch.tensor(std))
    assert filled == set(params), sorted(set(params) - filled)


def _reset_meta_attributes(model: nn.Module, device: torch.device) -> None:
    """Tensors kept as plain attributes (an MoE layer's last routed counts) were built on meta
    with their module: zeros, as their constructors make them."""
    for module in model.modules():
        for name, value in vars(module).items():
            if isinstance(value, torch.Tensor) and value.is_meta:
                setattr(module, name, torch.zeros(value.shape, dtype=value.dtype, device=device))


def _fill_fresh(model: nn.Module, config: Config, params: dict[str, nn.Parameter], filled: set[str]) -> None:
    """The weights no source has, drawn from train.seed in the order the one-process build draws
    them (PretrainedVLM: a scratch vision encoder, the projector, then each MoE layer's router),
    built whole one small module at a time and sliced."""
    cfg = config.model
    # The global RNG is left where one process's build leaves it: router noise and dropout go on from there.
    torch.manual_seed(config.train.seed)
    if cfg.vision.pretrained is None:
        _fill_module(ViT(cfg.vision), "vision.", params, filled)
    _fill_module(build_projector(cfg.projector, cfg.vision.width, cfg.decoder.width), "projector.", params, filled)
    router_std = getattr(model.lm.config, "initializer_range", 0.02)
    for name, module in model.named_modules():
        if isinstance(module, MoEMLP):
            # Only the router is drawn; the experts are copies. A dense MLP one unit wide draws
            # the same numbers (expert weights are created empty, never drawn).
            width = module.moe.gate.in_features
            inner = 2 if module.moe.cfg.activation == "swiglu" else 1
            bias = None if inner == 2 else torch.zeros(inner)
            tiny = DenseWeights(torch.zeros(width, inner), bias, torch.zeros(1, width),
                                None if bias is None else torch.zeros(width), module.moe.cfg.activation, 0.0)
            router = experts_from_dense(tiny, module.moe.cfg, router_std)
            for part in ("gate", "noise"):
                if getattr(router, part) is not None:
                    _fill_module(getattr(router, part), f"{name}.moe.{part}.", params, filled)


def _fill_module(built: nn.Module, prefix: str, params: dict[str, nn.Parameter], filled: set[str]) -> None:
    for name, value in built.named_parameters():
        fill_rows(params[prefix + name], value.detach())
        filled.add(prefix + name)


def _fill_experts(model: nn.Module, start: MetaStart, source: SafetensorsSource, params: dict[str, nn.Parameter],
                  filled: set[str]) -> None:
    """Each MoE layer's experts on this rank: copies of that layer's dense MLP, read from the LM's
    files one layer at a time (on this rank only if it holds any of the layer's experts)."""
    for name, dense in start.dense_mlps.items():
        moe_prefix = f"{name}.moe."
        experts = {part: params[moe_prefix + part] for part in ("w1_EDF", "w2_EHD", "b1_EF", "b2_ED")
                   if moe_prefix + part in params}
        if any(local_rows(param)[0].numel() for param in experts.values()):
            mlp = dense.to_empty(device="cpu")
            hf_prefix = name.removeprefix("lm.") + "."
            for key, param in mlp.named_parameters():
                param.data.copy_(source.whole(hf_prefix + key))
            weights = read_dense_mlp(mlp)
            wholes = {"w1_EDF": weights.w1_DF, "w2_EHD": weights.w2_HD, "b1_EF": weights.b1_F, "b2_ED": weights.b2_D}
            for part, param in experts.items():
                fill_rows(param, wholes[part].unsqueeze(0))
            dense.to("meta")  # its memory goes
        filled.update(moe_prefix + part for part in experts)


def source_fingerprint(model: nn.Module, start: MetaStart, names: set[str]) -> str:
    """``moevlm.checkpoint.fingerprint(model, names)`` of the model one process would build (what
    checkpoints record of the pretrained tensors they leave out), with each pretrained parameter
    hashed from its file a few rows at a time (as float32, the dtype the model holds it in)
    instead of from a whole tensor in memory. ``model``: materialized."""
    sources = _sources(start.config)
    state = model.state_dict()
    names = set(names) - tied_names(model)
    digest = hashlib.sha256()
    for name in sorted(names):
        prefix = next((p for p in sources if name.startswith(p)), None)
        tensor = state[name]
        if prefix is None or not sources[prefix].has(name.removeprefix(prefix)):  # a buffer: whole on every rank
            whole = tensor.detach().cpu().contiguous()
            digest.update(f"{name}:{list(whole.shape)}:{whole.dtype}".encode())
            digest.update(whole.view(-1).view(torch.uint8).numpy())
            continue
        source, key = sources[prefix], name.removeprefix(prefix)
        shape = source.shape(key)
        digest.update(f"{name}:{shape}:{torch.float32}".encode())
        if not shape:
            digest.update(source.whole(key).float().reshape(1).view(torch.uint8).numpy())
            continue
        step = max(1, _HASH_ELEMENTS // max(1, math.prod(shape[1:])))
        for first in range(0, shape[0], step):
            rows = source.rows(key, first, min(shape[0], first + step)).float().contiguous()
            digest.update(rows.view(-1).view(torch.uint8).numpy())
    return digest.hexdigest()
