"""The training loop: AdamW, warmup + cosine, gradient accumulation and clipping, optional bf16
autocast, periodic validation and checkpoints, exact resume, MLflow metrics and plots.

Each validation is compared with the best so far (``train.select``, train/selection.py). A
validation that sets a new best is saved as a snapshot even when it is not a ``checkpoint_every``
step: its weights exist at that step only, and inference (``--checkpoint best``) reads the
snapshot. The rotation keeps the best snapshot beside the newest ones. ``train.patience``
validations in a row without a new best end the run as ``max_steps`` would.

With ``train.ema_decay`` the weight average (train/ema.py) is what validation scores, what
checkpoints hold as weights and what the trainer leaves in the model when ``fit`` returns.

A step whose loss or gradient norm is not finite changes nothing but the counters: no update,
no metrics, a warning. Up to ``train.max_bad_steps`` of them in a row are skipped so; the next
one in a row ends the run with a ``TrainingError`` (0: the first one does), and the weights then
on disk are the last checkpoint written before it.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import math
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from moevlm.checkpoint import PreparedModel, ShardedOptimizerState, fingerprint, tied_copies
from moevlm.config import Config
from moevlm.data.dataset import IGNORE_INDEX, EpochBatchSampler, ImageTextDataset, collate, usable_batch
from moevlm.data.length_groups import LengthGroupedBatchSampler
from moevlm.data.tokenizer_factory import TextTokenizer
from moevlm.device import autocast_dtype, resolve_device
from moevlm.errors import CheckpointError, ConfigError, MoevlmError, TrainingError
from moevlm.evaluate import evaluate
from moevlm.metrics import expert_balance
from moevlm.models.protocol import VisionLanguageModel
from moevlm.models.vlm import expert_dropped
from moevlm.train import dist_checkpoint, plots
from moevlm.train.checkpointing import apply_activation_checkpointing
from moevlm.train.distributed import RankBatches, World, clip_gradients, parallelize
from moevlm.train.ema import WeightAverage
from moevlm.train.expert_parallel import sync_expert_grads
from moevlm.train.materialize import MetaStart, materialize, source_fingerprint
from moevlm.train.selection import Selection
from moevlm.train.snapshots import RunCheckpoints
from moevlm.train.stages import freeze_for_stage, group_lr, still_from_source
from moevlm.train.tracking import Tracker

log = logging.getLogger(__name__)


def lr_factor(step: int, warmup_steps: int, max_steps: int, min_ratio: float) -> float:
    """Linear warmup to 1, then cosine decay to ``min_ratio`` at ``max_steps``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_optimizer(trainable: dict[str, list[torch.nn.Parameter]], cfg) -> torch.optim.AdamW:
    """One pair of parameter groups per trainable group (vision, projector, lm, moe), each with its
    own learning rate (``base_lr``, scaled by the schedule)."""
    groups = []
    for name, params in trainable.items():
        lr = group_lr(cfg, name)
        # Weight decay on matrices (and stacked expert weights) only, not on biases and norms.
        for decay, chosen in ((cfg.weight_decay, [p for p in params if p.dim() >= 2]),
                              (0.0, [p for p in params if p.dim() < 2])):
            # FSDP's sharded parameters and plain ones (expert slices beside them) cannot share a fused step.
            for kind in dict.fromkeys(type(p.data) for p in chosen):
                groups.append({"params": [p for p in chosen if type(p.data) is kind], "weight_decay": decay, "lr": lr,
                               "base_lr": lr, "group": name})
    # The fused kernel updates every tensor in one pass: about half the optimizer time on CPU.
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=True)


def _rng_state(device: torch.device) -> dict:
    state = {"torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()}
    if device.type == "cuda":
        state["cuda"] = base64.b64encode(torch.cuda.get_rng_state(device).numpy().tobytes()).decode()
    return state


def _rank_seed(seed: int, rank: int, step: int) -> int:
    """Router noise and dropout of rank > 0 (rank 0 goes on from the weights' initialisation, as one process)."""
    return int(np.random.SeedSequence([seed, rank, step]).generate_state(1)[0])


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(state["torch"])), dtype=torch.uint8))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(state["cuda"])), dtype=torch.uint8),
                                 device)


class Trainer:
    def __init__(self, config: Config, model: VisionLanguageModel, tokenizer: TextTokenizer,
                 train_set: ImageTextDataset, val_set: ImageTextDataset | None, out_dir: Path, tracker: Tracker,
                 state: dict | None = None, optimizer_state: dict | None = None, progress: bool = True,
                 from_source: set[str] = frozenset(), command_config: dict | None = None,
                 world: World | None = None, device: torch.device | None = None,
                 meta_start: MetaStart | None = None):
        """``from_source`` names the pretrained tensors no stage has trained so far (kept out of
        checkpoints, see moevlm/checkpoint/folder.py); ``command_config``:
        the config as the command line gave it, kept in the trainer state for ``--resume`` to check.
        ``world``: this rank among several (moevlm/train/distributed.py; None: one process), on ``device``.
        ``meta_start``: ``model`` is on the meta device; each rank fills its shards once sharded
        (moevlm/train/materialize.py)."""
        self.config, self.tokenizer = config, tokenizer
        self.train_set, self.val_set = train_set, val_set
        self.out_dir, self.tracker, self.progress = Path(out_dir), tracker, progress
        self.world = world or World()
        self.checkpoints = RunCheckpoints(self.out_dir, config.train.keep_checkpoints)
        tc = config.train
        self.device = device or resolve_device(tc.device)
        self.amp_dtype = autocast_dtype(tc.precision, self.device)
        self.meta_start = meta_start
        self.model = model if meta_start is not None else model.to(self.device)
        trainable = freeze_for_stage(self.model, tc)
        self.from_source = still_from_source(set(from_source), self.model)
        state = state or {}
        resumed = optimizer_state is not None
        # Before DDP or FSDP2 wrap the blocks: their hooks stay outside the recomputed forward.
        apply_activation_checkpointing(self.model, tc.activation_checkpointing)
        if self.world.active:
            optimizer_state = self._parallelize(trainable, optimizer_state)
        else:
            self.parallel = parallelize(self.model, self.world, config, self.device)
            self.optimizer = build_optimizer(trainable, tc)
        if isinstance(optimizer_state, ShardedOptimizerState):
            dist_checkpoint.load_sharded_optimizer(optimizer_state.folder, self.model, self.optimizer, self.world,
                                                   self.parallel.expert_names, averaged=tc.ema_decay > 0)
        elif optimizer_state is not None:
            self._load_optimizer(self.optimizer, optimizer_state)
        self.average = WeightAverage(self.optimizer, tc.ema_decay) if tc.ema_decay else None
        if self.average is not None and resumed:
            self.average.swap()  # a checkpoint holds the average as its weights, the training weights beside it
        # Training steps go through the compiled module; it shares the parameters, so
        # checkpoints, evaluation and generation use the plain one (DDP's inner module).
        self.forward = torch.compile(self.parallel.forward) if tc.compile else self.parallel.forward
        whole_batches = self._batch_sampler(model, train_set)
        self.sampler = (RankBatches(whole_batches, self.world.rank, self.world.size) if self.world.active
                        else whole_batches)
        # Its own generator: a DataLoader draws a seed per iterator, which must not come from
        # the global RNG that router noise and dropout use, or resuming would shift them.
        self.loader = DataLoader(train_set, batch_sampler=self.sampler, num_workers=config.data.num_workers,
                                 collate_fn=partial(collate, pad_id=tokenizer.pad_id),
                                 generator=torch.Generator().manual_seed(tc.seed))
        self.step = state.get("step", 0)
        self.epoch, self.batch_in_epoch = state.get("epoch", 0), state.get("batch_in_epoch", 0)
        self.history: dict[str, list] = {k: [tuple(p) for p in v] for k, v in state.get("history", {}).items()}
        self.bad_in_a_row = state.get("bad_in_a_row", 0)
        self.skipped_steps: list[int] = state.get("skipped_steps", [])
        self.saved_step = state.get("step")  # None until this run writes a checkpoint
        self.selection = Selection(tc.select, tc.patience, state)
        self.checkpoints.best = self.selection.best_step
        self.command_config = command_config
        if self.world.rank == 0 and "rng" in state:
            _set_rng_state(state["rng"], self.device)
        elif self.world.rank > 0:
            ranks = state.get("rank_rng", [])
            if len(ranks) == self.world.size - 1:  # resumed on as many ranks: each goes on with its own stream
                _set_rng_state(ranks[self.world.rank - 1], self.device)
            else:
                torch.manual_seed(_rank_seed(tc.seed, self.world.rank, self.step))

    def _batch_sampler(self, model: VisionLanguageModel, train_set: ImageTextDataset) -> EpochBatchSampler:
        """The whole batches over all ranks: random, or grouped by length (``data.group_by_length``)."""
        tc = self.config.train
        if not self.config.data.group_by_length:
            return EpochBatchSampler(len(train_set), tc.batch_size, seed=tc.seed, min_rows=self.world.size)
        if not hasattr(train_set, "lengths"):
            raise ConfigError("data.group_by_length needs rows whose lengths are known up front; generated rows "
                              "(the demo's scenes, drawn afresh each epoch) have none: set it to false")
        lengths = train_set.lengths(0 if model.images_in_text else model.num_image_tokens)
        has_image = [train_set.has_image(i) for i in range(len(train_set))]
        return LengthGroupedBatchSampler(lengths, has_image, tc.batch_size, seed=tc.seed, min_rows=self.world.size)

    def _load_optimizer(self, optimizer: torch.optim.Optimizer, state: dict) -> None:
        try:
            optimizer.load_state_dict(state)
        except ValueError as err:  # torch's message is one line
            raise CheckpointError(
                f"{self.out_dir}: the checkpoint's optimizer state does not fit this run's trainable parameters "
                f"({err}); a run that trained a pretrained tower before moevlm froze the tower layers its image "
                f"tokens never use can go on as a new stage: --from {self.out_dir} instead of --resume") from None

    def release_parallel(self) -> None:
        """Drop DDP's wrapper once training is over: its reducer must be gone before the process
        group is (a reducer outliving it can hang the process at exit)."""
        if self.world.active:
            self.forward = self.parallel.forward = self.model

    def _parallelize(self, trainable: dict[str, list[torch.nn.Parameter]], optimizer_state):
        """Wrap or shard the model for this rank (``distributed.parallelize``) and build the optimizer
        on the parameters that leaves. A one-process checkpoint's optimizer state is read into an
        optimizer on the plain model first, by name, to be split the same way; returns what the
        caller still has to load."""
        tc = self.config.train
        names = {id(p): name for name, p in self.model.named_parameters()}
        trainable_names = {group: [names[id(p)] for p in params] for group, params in trainable.items()}
        full_state = None
        if optimizer_state is not None and not isinstance(optimizer_state, ShardedOptimizerState):
            plain = build_optimizer(trainable, tc)
            self._load_optimizer(plain, optimizer_state)
            full_state = dist_checkpoint.full_optimizer_state(self.model, plain)
            optimizer_state = None
        # Taken before sharding: the pretrained tensors' bytes are whole here, on every rank.
        self.pretrained_fingerprint = None if self.meta_start else fingerprint(self.model, self.from_source)
        self.skip_in_checkpoint = tied_copies(self.model.state_dict(keep_vars=True))
        if not self.config.train.save_frozen:
            self.skip_in_checkpoint |= self.from_source
        text_only = not all(self.train_set.has_image(i) for i in range(len(self.train_set)))
        self.parallel = parallelize(self.model, self.world, self.config, self.device, unused_parameters=text_only)
        if self.meta_start is not None:  # rank 0 writes the checkpoints: it fingerprints the sources
            materialize(self.model, self.meta_start, self.device)
            if self.world.is_main:
                self.pretrained_fingerprint = source_fingerprint(self.model, self.meta_start, self.from_source)
        params = dict(self.model.named_parameters())
        self.optimizer = build_optimizer({group: [params[name] for name in group_names]
                                          for group, group_names in trainable_names.items()}, tc)
        self.expert_params = {params[name] for name in self.parallel.expert_names}
        if full_state is not None:
            dist_checkpoint.load_full_optimizer(self.model, self.optimizer, full_state, self.world,
                                                self.parallel.expert_names, averaged=tc.ema_decay > 0)
        return optimizer_state

    def batches(self):
        """Endless batches; (epoch, batch_in_epoch) always names the next batch, for resume."""
        while True:
            self.sampler.set_position(self.epoch, self.batch_in_epoch)
            self.train_set.set_epoch(self.epoch)
            for batch in self.loader:
                self.batch_in_epoch += 1
                if self.batch_in_epoch == len(self.sampler):
                    self.epoch, self.batch_in_epoch = self.epoch + 1, 0
                batch = usable_batch(batch, self.config.data.on_bad_row)
                if batch is not None:  # else every row of it had an image that failed to decode
                    yield batch
                elif self.world.active:  # skipping it here alone would put this rank a batch ahead of the others
                    raise TrainingError(f"step {self.step}: every row of rank {self.world.rank}'s part of the batch "
                                        f"had an image that failed to decode (data.on_bad_row=skip); fix or remove "
                                        f"those rows, or train on fewer ranks (larger parts)")

    def _record(self, metrics: dict[str, float]) -> None:
        """Into the history (every rank keeps it: the values are the same everywhere) and MLflow (rank 0)."""
        for name, value in metrics.items():
            self.history.setdefault(name, []).append((self.step, value))
        self.tracker.log_metrics(metrics, self.step)

    def _state(self) -> dict:
        state = {"step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
                 "rng": _rng_state(self.device), "history": self.history,
                 "bad_in_a_row": self.bad_in_a_row, "skipped_steps": self.skipped_steps,
                 "mlflow_run_id": self.tracker.run_id, "command_config": self.command_config,
                 **self.selection.state()}
        if self.world.active:
            streams: list = [None] * self.world.size
            dist.all_gather_object(streams, state["rng"])
            state["rank_rng"] = streams[1:]
        return state

    def _averaged(self):
        """The weight average in the model for the duration (train.ema_decay; nothing changes without it)."""
        return self.average.swapped() if self.average is not None else contextlib.nullcontext()

    def save(self) -> None:
        with self._averaged():
            self._save()

    def _save(self) -> None:
        prepared = PreparedModel(self.model, self.tokenizer, self.config, self.from_source)
        if self.world.active:
            self.checkpoints.save_sharded(
                prepared, self._state(), self.world,
                lambda folder: dist_checkpoint.save_shards(folder, self.model, self.optimizer, self.skip_in_checkpoint,
                                                           self.world, self.parallel.expert_names),
                self.pretrained_fingerprint, self.train_set.prepare_image)
        else:
            self.checkpoints.save(prepared, self._state(), self.optimizer, self.train_set.prepare_image)
        self.saved_step = self.step

    def _next_batch(self, batches) -> tuple[dict, int, int]:
        """The next batch and its answer tokens, here and in the whole batch over all ranks; a bad
        row on any rank stops every rank (``World.together``)."""
        try:
            batch, error = next(batches), None
        except MoevlmError as err:
            batch, error = None, err
        labels = 0 if batch is None else int((batch["labels"] != IGNORE_INDEX).sum())
        return batch, labels, self.world.together(error, labels)

    def train_step(self, batches) -> dict[str, float] | None:
        """One optimizer step over ``grad_accum`` micro-batches; None when it was skipped as non-finite."""
        tc = self.config.train
        self.model.train()
        totals = {"loss": 0.0, "lm_loss": 0.0, "balance_loss": 0.0, "z_loss": 0.0}
        tokens = 0
        for micro in range(tc.grad_accum):
            batch, labels, all_labels = self._next_batch(batches)
            mixed = {} if bool(batch["has_image"].all()) else {"has_image": batch["has_image"]}
            batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
            with self.parallel.no_sync(last=micro == tc.grad_accum - 1):
                with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                                    enabled=self.amp_dtype is not None):
                    out = self.forward(batch["images"], batch["input_ids"], batch["attention_mask"], batch["labels"],
                                       label_smoothing=tc.label_smoothing,
                                       **{k: v.to(self.device) for k, v in mixed.items()})
                lm_loss, loss = out.lm_loss, out.loss
                if self.world.active:
                    lm_loss, loss = self._share_of_batch(out, labels, all_labels)
                    # DDP and FSDP average the ranks' gradients: times the world size, they add up.
                    (loss * self.world.size / tc.grad_accum).backward()
                else:
                    (loss / tc.grad_accum).backward()
            totals["loss"] += loss.item() / tc.grad_accum
            totals["lm_loss"] += lm_loss.item() / tc.grad_accum
            for name, value in out.aux.items():
                totals[f"{name}_loss"] += value.item() / tc.grad_accum
            tokens += int(batch["attention_mask"].sum())
            if not self.model.images_in_text:  # prepended image tokens are not in the mask
                tokens += int(batch["has_image"].sum()) * self.model.num_image_tokens
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        if self.world.active:
            if self.parallel.expert_names:
                sync_expert_grads(self.model, self.parallel.expert_names, self.world.replica_group, self.world.size)
            summed = self.world.sum(torch.tensor([*totals.values(), tokens], dtype=torch.float64))
            totals, tokens = dict(zip(totals, summed[:-1].tolist())), int(summed[-1])
            grad_norm = clip_gradients(params, tc.grad_clip, self.world, self.expert_params)
        else:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, tc.grad_clip))
        if not (math.isfinite(totals["loss"]) and math.isfinite(grad_norm)):
            self.optimizer.zero_grad(set_to_none=True)
            self.step += 1  # the batches are used up, so resuming goes on after them
            self._skip(f"loss is {totals['loss']}" if not math.isfinite(totals["loss"])
                       else f"gradient norm is {grad_norm}")
            return None
        self.bad_in_a_row = 0
        lr = tc.lr * lr_factor(self.step, tc.warmup_steps, tc.max_steps, tc.min_lr_ratio)
        for group in self.optimizer.param_groups:
            group["lr"] = group["base_lr"] * lr / tc.lr
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        if self.average is not None:  # a skipped step is no update: the decay's warm-up counts the updates made
            self.average.update(self.step - len(self.skipped_steps))
        totals.update(lr=lr, grad_norm=grad_norm, tokens=tokens)
        return totals

    @staticmethod
    def _share_of_batch(out, labels: int, all_labels: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's share of the whole batch's losses: its answer tokens' cross-entropy summed over
        the answer tokens of all ranks (the aux losses are shares already, MoE.batch_sum); the
        shares add up to the loss one process computes on the whole batch."""
        if labels == 0:  # no answer token here: a mean over none is NaN, the share is 0
            lm_share = out.logits.float().sum() * 0.0
        else:
            lm_share = out.lm_loss * (labels / all_labels)
        return lm_share, out.loss - out.lm_loss + lm_share

    def _skip(self, problem: str) -> None:
        limit = self.config.train.max_bad_steps
        self.bad_in_a_row += 1
        self.skipped_steps.append(self.step)
        if self.bad_in_a_row > limit:
            kept = (f"the checkpoint of step {self.saved_step} in {self.out_dir} is kept"
                    if self.saved_step is not None else "no checkpoint was written")
            raise TrainingError(f"step {self.step}: {problem}, {self.bad_in_a_row} non-finite steps in a row "
                                f"(train.max_bad_steps={limit}): training stopped; {kept}")
        log.warning("step %d: %s; update skipped (%d in a row, train.max_bad_steps=%d)",
                    self.step, problem, self.bad_in_a_row, limit)

    def validate(self) -> dict | None:
        if self.val_set is None or len(self.val_set) == 0:
            return None
        start = time.perf_counter()
        result = evaluate(self.model, self.val_set, self.tokenizer, batch_size=self.config.train.batch_size,
                          max_generate=self.config.train.val_generate, amp_dtype=self.amp_dtype)
        result["seconds"] = time.perf_counter() - start
        self._record({"val/loss": result["loss"], "val/exact_match": result["exact_match"],
                      "val/bleu4": result["bleu4"]})
        # A duration, not a result: logged beside train/tokens_per_s but kept out of the history,
        # which a resumed run must reproduce exactly.
        self.tracker.log_metrics({"val/seconds": result["seconds"]}, self.step)
        return result

    def fit(self) -> dict:
        tc = self.config.train
        batches = self.batches()
        bar = tqdm(total=tc.max_steps, initial=self.step, disable=not (self.progress and self.world.is_main),
                   unit="step", dynamic_ncols=True)
        window_tokens, window_start = 0, time.perf_counter()
        last_val, stop = None, self.selection.stop_reason()  # a resumed run that had stopped early stays stopped
        while self.step < tc.max_steps and stop is None:
            metrics = self.train_step(batches)
            if metrics is not None:
                window_tokens += metrics.pop("tokens")
            if metrics is not None and (self.step % tc.log_every == 0 or self.step == tc.max_steps):
                tokens_per_s = window_tokens / max(1e-9, time.perf_counter() - window_start)
                window_tokens, window_start = 0, time.perf_counter()
                if self.model.moe_layers:  # read from the last forward, only when logged
                    load = self.world.sum(self.model.expert_load())
                    metrics["expert_balance"] = expert_balance(load)
                    decoder = self.model.cfg.decoder
                    if decoder.moe.capacity_factor is not None:  # share of real assignments dropped
                        dropped = self.world.sum(expert_dropped(self.model.moe_layers)).tolist()
                        for i, d, kept in zip(decoder.moe_layer_indices, dropped, load.sum((1, 2)).tolist()):
                            metrics[f"dropped/layer_{i}"] = d / max(1, d + kept)
                self._record({f"train/{k}": v for k, v in metrics.items()} | {"train/tokens_per_s": tokens_per_s})
                bar.set_postfix(loss=f"{metrics['loss']:.3f}", lr=f"{metrics['lr']:.1e}",
                                tok_s=f"{tokens_per_s:,.0f}")
            bar.update(1)
            improved = False
            if self.step % tc.validation_interval == 0 or self.step == tc.max_steps:
                with self._averaged():
                    last_val = self.validate()
                if last_val is not None:
                    improved = self.selection.update(self.step, last_val)
                    self.checkpoints.best = self.selection.best_step
                    stop = self.selection.stop_reason()
                if last_val is not None and self.world.is_main:
                    bar.write(f"step {self.step}: val loss {last_val['loss']:.4f}, exact match "
                              f"{last_val['exact_match']:.3f} on {len(last_val['predictions'])} rows "
                              f"(validation took {last_val['seconds']:.1f} s){' (new best)' if improved else ''}")
            if (self.step % tc.checkpoint_every == 0 or self.step == tc.max_steps or improved
                    or stop is not None):
                self.save()
        bar.close()
        if self.average is not None:  # what was validated and saved is what the caller gets
            self.average.swap()
            self.average = None
        if stop is not None and self.step < tc.max_steps and self.world.is_main:
            bar.write(f"step {self.step}: {stop}")
        return self.finish(last_val)

    def finish(self, last_val: dict | None) -> dict:
        """Plots and sample captions into the run folder and MLflow (rank 0). ``last_val`` is None when
        the run validated nothing (no validation set, or a resume with nothing left to train)."""
        if last_val is None:
            last_val = evaluate(self.model, self.val_set or self.train_set, self.tokenizer,
                                batch_size=self.config.train.batch_size, max_generate=self.config.train.val_generate,
                                amp_dtype=self.amp_dtype)
        if not self.world.is_main:
            return last_val
        loss_png = plots.plot_loss_curves(self.history, self.out_dir / "loss.png", self.selection.best_step)
        artifacts = [loss_png]
        if self.model.moe_layers:
            artifacts.append(plots.plot_expert_load(last_val["expert_load_counts"], self.out_dir / "expert_load.png"))
        samples = "\n".join(f"true: {ref}\npred: {pred}\n" for ref, pred in last_val["predictions"][:50])
        (self.out_dir / "samples.txt").write_text(samples)
        artifacts.append(self.out_dir / "samples.txt")
        for path in artifacts + [self.out_dir / "config.json"]:
            self.tracker.log_artifact(path)
        return last_val
