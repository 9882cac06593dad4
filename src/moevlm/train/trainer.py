"""The training loop: AdamW, warmup + cosine, gradient accumulation and clipping, optional bf16
autocast, periodic validation and checkpoints, exact resume, MLflow metrics and plots.

A step whose loss or gradient norm is not finite changes nothing but the counters: no update,
no metrics, a warning. ``train.max_bad_steps`` of them in a row end the run with a
``TrainingError``; the weights then on disk are the last checkpoint written before it.
"""

from __future__ import annotations

import base64
import logging
import math
import time
from functools import partial
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from moevlm.checkpoint import PreparedModel
from moevlm.config import Config
from moevlm.data.dataset import EpochBatchSampler, ImageTextDataset, collate, usable_batch
from moevlm.data.tokenizer_factory import TextTokenizer
from moevlm.device import autocast_dtype, resolve_device
from moevlm.errors import TrainingError
from moevlm.evaluate import evaluate
from moevlm.metrics import expert_balance
from moevlm.models.protocol import VisionLanguageModel
from moevlm.models.vlm import expert_dropped
from moevlm.train import plots
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
            if chosen:
                groups.append({"params": chosen, "weight_decay": decay, "lr": lr, "base_lr": lr, "group": name})
    # The fused kernel updates every tensor in one pass: about half the optimizer time on CPU.
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=True)


def _rng_state(device: torch.device) -> dict:
    state = {"torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()}
    if device.type == "cuda":
        state["cuda"] = base64.b64encode(torch.cuda.get_rng_state(device).numpy().tobytes()).decode()
    return state


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(state["torch"])), dtype=torch.uint8))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(state["cuda"])), dtype=torch.uint8),
                                 device)


class Trainer:
    def __init__(self, config: Config, model: VisionLanguageModel, tokenizer: TextTokenizer,
                 train_set: ImageTextDataset, val_set: ImageTextDataset | None, out_dir: Path, tracker: Tracker,
                 state: dict | None = None, optimizer_state: dict | None = None, progress: bool = True,
                 from_source: set[str] = frozenset(), command_config: dict | None = None):
        """``from_source`` names the pretrained tensors no stage has trained so far (kept out of
        checkpoints, see moevlm/checkpoint.py); ``command_config``:
        the config as the command line gave it, kept in the trainer state for ``--resume`` to check."""
        self.config, self.tokenizer = config, tokenizer
        self.train_set, self.val_set = train_set, val_set
        self.out_dir, self.tracker, self.progress = Path(out_dir), tracker, progress
        self.checkpoints = RunCheckpoints(self.out_dir, config.train.keep_checkpoints)
        tc = config.train
        self.device = resolve_device(tc.device)
        self.amp_dtype = autocast_dtype(tc.precision, self.device)
        self.model = model.to(self.device)
        # Training steps go through the compiled module; it shares the parameters, so
        # checkpoints, evaluation and generation use the plain one.
        self.forward = torch.compile(self.model) if tc.compile else self.model
        trainable = freeze_for_stage(self.model, tc)
        self.from_source = still_from_source(set(from_source), self.model)
        self.optimizer = build_optimizer(trainable, tc)
        if optimizer_state is not None:
            self.optimizer.load_state_dict(optimizer_state)
        self.sampler = EpochBatchSampler(len(train_set), tc.batch_size, seed=tc.seed)
        # Its own generator: a DataLoader draws a seed per iterator, which must not come from
        # the global RNG that router noise and dropout use, or resuming would shift them.
        self.loader = DataLoader(train_set, batch_sampler=self.sampler, num_workers=config.data.num_workers,
                                 collate_fn=partial(collate, pad_id=tokenizer.pad_id),
                                 generator=torch.Generator().manual_seed(tc.seed))
        state = state or {}
        self.step = state.get("step", 0)
        self.epoch, self.batch_in_epoch = state.get("epoch", 0), state.get("batch_in_epoch", 0)
        self.history: dict[str, list] = {k: [tuple(p) for p in v] for k, v in state.get("history", {}).items()}
        self.bad_in_a_row = state.get("bad_in_a_row", 0)
        self.skipped_steps: list[int] = state.get("skipped_steps", [])
        self.saved_step = state.get("step")  # None until this run writes a checkpoint
        self.command_config = command_config
        if "rng" in state:
            _set_rng_state(state["rng"], self.device)

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

    def _record(self, metrics: dict[str, float]) -> None:
        for name, value in metrics.items():
            self.history.setdefault(name, []).append((self.step, value))
        self.tracker.log_metrics(metrics, self.step)

    def _state(self) -> dict:
        return {"step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
                "rng": _rng_state(self.device), "history": self.history,
                "bad_in_a_row": self.bad_in_a_row, "skipped_steps": self.skipped_steps,
                "mlflow_run_id": self.tracker.run_id, "command_config": self.command_config}

    def save(self) -> None:
        prepared = PreparedModel(self.model, self.tokenizer, self.config, self.from_source)
        self.checkpoints.save(prepared, self._state(), self.optimizer, self.train_set.prepare_image)
        self.saved_step = self.step

    def train_step(self, batches) -> dict[str, float] | None:
        """One optimizer step over ``grad_accum`` micro-batches; None when it was skipped as non-finite."""
        tc = self.config.train
        self.model.train()
        totals = {"loss": 0.0, "lm_loss": 0.0, "balance_loss": 0.0, "z_loss": 0.0}
        tokens = 0
        for _ in range(tc.grad_accum):
            batch = next(batches)
            mixed = {} if bool(batch["has_image"].all()) else {"has_image": batch["has_image"]}
            batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
            with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                                enabled=self.amp_dtype is not None):
                out = self.forward(batch["images"], batch["input_ids"], batch["attention_mask"], batch["labels"],
                                   **{k: v.to(self.device) for k, v in mixed.items()})
            (out.loss / tc.grad_accum).backward()
            totals["loss"] += out.loss.item() / tc.grad_accum
            totals["lm_loss"] += out.lm_loss.item() / tc.grad_accum
            for name, value in out.aux.items():
                totals[f"{name}_loss"] += value.item() / tc.grad_accum
            tokens += int(batch["attention_mask"].sum())
            if not self.model.images_in_text:  # prepended image tokens are not in the mask
                tokens += int(batch["has_image"].sum()) * self.model.num_image_tokens
        grad_norm = float(torch.nn.utils.clip_grad_norm_(
            [p for group in self.optimizer.param_groups for p in group["params"]], tc.grad_clip))
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
        totals.update(lr=lr, grad_norm=grad_norm, tokens=tokens)
        return totals

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
        bar = tqdm(total=tc.max_steps, initial=self.step, disable=not self.progress, unit="step",
                   dynamic_ncols=True)
        window_tokens, window_start = 0, time.perf_counter()
        last_val = None
        while self.step < tc.max_steps:
            metrics = self.train_step(batches)
            if metrics is not None:
                window_tokens += metrics.pop("tokens")
            if metrics is not None and (self.step % tc.log_every == 0 or self.step == tc.max_steps):
                tokens_per_s = window_tokens / max(1e-9, time.perf_counter() - window_start)
                window_tokens, window_start = 0, time.perf_counter()
                if self.model.moe_layers:  # read from the last forward, only when logged
                    load = self.model.expert_load()
                    metrics["expert_balance"] = expert_balance(load)
                    decoder = self.model.cfg.decoder
                    if decoder.moe.capacity_factor is not None:  # share of real assignments dropped
                        dropped = expert_dropped(self.model.moe_layers).tolist()
                        for i, d, kept in zip(decoder.moe_layer_indices, dropped, load.sum((1, 2)).tolist()):
                            metrics[f"dropped/layer_{i}"] = d / max(1, d + kept)
                self._record({f"train/{k}": v for k, v in metrics.items()} | {"train/tokens_per_s": tokens_per_s})
                bar.set_postfix(loss=f"{metrics['loss']:.3f}", lr=f"{metrics['lr']:.1e}",
                                tok_s=f"{tokens_per_s:,.0f}")
            bar.update(1)
            if self.step % tc.eval_every == 0 or self.step == tc.max_steps:
                last_val = self.validate()
                if last_val is not None:
                    bar.write(f"step {self.step}: val loss {last_val['loss']:.4f}, exact match "
                              f"{last_val['exact_match']:.3f} on {len(last_val['predictions'])} rows "
                              f"(validation took {last_val['seconds']:.1f} s)")
            if self.step % tc.checkpoint_every == 0 or self.step == tc.max_steps:
                self.save()
        bar.close()
        return self.finish(last_val)

    def finish(self, last_val: dict | None) -> dict:
        """Plots and sample captions into the run folder and MLflow."""
        if last_val is None:
            last_val = evaluate(self.model, self.train_set, self.tokenizer, batch_size=self.config.train.batch_size,
                                max_generate=self.config.train.val_generate, amp_dtype=self.amp_dtype)
        loss_png = plots.plot_loss_curves(self.history, self.out_dir / "loss.png")
        artifacts = [loss_png]
        if self.model.moe_layers:
            artifacts.append(plots.plot_expert_load(last_val["expert_load_counts"], self.out_dir / "expert_load.png"))
        samples = "\n".join(f"true: {ref}\npred: {pred}\n" for ref, pred in last_val["predictions"][:50])
        (self.out_dir / "samples.txt").write_text(samples)
        artifacts.append(self.out_dir / "samples.txt")
        for path in artifacts + [self.out_dir / "config.json"]:
            self.tracker.log_artifact(path)
        return last_val
