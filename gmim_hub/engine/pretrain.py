"""GMIM pre-training: `pretrain(args, config)` runs the whole recipe and writes a Hub-style model folder.

Per step: a batch of two-view crops (grid choice and cell ratios computed in the loader workers) -> token masks
from a seeded `torch.Generator` -> forward -> `gmim_loss` on the voxels masked at the first insertion point ->
backward with unscale-then-clip -> AdamW -> warmup-cosine lr -> EMA target update (a no-op at momentum 0).

Exact resume. Everything the next step depends on is in the checkpoint: weights, optimizer, scheduler, grad scaler,
the step, the epoch and the batch index inside it, every RNG (python, numpy, torch, and the fallback mask generator
of every rank), the config and the run arguments. Loaders are deterministic per (seed, epoch, rank), masks included
(they are drawn in the loader workers, `gmim_hub.masking.MaskingCollate`), so on resume the epoch's loader is
rebuilt and the batches already consumed are skipped. On the CPU the resumed run's final weights equal an
uninterrupted run's bit for bit (tests/test_resume.py kills a run with SIGKILL and checks this).

The library prints nothing: progress goes to an optional `PretrainCallback` (the CLI draws a rich progress bar),
records to `metrics.jsonl` and TensorBoard, pictures to `previews/`, all on rank 0 only.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, cast

import numpy as np

from gmim_hub.config import GMIMConfig
from gmim_hub.engine import checkpoint as ckpt
from gmim_hub.engine.args import PretrainArgs
from gmim_hub.engine.distributed import (
    DistInfo,
    any_rank,
    barrier,
    cleanup_distributed,
    init_distributed,
    reduce_mean,
    unwrap_model,
)
from gmim_hub.engine.logger import RunLogger
from gmim_hub.engine.precision import deterministic_kernels
from gmim_hub.engine.pretrain_setup import Run, build_run, restore_run, run_state
from gmim_hub.engine.pretrain_step import StepResult, forward_step, update_step, validate
from gmim_hub.engine.previews import save_preview
from gmim_hub.errors import ConfigError, NonFiniteLossError

if TYPE_CHECKING:
    from gmim_hub.models.hub_models import GMIMForPretraining

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PretrainResult:
    output_dir: Path
    model_dir: Path
    final_step: int
    metrics: dict[str, float]  # the last training record (loss, cc, rec, lr, ...), plus val_* if validated
    resumed_from: Path | None = None


class PretrainCallback(Protocol):
    """Progress hooks, called on rank 0 only (the CLI's progress bar implements this)."""

    def on_start(self, start_step: int, total_steps: int) -> None: ...

    def on_step(self, step: int, values: Mapping[str, float]) -> None: ...

    def on_end(self, step: int) -> None: ...


def pretrain(args: PretrainArgs, config: GMIMConfig, callback: PretrainCallback | None = None) -> PretrainResult:
    """Pre-train a `GMIMForPretraining` as `args` says; returns where the outputs are. Under `torchrun`
    (WORLD_SIZE > 1) it runs data-parallel; rank 0 writes everything."""
    info = init_distributed(args.device)
    try:
        with deterministic_kernels(args.deterministic, info.device):
            return _pretrain(args, config, info, callback)
    finally:
        cleanup_distributed()


def _pretrain(args: PretrainArgs, config: GMIMConfig, info: DistInfo,
              callback: PretrainCallback | None) -> PretrainResult:
    out = Path(args.output_dir)
    run = build_run(args, config, info)  # datalists are checked here, before any training
    resumed_from = restore_run(run, args, info)
    if info.is_main and callback is not None:
        callback.on_start(run.step, args.steps)
    last: dict[str, float] = {}
    with RunLogger(out, enabled=info.is_main, resume_step=run.step) as log:
        if run.step < args.steps:
            last = _loop(run, args, info, log, callback)
        barrier(info)
        model_dir = out / "model"
        if info.is_main:
            cast("GMIMForPretraining", unwrap_model(run.model)).save_pretrained(model_dir)
            logger.info("wrote the pre-trained model to %s", model_dir)
        barrier(info)
    if info.is_main and callback is not None:
        callback.on_end(run.step)
    return PretrainResult(out, model_dir, run.step, last, resumed_from)


def _loop(run: Run, args: PretrainArgs, info: DistInfo, log: RunLogger,
          callback: PretrainCallback | None) -> dict[str, float]:
    """Train until `args.steps` optimizer steps are done, epoch by epoch, from wherever `run` stands."""
    meter = _Meter()
    last: dict[str, float] = {}
    while run.step < args.steps:
        loader = run.train_loader(run.epoch)
        if len(loader) == 0:
            raise ConfigError("the training loader yields no batches; add images or lower --batch-size")
        it = iter(loader)
        for _ in range(run.batch_in_epoch):  # already consumed before the checkpoint we resumed from
            next(it)
        for batch in it:
            result = forward_step(run, batch)
            _check_finite(result, run.step, info)  # before backward: no NaN reaches the weights or the optimizer
            update_step(run, result, args)
            _check_finite_grad(run, result)
            run.step += 1
            run.batch_in_epoch += 1
            meter.add(result)
            if info.is_main and callback is not None:
                callback.on_step(run.step, result.values)
            last = _after_step(run, args, info, log, meter, result) or last
            if run.step >= args.steps:
                break
        else:
            run.epoch += 1
            run.batch_in_epoch = 0
    return last


def _after_step(run: Run, args: PretrainArgs, info: DistInfo, log: RunLogger, meter: _Meter,
                result: StepResult) -> dict[str, float] | None:
    """Periodic work after optimizer step `run.step`: log, preview, validate, checkpoint (in that order)."""
    step, done = run.step, run.step >= args.steps
    record = None
    if step % args.log_every == 0 or done:
        record = meter.flush(info)
        log.log(step, record)
    if info.is_main and args.preview_every and (step % args.preview_every == 0 or done):
        _preview(run, result, step, Path(args.output_dir))
    if run.val_data is not None and args.eval_every and (step % args.eval_every == 0 or done):
        val = validate(run, args, info)
        log.log(step, val, prefix="val")
        record = {**(record or {}), **val}
    if (args.ckpt_every and step % args.ckpt_every == 0) or done:
        _save(run, args, info)
    return record


def _save(run: Run, args: PretrainArgs, info: DistInfo) -> None:
    state = run_state(run, args, info)  # collective: gathers every rank's RNG states
    if info.is_main:
        ckpt.save_checkpoint(Path(args.output_dir) / "checkpoints", run.step, state, keep=args.keep_checkpoints)
    barrier(info)


def _preview(run: Run, result: StepResult, step: int, out: Path) -> None:
    p = result.preview
    save_preview(out / "previews" / f"step-{step:08d}.png", p["image"], p["loss_mask"], p["reconstruction"],
                 p["grid"], p["ratios"], step=step)


def _check_finite(result: StepResult, step: int, info: DistInfo) -> None:
    bad = not all(np.isfinite(v) for v in result.components.values())
    if any_rank(bad, info):
        parts = ", ".join(f"{k}={v:.6g}" for k, v in result.components.items())
        where = f" on rank {info.rank}" if info.distributed and bad else ""
        raise NonFiniteLossError(
            f"the loss became non-finite at step {step + 1}{where} ({parts}); training stopped, the last good "
            "checkpoint is kept. Lower --lr, check the images for extreme values, or try --precision fp32"
        )


def _check_finite_grad(run: Run, result: StepResult) -> None:
    """Without a GradScaler an inf/NaN gradient is a real overflow (the update was skipped): stop, like for the
    loss. The norm is computed after DDP's all-reduce, so every rank takes the same decision."""
    if run.scaler is None and not np.isfinite(result.grad_norm):
        parts = ", ".join(f"{k}={v:.6g}" for k, v in result.components.items())
        raise NonFiniteLossError(
            f"the gradient became non-finite at step {run.step + 1} (grad_norm={result.grad_norm}, {parts}); the "
            "update was skipped and training stopped, the last good checkpoint is kept. Lower --lr or try "
            "--precision fp32"
        )


class _Meter:
    """Averages the per-step values between two log records (reduced across ranks at flush time)."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.n = 0
        self.t0 = time.perf_counter()
        self.start = self.t0
        self.lr = float("nan")

    def add(self, result: StepResult) -> None:
        for k, v in result.values.items():
            if k != "lr":
                self.sums[k] = self.sums.get(k, 0.0) + float(v)
        self.lr = result.lr
        self.n += 1

    def flush(self, info: DistInfo) -> dict[str, float]:
        now = time.perf_counter()
        record = reduce_mean({k: v / max(self.n, 1) for k, v in self.sums.items()}, info)
        record["lr"] = self.lr  # the lr of the last step in the interval
        record["time"] = (now - self.t0) / max(self.n, 1)
        record["elapsed"] = now - self.start
        self.sums, self.n, self.t0 = {}, 0, now
        return record
