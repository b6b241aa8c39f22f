"""Fine-tuning: `finetune(args, config)` trains a `GMIMForSegmentation` and writes a Hub-style model folder.

Start: from scratch, from a GMIM pre-training folder/repo (its `swinViT.*` encoder, `from_pretrained_encoder`), or
from a segmentation folder/repo (all weights, `from_pretrained`). The kind of a folder/repo is read from its weights.

Per step: a batch of labelled ROI crops -> forward under autocast -> loss in fp32 (DiceCE with softmax, or Dice +
BCE with sigmoid for multi-label tasks such as BraTS) -> backward with unscale-then-clip -> AdamW -> warmup-cosine.
Every `val_every` steps (and after the last): sliding-window inference on the full validation volumes, hard Dice per
class (argmax or sigmoid > 0.5, background excluded; `gmim_hub.engine.metrics`); the weights with the best mean Dice
are kept as a separate checkpoint.

Exact resume as in pre-training (`gmim_hub.engine.pretrain`): `checkpoints/last/` holds weights, optimizer,
scheduler, grad scaler, step, epoch, batch index, every RNG and the best-so-far; loaders are deterministic per
(seed, epoch), so on resume the epoch's loader is rebuilt and consumed batches are skipped. Validation draws no
random numbers, so it does not perturb the stream.

Data-parallel under torchrun exactly as pre-training (`torchrun ... -m gmim_hub.cli.main train ...`): DDP (gloo on
the CPU, NCCL on GPUs), training data sharded over the ranks, logged losses averaged over the ranks, validation
volumes split over the ranks with the per-case scores gathered (so the report and the best-checkpoint decision are
the same on every rank and equal a one-process validation of the same weights), and every file written by rank 0.
The checkpoint holds every rank's RNG state, so `--resume auto` continues each rank bit for bit.

Each validation also measures HD95 (mm). At the end the best weights are saved with `save_pretrained` to
`output_dir/model`, whose model card carries their validation metrics and the model it started from, and the full
report goes to `output_dir/validation.json`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor

from gmim_hub.config import GMIMConfig
from gmim_hub.engine import checkpoint as ckpt
from gmim_hub.engine.args import FinetuneArgs
from gmim_hub.engine.distributed import (
    DistInfo,
    any_rank,
    barrier,
    cleanup_distributed,
    gather_objects,
    init_distributed,
    reduce_mean,
)
from gmim_hub.engine.evaluate import EvalReport, build_report, evaluate_loader, write_report
from gmim_hub.engine.finetune_setup import FinetuneRun, build_run, ckpt_dir, restore_run, run_state
from gmim_hub.engine.logger import RunLogger
from gmim_hub.engine.precision import autocast_context, deterministic_kernels, optimizer_step
from gmim_hub.errors import NonFiniteLossError
from gmim_hub.intensity import training_reference

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class FinetuneResult:
    output_dir: Path
    model_dir: Path
    final_step: int
    best_step: int  # step of the weights saved in model_dir (the last step when there is no validation)
    report: EvalReport | None  # final validation of the saved weights (Dice + HD95); None without a validation split
    resumed_from: Path | None = None


class FinetuneCallback(Protocol):
    """Progress hooks (the CLI's progress bar implements this)."""

    def on_start(self, start_step: int, total_steps: int) -> None: ...

    def on_step(self, step: int, values: Mapping[str, float]) -> None: ...

    def on_validation(self, step: int, mean_dice: float, best_dice: float) -> None: ...

    def on_end(self, step: int) -> None: ...


def finetune(args: FinetuneArgs, config: GMIMConfig | None = None,
             callback: FinetuneCallback | None = None) -> FinetuneResult:
    """Fine-tune as `args` says; returns where the outputs are. `config` gives the architecture and the task (labels,
    preprocessing); None is allowed only when `args.init` is a segmentation model (its own config is used). Under
    `torchrun` (WORLD_SIZE > 1) it runs data-parallel; rank 0 writes everything and alone calls `callback`."""
    info = init_distributed(args.device)
    try:
        with deterministic_kernels(args.deterministic, info.device):
            return _finetune(args, config, info, callback if info.is_main else None)
    finally:
        cleanup_distributed()


def _finetune(args: FinetuneArgs, config: GMIMConfig | None, info: DistInfo,
              callback: FinetuneCallback | None) -> FinetuneResult:
    out = Path(args.output_dir)
    run = build_run(args, config, info)  # datalists and the init model are checked here, before any training
    resumed_from = restore_run(run, args)
    if callback is not None:
        callback.on_start(run.step, run.total_steps)
    with RunLogger(out, enabled=info.is_main, resume_step=run.step) as log:
        if run.step < run.total_steps:
            _loop(run, args, log, callback)
        report = _final_report(run, args, log)
    model_dir = _save_model(run, args, report)
    if callback is not None:
        callback.on_end(run.step)
    best_step = run.best_step if run.best_step >= 0 else run.step
    return FinetuneResult(out, model_dir, run.step, best_step, report, resumed_from)


# ------------------------------------------------------------------------------------------------------- loop
def _loop(run: FinetuneRun, args: FinetuneArgs, log: RunLogger, callback: FinetuneCallback | None) -> None:
    """Train until `run.total_steps`, epoch by epoch, from wherever `run` stands."""
    sums: dict[str, float] = {}
    n, t0 = 0, time.perf_counter()
    while run.step < run.total_steps:
        it = iter(run.train_loader(run.epoch))
        for _ in range(run.batch_in_epoch):  # consumed before the checkpoint we resumed from
            next(it)
        for batch in it:
            values = _train_step(run, batch, args)
            run.step += 1
            run.batch_in_epoch += 1
            n += 1
            for k, v in values.items():
                sums[k] = sums.get(k, 0.0) + v
            if callback is not None:
                callback.on_step(run.step, values)
            done = run.step >= run.total_steps
            if run.step % args.log_every == 0 or done:  # collective: every rank logs at the same steps
                means = reduce_mean({k: v / n for k, v in sums.items() if k != "lr"}, run.info)
                log.log(run.step, {**means, "lr": values["lr"], "time": (time.perf_counter() - t0) / n})
                sums, n, t0 = {}, 0, time.perf_counter()
            _after_step(run, args, log, callback, done)
            if done:
                break
        else:
            run.epoch += 1
            run.batch_in_epoch = 0


def _train_step(run: FinetuneRun, batch: dict[str, Any], args: FinetuneArgs) -> dict[str, float]:
    x, y = _plain(batch["image"], run.device), _plain(batch["label"], run.device)
    lr = float(run.scheduler.get_last_lr()[0])
    with autocast_context(run.device, run.precision):
        logits = run.model(x)
    loss = run.loss_fn(logits.float(), y)  # in fp32: Dice sums over many voxels
    if any_rank(not bool(torch.isfinite(loss)), run.info):  # all ranks stop together, before backward
        raise NonFiniteLossError(f"the loss became non-finite at step {run.step + 1} ({float(loss)} on rank "
                                 f"{run.info.rank}); training "
                                 "stopped, the last good checkpoint is kept. Lower --lr, check the labels, or try "
                                 "--precision fp32")
    params = [p for p in run.model.parameters() if p.requires_grad]
    grad_norm = optimizer_step(loss, run.optimizer, params, run.scaler, args.grad_clip or None)
    run.scheduler.step()
    return {"loss": float(loss.detach()), "lr": lr, "grad_norm": grad_norm}


def _after_step(run: FinetuneRun, args: FinetuneArgs, log: RunLogger, callback: FinetuneCallback | None,
                done: bool) -> None:
    """Validate (and keep the best weights), then checkpoint the last state, in that order."""
    if run.val_loader is not None and ((args.val_every and run.step % args.val_every == 0) or done):
        report = validate(run, args)
        score = report.mean_dice if math.isfinite(report.mean_dice) else 0.0
        log.log(run.step, {"mean_dice": report.mean_dice, "mean_hd95_mm": report.mean_hd95,
                           **{f"dice/{k}": v for k, v in report.dice.items()}}, prefix="val")
        if score > run.best_dice:
            run.best_dice, run.best_step, run.best_report = score, run.step, report
            if run.info.is_main:  # the same decision on every rank: the report is gathered
                ckpt.save_checkpoint(ckpt_dir(args, "best"), run.step, {"model": run.segmenter.state_dict(),
                                                                         "step": run.step, "mean_dice": score}, keep=1)
            barrier(run.info)
        if callback is not None:
            callback.on_validation(run.step, report.mean_dice, run.best_dice)
    if (args.ckpt_every and run.step % args.ckpt_every == 0) or done:
        state = run_state(run)  # collective: gathers every rank's RNG state
        if run.info.is_main:
            ckpt.save_checkpoint(ckpt_dir(args, "last"), run.step, state, keep=args.keep_checkpoints)
        barrier(run.info)


def validate(run: FinetuneRun, args: FinetuneArgs) -> EvalReport:
    """Sliding-window Dice (and HD95) of the current weights on the validation volumes. Under torchrun each rank
    scores its round-robin share and the cases are gathered back into datalist order, so every rank returns the
    report one process would compute."""
    report = evaluate_loader(run.segmenter, run.val_loader(), run.config, device=run.device,  # type: ignore[misc]
                             sw_batch_size=args.sw_batch_size, overlap=args.overlap,
                             model_name=str(Path(args.output_dir) / "model"))
    if not run.info.distributed:
        return report
    shards = gather_objects(list(report.cases), run.info)
    cases = [shards[i % len(shards)][i // len(shards)] for i in range(sum(map(len, shards)))]
    return build_report(cases, model=report.model, split=report.split, class_names=report.class_names)


def _plain(t: Any, device: torch.device) -> Tensor:
    t = t.as_tensor() if hasattr(t, "as_tensor") else torch.as_tensor(t)
    return t.to(device, non_blocking=True)


# ------------------------------------------------------------------------------------------------------ final
def _final_report(run: FinetuneRun, args: FinetuneArgs, log: RunLogger) -> EvalReport | None:
    """Load the best weights (if there was validation) and their Dice / HD95 report: the one computed when they
    were validated in this process, else (the best came before a resume) a fresh scoring of the loaded weights."""
    if run.val_loader is None:
        return None
    barrier(run.info)  # rank 0 wrote the best checkpoint; every rank loads it
    found = ckpt.load_latest_checkpoint(ckpt_dir(args, "best"))
    report = run.best_report
    if found is not None:
        path, best = found
        if int(best["step"]) != run.best_step:
            logger.warning("%s is from step %s, but the best validation was at step %d", path, best["step"],
                           run.best_step)
            report = None
        run.segmenter.load_state_dict(best["model"], strict=True)
    if report is None:
        report = validate(run, args)
    if run.info.is_main:
        write_report(report, Path(args.output_dir) / "validation.json")
    log.log(run.step, {"best_step": run.best_step, **report.card_metrics()}, prefix="final")
    return report


def _save_model(run: FinetuneRun, args: FinetuneArgs, report: EvalReport | None) -> Path:
    model_dir = Path(args.output_dir) / "model"
    metrics = report.card_metrics() if report is not None else None
    if run.info.is_main:
        images = [im for im in run.train_images if isinstance(im, (str, Path))]  # one file per volume, not per channel
        if images:  # what the model was trained on, for prediction's "does not look like the training data" warning
            data = dataclasses.replace(run.config.data, reference=training_reference(images, run.config.data))
            run.segmenter.config = dataclasses.replace(run.config, data=data)
        run.segmenter.save_pretrained(model_dir, base_model=run.base_model, metrics=metrics or None,
                                      eval_dataset=_dataset_name(args) if metrics else None)
        logger.info("wrote the fine-tuned model to %s", model_dir)
    barrier(run.info)
    return model_dir


def _dataset_name(args: FinetuneArgs) -> str:
    """'<name> validation' from the datalist's "name" field (MSD), else its file name."""
    import json

    path = Path(args.data)
    try:
        name = json.loads(path.read_text()).get("name") or path.stem
    except (OSError, ValueError, AttributeError):
        name = path.stem
    return f"{name} validation" + (f" (fold {args.fold})" if args.fold is not None else "")
