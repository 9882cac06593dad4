"""One optimizer step: ``grad_accum`` micro-batches forward and backward (under torchrun, each rank's
share of the whole batch's loss), gradient clipping, the learning-rate schedule and the update.

A step whose loss or gradient norm is not finite changes nothing but the counters: no update,
no metrics, a warning. Up to ``train.max_bad_steps`` of them in a row are skipped so; the next
one in a row ends the run with a ``TrainingError`` (0: the first one does), and the weights then
on disk are the last checkpoint written before it.
"""

from __future__ import annotations

import logging
import math

import torch

from moevlm.data.dataset import IGNORE_INDEX
from moevlm.errors import MoevlmError, TrainingError
from moevlm.models.vlm import weighted_aux
from moevlm.train.distributed import clip_gradients
from moevlm.train.expert_parallel import sync_expert_grads
from moevlm.train.optimizer import lr_factor

log = logging.getLogger(__name__)


class TrainStep:
    """The step of ``train.trainer.Trainer``, which sets up everything it uses (model, optimizer,
    world, parallel wrapper, counters)."""

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

    def _share_of_batch(self, out, labels: int, all_labels: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's share of the whole batch's losses: its answer tokens' cross-entropy summed over
        the answer tokens of all ranks (the aux losses are shares already, MoE.batch_sum); the
        shares add up to the loss one process computes on the whole batch."""
        if labels == 0:
            # No answer token here: the mean over none is NaN, and so is the model's loss; the share
            # is 0, the aux losses' shares stay. Taken through the loss, so that the backward of a
            # vocabulary-parallel head's loss (its collectives) runs on this rank as on the others.
            lm_share = out.lm_loss.nan_to_num(0.0) * 0.0
            return lm_share, lm_share + weighted_aux(out.aux, self.model.cfg.decoder.moe)
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
