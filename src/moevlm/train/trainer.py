"""The training loop: AdamW, warmup + cosine, gradient accumulation and clipping, optional bf16
autocast, periodic validation and checkpoints, exact resume, MLflow metrics and plots.

Each validation is compared with the best so far (``train.select``, train/selection.py). A
validation that sets a new best is saved as a snapshot even when it is not a ``checkpoint_every``
step: its weights exist at that step only, and inference (``--checkpoint best``) reads the
snapshot. The rotation keeps the best snapshot beside the newest ones. ``train.patience``
validations in a row without a new best end the run as ``max_steps`` would.

With ``train.ema_decay`` the weight average (train/ema.py) is what validation scores, what
checkpoints hold as weights and what the trainer leaves in the model when ``fit`` returns.

One step (micro-batches, clipping, the update, the non-finite rule) is train/step.py; the optimizer and
its schedule train/optimizer.py; the random streams a checkpoint keeps train/rng.py.
"""

from __future__ import annotations

import contextlib
import time
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from moevlm.checkpoint import PreparedModel, ShardedOptimizerState, fingerprint, tied_copies
from moevlm.config import Config
from moevlm.data.dataset import EpochBatchSampler, ImageTextDataset, collate, usable_batch
from moevlm.data.length_groups import LengthGroupedBatchSampler
from moevlm.data.tokenizer_factory import TextTokenizer
from moevlm.device import autocast_dtype, resolve_device
from moevlm.errors import CheckpointError, ConfigError, TrainingError
from moevlm.evaluate import evaluate
from moevlm.metrics import expert_balance
from moevlm.models.protocol import VisionLanguageModel
from moevlm.models.vlm import expert_dropped
from moevlm.train import dist_checkpoint, plots
from moevlm.train.checkpointing import apply_activation_checkpointing
from moevlm.train.distributed import RankBatches, World, parallelize
from moevlm.train.ema import WeightAverage
from moevlm.train.materialize import MetaStart, materialize, source_fingerprint
from moevlm.train.optimizer import build_optimizer
from moevlm.train.rng import rank_seed, rng_state, set_rng_state
from moevlm.train.selection import Selection
from moevlm.train.snapshots import RunCheckpoints
from moevlm.train.stages import freeze_for_stage, still_from_source
from moevlm.train.step import TrainStep
from moevlm.train.tracking import Tracker


class Trainer(TrainStep):
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
            set_rng_state(state["rng"], self.device)
        elif self.world.rank > 0:
            ranks = state.get("rank_rng", [])
            if len(ranks) == self.world.size - 1:  # resumed on as many ranks: each goes on with its own stream
                set_rng_state(ranks[self.world.rank - 1], self.device)
            else:
                torch.manual_seed(rank_seed(tc.seed, self.world.rank, self.step))

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
                 "rng": rng_state(self.device), "history": self.history,
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
