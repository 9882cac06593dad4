"""The training run's config sections: reading the data, the optimization loop, several processes."""

from __future__ import annotations

from dataclasses import dataclass

from moevlm.config.fields import _check, option


@dataclass(frozen=True)
class DataConfig:
    val_fraction: float = option(0.1, "share held out for validation when --val-data is not given")
    on_bad_row: str = option("error", "a bad row: error (stop with file and row) or skip (skip and count)")
    num_workers: int = option(0, "DataLoader worker processes")
    augment: bool = option(False, "augment training images (never validation images) with the data.aug_* "
                                  "settings, the same way for a given (train.seed, epoch, row)")
    aug_translate: float = option(0.125, "augment: largest shift, as a share of the image side")
    aug_scale: float = option(0.0, "augment: zoom by up to this share in or out (0.1: 0.9x to 1.1x)")
    aug_rotate: float = option(0.0, "augment: largest rotation in degrees")
    aug_color: float = option(0.0, "augment: largest change of brightness and of contrast, as a share (0.2: "
                                   "+-20 %)")
    aug_noise: float = option(0.0, "augment: grain, the standard deviation of noise added to each pixel, as a "
                                   "share of the pixel range (0.1: 25 of 255 levels)")
    max_rows: int | None = option(None, "read at most this many rows (null: all)")
    group_by_length: bool = option(False, "training batches of rows of one modality (image or text-only) and similar "
                                          "length, still shuffled, resumable and the same on any number of ranks: "
                                          "less padding")
    preload: bool = option(True, "true: decode every image once, up front, into memory; false: check images up "
                                 "front and decode them batch by batch in the workers (data larger than memory)")
    image_root: str | None = option(None, "the folder COCO file names (and relative image paths of Hugging Face "
                                          "data) resolve under (null: COCO's train2017/-style folder or the data "
                                          "file's folder); COCO names leading outside it are refused")
    image_column: str | None = option(None, "Hugging Face datasets / Parquet / Arrow: the image column (null: "
                                            "'image' or 'images')")
    text_column: str | None = option(None, "Hugging Face datasets / Parquet / Arrow: the text column (null: "
                                           "'conversations', 'messages', 'texts', 'caption' or 'text')")
    split: str | None = option(None, "the split to read of a data set with several (a DatasetDict folder, an "
                                     "ImageFolder with split folders, hf:NAME); null: train, or the only one "
                                     "(hf:NAME:SPLIT names it too)")
    dedupe: str = option("drop", "rows repeating an earlier row (same image and text): drop (counted in the data "
                                 "summary) or keep; kept repeats stay on one side of the validation split")

    def __post_init__(self):
        _check(0 <= self.val_fraction < 1, "data.val_fraction must be in [0, 1)")
        _check(self.on_bad_row in ("error", "skip"), f"data.on_bad_row must be error or skip, not {self.on_bad_row!r}")
        _check(self.num_workers >= 0, "data.num_workers must be >= 0")
        _check(self.dedupe in ("drop", "keep"), f"data.dedupe must be drop or keep, not {self.dedupe!r}")
        _check(self.split is None or bool(str(self.split).strip()), "data.split must be a split name or null")
        for name in ("aug_translate", "aug_scale", "aug_color", "aug_noise"):
            _check(0 <= getattr(self, name) < 1, f"data.{name} must be in [0, 1)")
        _check(0 <= self.aug_rotate <= 180, "data.aug_rotate must be in [0, 180] degrees")


# The names of the training stages and parameter groups; which groups each stage trains is
# training policy (train/stages.py).
STAGES = ("full", "pretrain", "instruct", "moe")
PARAM_GROUPS = ("vision", "projector", "lm", "moe")
PRECISIONS = ("auto", "fp32", "bf16")
ACTIVATION_CHECKPOINTING = ("none", "full", "selective")
SELECT_METRICS = ("val_loss", "exact_match", "bleu4")


@dataclass(frozen=True)
class TrainConfig:
    batch_size: int = option(32, "rows per micro-batch, over all ranks together under torchrun (each rank takes "
                                 "batch_size / world size)")
    grad_accum: int = option(1, "micro-batches per optimizer step")
    max_steps: int = option(1000, "optimizer steps")
    lr: float = option(1e-3, "peak learning rate (AdamW)")
    min_lr_ratio: float = option(0.1, "the cosine decay ends at lr * min_lr_ratio")
    warmup_steps: int = option(50, "linear warmup steps")
    weight_decay: float = option(0.05, "AdamW weight decay (matrices only)")
    beta1: float = option(0.9, "AdamW beta1")
    beta2: float = option(0.98, "AdamW beta2")
    grad_clip: float = option(1.0, "gradient norm clipping")
    precision: str = option("auto", "auto (bf16 autocast on a GPU that has it, else fp32), fp32 or bf16")
    eval_every: int | None = option(None, "steps between validations (null: every 5 % of max_steps)")
    checkpoint_every: int = option(500, "steps between checkpoints")
    keep_checkpoints: int = option(3, "snapshots kept under checkpoints/; --resume falls back through them")
    max_bad_steps: int = option(10, "non-finite steps (loss or gradient norm) skipped in a row before the run stops")
    log_every: int = option(10, "steps between logged training metrics")
    seed: int = option(0, "seed of the weights, the data order, router noise and dropout")
    device: str = option("auto", "auto, cpu, cuda, cuda:1 ...")
    compile: bool = option(False, "torch.compile the training forward (inductor; needs a C++ compiler on CPU; pays "
                                  "off on long GPU runs)")
    val_generate: int = option(64, "validation rows captioned for exact match at each evaluation")
    stage: str = option("full", "what learns: full (everything), pretrain (the projector), instruct (projector and "
                                "LM, loss on answers), moe (the MoE layers, after upcycling a dense LM)")
    trainable: list | None = option(None, "a list of groups (vision, projector, lm, moe) that overrides the stage's "
                                          "choice")
    lr_vision: float | None = option(None, "learning rate of the vision group (null: train.lr)")
    lr_projector: float | None = option(None, "learning rate of the projector group (null: train.lr)")
    lr_lm: float | None = option(None, "learning rate of the lm group (null: train.lr)")
    lr_moe: float | None = option(None, "learning rate of the moe group (null: train.lr)")
    save_frozen: bool = option(False, "true: checkpoints hold the untrained pretrained weights too; false: they "
                                      "are named in pretrained.json and loaded from their source")
    select: str = option("val_loss", "the validation metric that chooses the best checkpoint: val_loss (lowest), "
                                     "exact_match or bleu4 (highest); ties keep the earlier step")
    patience: int | None = option(None, "stop after this many validations in a row without a new best (null: "
                                        "never stop early)")
    ema_decay: float = option(0.0, "keep an exponential moving average of the weights with this decay (0: off); "
                                   "validation, checkpoints and inference use the average")
    label_smoothing: float = option(0.0, "share of each answer token's target spread over the whole vocabulary "
                                         "(training loss only)")
    activation_checkpointing: str = option("none", "none; full (every block of the towers and the LM keeps only its "
                                                   "input and recomputes the rest in the backward); selective (only "
                                                   "each block's feed-forward or MoE sub-block recomputes)")

    @property
    def validation_interval(self) -> int:
        """Steps between validations: train.eval_every, else 5 % of the run."""
        return self.eval_every or max(1, round(self.max_steps / 20))

    def __post_init__(self):
        _check(self.stage in STAGES, f"train.stage must be {', '.join(STAGES)}, not {self.stage!r}")
        if self.trainable is not None:
            _check(isinstance(self.trainable, list) and self.trainable
                   and all(group in PARAM_GROUPS for group in self.trainable),
                   f"train.trainable must be a non-empty list of {', '.join(PARAM_GROUPS)}, not {self.trainable!r}")
        for name in ("lr_vision", "lr_projector", "lr_lm", "lr_moe"):
            _check(getattr(self, name) is None or getattr(self, name) > 0, f"train.{name} must be positive")
        for name in ("batch_size", "grad_accum", "max_steps", "checkpoint_every", "keep_checkpoints", "log_every"):
            _check(getattr(self, name) >= 1, f"train.{name} must be >= 1")
        _check(self.eval_every is None or self.eval_every >= 1, "train.eval_every must be >= 1 or null")
        _check(0 <= self.ema_decay < 1, "train.ema_decay must be in [0, 1)")
        _check(0 <= self.label_smoothing < 1, "train.label_smoothing must be in [0, 1)")
        _check(self.max_bad_steps >= 0, "train.max_bad_steps must be >= 0")
        _check(self.lr > 0, "train.lr must be positive")
        _check(self.select in SELECT_METRICS,
               f"train.select must be {', '.join(SELECT_METRICS)}, not {self.select!r}")
        _check(self.select == "val_loss" or self.val_generate > 0,
               f"train.select={self.select} needs train.val_generate > 0 (with 0 no row is captioned at validation)")
        _check(self.patience is None or self.patience >= 1, "train.patience must be >= 1 or null")
        _check(self.precision in PRECISIONS, f"train.precision must be {', '.join(PRECISIONS)}, not {self.precision!r}")
        _check(self.activation_checkpointing in ACTIVATION_CHECKPOINTING,
               f"train.activation_checkpointing must be {', '.join(ACTIVATION_CHECKPOINTING)}, "
               f"not {self.activation_checkpointing!r}")


STRATEGIES = ("auto", "ddp", "fsdp")
MIXED_PRECISIONS = ("auto", "bf16", "fp32")
BACKENDS = ("auto", "gloo", "nccl")


@dataclass(frozen=True)
class DistConfig:
    strategy: str = option("auto", "under torchrun: ddp (every rank holds the whole model), fsdp (FSDP2: parameters, "
                                   "gradients and optimizer state sharded across ranks) or auto (ddp when weights, "
                                   "gradients and AdamW state fit in half a rank's memory, else fsdp); one process "
                                   "ignores it")
    expert_parallel: int = option(1, "ranks that split each MoE layer's experts between them (each holds "
                                     "num_experts / E); 1: every rank holds every expert")
    backend: str = option("auto", "auto (nccl on CUDA, gloo on CPU), gloo or nccl")
    timeout_s: int = option(600, "seconds a rank waits for the others in one collective before the run fails")
    mixed_precision: str = option("auto", "FSDP2's parameter dtype: bf16 (weights gathered and computed in bf16, "
                                          "gradients reduced in fp32, fp32 weights in the optimizer), fp32, or auto "
                                          "(bf16 on a CUDA GPU that has it, else fp32); bf16 needs dist.strategy "
                                          "fsdp and no expert parallelism")
    meta_init: bool = option(True, "FSDP with a pretrained LM: build the model on the meta device and have each rank "
                                   "read only its shards of the pretrained weights (no rank holds the whole model); "
                                   "false: every rank builds and loads the whole model, then shards it")

    def __post_init__(self):
        _check(self.strategy in STRATEGIES, f"dist.strategy must be {', '.join(STRATEGIES)}, not {self.strategy!r}")
        _check(self.backend in BACKENDS, f"dist.backend must be {', '.join(BACKENDS)}, not {self.backend!r}")
        _check(self.expert_parallel >= 1, "dist.expert_parallel must be >= 1")
        _check(self.timeout_s >= 1, "dist.timeout_s must be >= 1")
        _check(self.mixed_precision in MIXED_PRECISIONS,
               f"dist.mixed_precision must be {', '.join(MIXED_PRECISIONS)}, not {self.mixed_precision!r}")

