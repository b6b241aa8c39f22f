"""The settings of a pre-training run (`PretrainArgs`) and of a fine-tuning run (`FinetuneArgs`): everything about a
run that is not the model or the method (those live in `gmim_hub.config.GMIMConfig`). Both are checked when made, so a
bad value fails before anything is written. `gmim_hub.engine.pretrain` and `gmim_hub.engine.finetune` re-export
them; the run-building modules beside them import them from here."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gmim_hub.data.cache import cache_mode
from gmim_hub.errors import ConfigError


@dataclass(frozen=True)
class PretrainArgs:
    """Run settings (the model and method live in `GMIMConfig`). Defaults are the paper's CT run, except
    weight decay 1e-5 from the README (the code default was 0.1) and grad clipping that actually applies under AMP."""

    data: str | Path  # a folder of NIfTI files, an MSD dataset.json, or a JSON datalist (with folds)
    output_dir: str | Path
    base_dir: str | Path | None = None  # relative datalist paths resolve here (default: the datalist's folder)
    fold: int | None = None  # held-out validation fold of the datalist; None: its explicit validation list if any
    steps: int = 4000  # optimizer steps, exactly (the original could run steps+1)
    batch_size: int = 2  # volumes per step per process; each gives one (x, y) pair of ROI crops
    lr: float = 4e-4
    weight_decay: float = 1e-5
    warmup: int = 500  # linear warmup steps, then cosine to 0 at `steps`
    grad_clip: float = 1.0  # max global grad norm; 0 disables
    precision: str = "auto"  # fp32 | bf16 | fp16 | auto (bf16 where supported, else fp16 + GradScaler)
    device: str = "auto"  # auto | cpu | cuda
    deterministic: bool | None = None  # deterministic kernels; None: on for the CPU (exact resume), off on GPUs
    num_workers: int = 2  # data-loader processes per rank; keep it fixed across a resume
    cache: str = "none"  # none | memory | disk: keep the deterministic preprocessing (True = memory, False = none)
    cache_dir: str | Path | None = None  # for cache="disk"; default output_dir/cache
    margin: int = 32  # outer crop = roi + margin: the two views are at most `margin` voxels apart per axis
    seed: int = 0
    log_every: int = 10  # steps between metrics.jsonl / TensorBoard records
    eval_every: int = 200  # steps between validations (0: never); needs a validation split
    val_batches: int | None = None  # cap on validation batches (None: the whole split)
    ckpt_every: int = 100  # steps between checkpoints (0: only at the end)
    keep_checkpoints: int = 2
    preview_every: int = 200  # steps between PNG previews (0: never)
    resume: str = "auto"  # auto: continue from the newest good checkpoint | never | a checkpoint path

    def __post_init__(self) -> None:
        object.__setattr__(self, "cache", cache_mode(self.cache))
        for name in ("steps", "batch_size"):
            v = getattr(self, name)
            if not (isinstance(v, int) and v >= 1):
                raise ConfigError(f"{name} must be an int >= 1, got {v!r}")
        for name in ("warmup", "num_workers", "seed", "log_every", "eval_every", "ckpt_every", "preview_every"):
            v = getattr(self, name)
            if not (isinstance(v, int) and v >= 0):
                raise ConfigError(f"{name} must be an int >= 0, got {v!r}")
        if self.log_every < 1:
            raise ConfigError(f"log_every must be >= 1, got {self.log_every!r}")
        if self.warmup >= self.steps:
            raise ConfigError(f"warmup must be < steps, got warmup={self.warmup} with steps={self.steps}; "
                              "lower --warmup or raise --steps")
        if not (self.lr > 0 and np.isfinite(self.lr)):
            raise ConfigError(f"lr must be a positive finite number, got {self.lr!r}")
        if not self.weight_decay >= 0:
            raise ConfigError(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        if not self.grad_clip >= 0:
            raise ConfigError(f"grad_clip must be >= 0 (0 disables), got {self.grad_clip!r}")
        if self.keep_checkpoints < 1:
            raise ConfigError(f"keep_checkpoints must be >= 1, got {self.keep_checkpoints!r}")
        if self.val_batches is not None and self.val_batches < 1:
            raise ConfigError(f"val_batches must be None or >= 1, got {self.val_batches!r}")
        if self.precision not in ("fp32", "bf16", "fp16", "auto"):
            raise ConfigError(f"precision must be fp32, bf16, fp16 or auto, got {self.precision!r}")
        if not isinstance(self.resume, str) or not self.resume:
            raise ConfigError(f"resume must be 'auto', 'never' or a checkpoint path, got {self.resume!r}")

    def to_dict(self) -> dict[str, Any]:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(self).items()}



@dataclass(frozen=True)
class FinetuneArgs:
    """Run settings (the architecture and the task's labels live in `GMIMConfig`). lr 1e-4 follows MONAI's Swin
    UNETR BraTS recipe; the GMIM code used 1e-5, which is slow for short runs."""

    data: str | Path  # an MSD dataset.json or a JSON datalist (labelled)
    output_dir: str | Path
    base_dir: str | Path | None = None  # relative datalist paths resolve here (default: the datalist's folder)
    fold: int | None = None  # validation fold; None: the datalist's explicit validation list, if any
    fraction: float = 1.0  # keep ceil(fraction * N) training volumes (label-efficient runs)
    init: str = "scratch"  # scratch | a pre-training folder/repo | a segmentation folder/repo
    revision: str | None = None  # of `init` on the Hub
    steps: int | None = None  # optimizer steps; exactly one of steps / epochs
    epochs: int | None = None  # passes over the training volumes
    batch_size: int = 1  # volumes per step
    num_samples: int = 2  # random ROI crops per volume (half centred on foreground); a step sees batch*samples
    lr: float = 1e-4
    weight_decay: float = 1e-5
    warmup: int = 0  # linear warmup steps, then cosine to 0
    grad_clip: float = 1.0  # max global grad norm, applied after unscaling; 0 disables
    loss: str = "dicece"  # dicece | dice
    precision: str = "auto"  # fp32 | bf16 | fp16 | auto
    device: str = "auto"  # auto | cpu | cuda
    deterministic: bool | None = None  # deterministic kernels; None: on for the CPU (exact resume), off on GPUs
    num_workers: int = 0  # data-loader processes per rank; keep it fixed across a resume
    cache: str = "none"  # none | memory | disk: keep the deterministic preprocessing (True = memory, False = none)
    cache_dir: str | Path | None = None  # for cache="disk"; default output_dir/cache
    seed: int = 0
    val_every: int = 100  # steps between validations (0: only at the end)
    sw_batch_size: int = 1  # windows per forward in sliding-window validation
    overlap: float = 0.5  # sliding-window overlap
    log_every: int = 10
    ckpt_every: int = 100  # steps between checkpoints of the last state (0: only at the end)
    keep_checkpoints: int = 2
    resume: str = "auto"  # auto: continue from the newest good checkpoint | never | a checkpoint path
    freeze_encoder: bool = False  # train only the decoder (the original's `--partial_finetune`, inverted)

    def __post_init__(self) -> None:
        object.__setattr__(self, "cache", cache_mode(self.cache))
        if (self.steps is None) == (self.epochs is None):
            raise ConfigError(f"pass exactly one of steps or epochs, got steps={self.steps!r}, epochs={self.epochs!r}")
        for name in ("steps", "epochs"):
            v = getattr(self, name)
            if v is not None and not (isinstance(v, int) and v >= 1):
                raise ConfigError(f"{name} must be an int >= 1, got {v!r}")
        for name in ("batch_size", "num_samples", "sw_batch_size", "log_every", "keep_checkpoints"):
            v = getattr(self, name)
            if not (isinstance(v, int) and v >= 1):
                raise ConfigError(f"{name} must be an int >= 1, got {v!r}")
        for name in ("warmup", "num_workers", "seed", "val_every", "ckpt_every"):
            v = getattr(self, name)
            if not (isinstance(v, int) and v >= 0):
                raise ConfigError(f"{name} must be an int >= 0, got {v!r}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"lr must be a positive finite number, got {self.lr!r}")
        if not (self.weight_decay >= 0 and self.grad_clip >= 0):
            raise ConfigError(f"weight_decay and grad_clip must be >= 0, got {self.weight_decay!r}, {self.grad_clip!r}")
        if not 0.0 <= self.overlap < 1.0:
            raise ConfigError(f"overlap must be in [0, 1), got {self.overlap!r}")
        if self.loss not in ("dicece", "dice"):
            raise ConfigError(f"loss must be 'dicece' or 'dice', got {self.loss!r}")
        if self.precision not in ("fp32", "bf16", "fp16", "auto"):
            raise ConfigError(f"precision must be fp32, bf16, fp16 or auto, got {self.precision!r}")
        if not isinstance(self.resume, str) or not self.resume:
            raise ConfigError(f"resume must be 'auto', 'never' or a checkpoint path, got {self.resume!r}")
        if not isinstance(self.init, str) or not self.init:
            raise ConfigError(f"init must be 'scratch' or a model folder / Hub repo id, got {self.init!r}")

    def to_dict(self) -> dict[str, Any]:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(self).items()}
