"""Building, checkpointing and restoring the state of a pre-training run (`Run`), for `gmim_hub.engine.pretrain`.

Checkpoint layout (a dict of tensors / numbers / strings, loadable with `weights_only=True`):

    {"model": state_dict, "optimizer": ..., "scheduler": ..., "scaler": ... or None,
     "step": int, "epoch": int, "batch_in_epoch": int,
     "rng": capture_rng_state(),                        # rank 0's
     "rank_states": [{"rng": ...}, ...],                # every rank's, by rank
     "config": GMIMConfig.to_dict(), "train_args": PretrainArgs.to_dict() + {"world_size", "precision_resolved"}}

Masks are drawn in the loader workers from per-sample seeds (`gmim_hub.method.draw_masks`), so they need no state of
their own: a rebuilt loader gives the same masks. Checkpoints written before that also hold a "mask_generator" state
(top level and per rank); it is ignored on load.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from gmim_hub.config import GMIMConfig, masking_reach_problems, upgrade_config_dict
from gmim_hub.data import load_datalist, make_dataset, make_loader, pretrain_transforms
from gmim_hub.engine import checkpoint as ckpt
from gmim_hub.engine.distributed import DistInfo, barrier, unwrap_model, wrap_model
from gmim_hub.engine.precision import make_grad_scaler, resolve_precision
from gmim_hub.engine.schedule import warmup_cosine_scheduler
from gmim_hub.errors import ConfigError
from gmim_hub.malloc import tune_malloc_unless_disabled
from gmim_hub.masking import GridChoiced, MaskingCollate, MaskSeedd, check_grids_divide, token_grids

if TYPE_CHECKING:
    from gmim_hub.engine.args import PretrainArgs

logger = logging.getLogger(__name__)

# Settings that must not change across a resume, or the continued run is not the run that was interrupted.
RESUME_KEYS = ("data", "base_dir", "fold", "steps", "batch_size", "lr", "weight_decay", "warmup", "grad_clip",
               "num_workers", "margin", "seed", "world_size", "precision_resolved")


@dataclass
class Run:
    """Everything a training step touches; `step`/`epoch`/`batch_in_epoch` say where the run stands."""

    config: GMIMConfig
    model: nn.Module  # DistributedDataParallel under torchrun
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler | None
    device: torch.device
    precision: str  # resolved: fp32 | bf16 | fp16
    train_loader: Callable[[int], Any]  # epoch -> DataLoader, deterministic per (seed, epoch, rank)
    val_loader: Callable[[], Any] | None
    val_data: list[dict[str, Any]] | None
    train_args: dict[str, Any]
    step: int = 0  # optimizer steps done
    epoch: int = 0
    batch_in_epoch: int = 0  # batches of `epoch` already consumed


def build_run(args: PretrainArgs, config: GMIMConfig, info: DistInfo) -> Run:
    """Check the config and datalists (fail before training), seed, and build model, optimizer and loaders."""
    from gmim_hub.models.hub_models import GMIMForPretraining

    check_grids_divide(config.roi_size, config.masking.grids)
    if min(config.roi_size) < 64:
        raise ConfigError(f"pre-training needs roi_size >= 64 per axis, got {tuple(config.roi_size)}: the "
                          "reconstruction decoder normalises the roi/32 deepest grid, which needs > 1 voxel")
    problems = masking_reach_problems(config)
    if problems:
        raise ConfigError(f"masking: {problems[0]}")
    grids = token_grids(config.roi_size, config.patch_size)
    train_data, val_data = _datalists(args, config)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)  # same initial weights on every rank (DDP also broadcasts rank 0's)
    if info.device.type == "cpu":  # each step's large activations and gradients reuse mapped pages
        tune_malloc_unless_disabled()
    model = GMIMForPretraining(config).to(info.device)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    precision = resolve_precision(args.precision, info.device)
    cache = {"cache": args.cache, "cache_dir": args.cache_dir or Path(args.output_dir) / "cache"}
    train_ds = make_dataset(train_data, pretrain_transforms(config, margin=args.margin, train=True,
                                                            extra=_mask_transforms(config)), **cache)
    val_ds = None
    if val_data:
        val_ds = make_dataset(val_data, pretrain_transforms(config, margin=args.margin, train=False,
                                                            extra=_mask_transforms(config)), **cache)

    collate_fn = MaskingCollate(config.masking, grids)  # the workers draw each batch's masks

    def loader(ds: Any, shuffle: bool, epoch: int) -> Any:
        return make_loader(ds, batch_size=args.batch_size, shuffle=shuffle, num_workers=args.num_workers,
                           seed=args.seed, epoch=epoch, distributed=info.distributed, collate_fn=collate_fn)

    train_args = {**args.to_dict(), "world_size": info.world_size, "precision_resolved": precision}
    return Run(
        config=config, model=wrap_model(model, info), optimizer=optimizer,
        scheduler=warmup_cosine_scheduler(optimizer, args.warmup, args.steps),
        scaler=make_grad_scaler(info.device, precision), device=info.device, precision=precision,
        train_loader=lambda epoch: loader(train_ds, True, epoch),
        val_loader=(lambda: loader(val_ds, False, 0)) if val_ds is not None else None,
        val_data=val_data or None, train_args=train_args,
    )


def _mask_transforms(config: GMIMConfig) -> tuple[Any, ...]:
    """Grid choice and a mask-seed stream for ONE pipeline (masks are drawn in the workers' collate). Each pipeline
    needs its own `MaskSeedd`: a loader reseeds its dataset's random transforms when it is built (with
    num_workers=0, in this process), so a seed stream shared with validation would restart the training masks at
    every validation."""
    return GridChoiced(("image",), config.masking, value_range=config.histogram_range), MaskSeedd()


def _datalists(args: PretrainArgs, config: GMIMConfig) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """Training entries, and validation entries when the datalist has a held-out split (`fold`, or an explicit
    validation list). Every file is checked to exist and be readable NIfTI here."""
    names = config.data.channel_names or None
    kw: dict[str, Any] = {"base_dir": args.base_dir, "fold": args.fold, "channel_names": names}
    train = load_datalist(args.data, split="training", **kw)
    try:
        val = load_datalist(args.data, split="validation", **kw)
    except ConfigError:
        if args.fold is not None:
            raise
        val = None  # no validation split in this datalist: fine for pre-training
    if args.eval_every and not val:
        logger.info("no validation split in %s (pass fold= for a held-out fold); validation is off", args.data)
    return train, val


# ------------------------------------------------------------------------------------------------------- save
def run_state(run: Run, args: PretrainArgs, info: DistInfo) -> dict[str, Any]:
    """The checkpoint dict for the current step. Collective under torchrun: every rank must call it."""
    mine = {"rng": ckpt.capture_rng_state()}
    if info.distributed:
        gathered: list[Any] = [None] * info.world_size
        dist.all_gather_object(gathered, mine)
    else:
        gathered = [mine]
    return {
        "model": unwrap_model(run.model).state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict(),
        "scaler": run.scaler.state_dict() if run.scaler is not None else None,
        "step": run.step,
        "epoch": run.epoch,
        "batch_in_epoch": run.batch_in_epoch,
        "rng": gathered[0]["rng"],
        "rank_states": gathered,
        "config": run.config.to_dict(),
        "train_args": run.train_args,
    }


# ---------------------------------------------------------------------------------------------------- restore
def restore_run(run: Run, args: PretrainArgs, info: DistInfo) -> Path | None:
    """Apply `args.resume`: load the checkpoint it names (or the newest good one for "auto") into `run`.
    Returns the checkpoint used, or None for a fresh start."""
    ckpt_dir = Path(args.output_dir) / "checkpoints"
    path = choose_checkpoint_collective(args.resume, ckpt_dir, info)
    if path is None:
        return None
    state = ckpt.load_checkpoint(path)
    _check_compatible(state, run, path)
    unwrap_model(run.model).load_state_dict(state["model"], strict=True)
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    if run.scaler is not None and state.get("scaler") is not None:
        run.scaler.load_state_dict(state["scaler"])
    run.step, run.epoch, run.batch_in_epoch = int(state["step"]), int(state["epoch"]), int(state["batch_in_epoch"])
    mine = state["rank_states"][info.rank]
    ckpt.restore_rng_state(mine["rng"])  # an older checkpoint's "mask_generator" states are not needed: ignored
    logger.info("resumed from %s at step %d (epoch %d, batch %d)", path, run.step, run.epoch, run.batch_in_epoch)
    return path


def choose_checkpoint_collective(resume: str, ckpt_dir: Path, info: DistInfo) -> Path | None:
    """Rank 0 picks (and verifies) the checkpoint, so only one process cleans up leftovers; others follow.
    Collective under torchrun (pre-training and fine-tuning both use it)."""
    choice: list[Any] = [None]
    error: list[Any] = [None]
    if info.is_main:
        try:
            picked = ckpt.choose_checkpoint(resume, ckpt_dir)
            choice[0] = str(picked) if picked is not None else None
        except Exception as e:  # re-raised on every rank below, so no rank waits forever
            error[0] = e
    if info.distributed:
        dist.broadcast_object_list(choice, src=0)
        dist.broadcast_object_list(error, src=0)
    barrier(info)
    if error[0] is not None:
        raise error[0]
    return Path(choice[0]) if choice[0] is not None else None


def _check_compatible(state: dict[str, Any], run: Run, path: Path) -> None:
    """Refuse to continue a run with different settings: it would no longer be the interrupted run."""
    missing = [k for k in ("model", "optimizer", "scheduler", "step", "rank_states", "config", "train_args")
               if k not in state]
    if missing:
        raise ConfigError(f"{path.name} is not a gmim pre-training checkpoint (missing {', '.join(missing)})")
    if upgrade_config_dict(state["config"]) != run.config.to_dict():  # a version-1 checkpoint resumes as it was
        diff = _diff(upgrade_config_dict(state["config"]), run.config.to_dict())
        raise ConfigError(f"{path.name} was written with a different model config ({diff}); resume with the same "
                          "config, or start over with --resume never in a new --output")
    old, new = state["train_args"], run.train_args
    changed = [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in RESUME_KEYS if old.get(k) != new.get(k)]
    if changed:
        raise ConfigError(f"{path.name} was written with different settings ({'; '.join(changed)}); resume with "
                          "the same settings, or start over with --resume never in a new --output")


def _diff(a: Any, b: Any, prefix: str = "") -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if a.get(k) != b.get(k):
                return _diff(a.get(k), b.get(k), f"{prefix}{k}.")
    return f"{prefix.rstrip('.')}: {a!r} -> {b!r}"
