"""Building, checkpointing and restoring a fine-tuning run (`FinetuneRun`), for `gmim_hub.engine.finetune`.

Checkpoints (dicts of tensors / numbers / strings, loadable with `weights_only=True`, written atomically by
`gmim_hub.engine.checkpoint`):

    checkpoints/last/ckpt-N.pt  {"model", "optimizer", "scheduler", "scaler", "step", "epoch", "batch_in_epoch",
                                 "best_dice", "best_step", "rng", "rank_states", "config", "train_args"}
                                (resume from here; "rng" is rank 0's, "rank_states" every rank's RNG by rank)
    checkpoints/best/ckpt-N.pt  {"model", "step", "mean_dice"}                              (best validation)

Under torchrun (WORLD_SIZE > 1) the model is wrapped in DistributedDataParallel, the training data are sharded by a
`DistributedSampler` (each rank has its own augmentation stream), the validation volumes are split round-robin
over the ranks (their scores are gathered, so every rank holds the same report), and only rank 0 writes files.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from gmim_hub.config import GMIMConfig, upgrade_config_dict
from gmim_hub.data import finetune_transforms, load_datalist, make_dataset, make_loader
from gmim_hub.data.datalist import read_task
from gmim_hub.engine import checkpoint as ckpt
from gmim_hub.engine.distributed import DistInfo, unwrap_model, wrap_model
from gmim_hub.engine.precision import make_grad_scaler, resolve_precision
from gmim_hub.engine.pretrain_setup import choose_checkpoint_collective
from gmim_hub.engine.schedule import warmup_cosine_scheduler
from gmim_hub.errors import ConfigError, WeightsError
from gmim_hub.malloc import tune_malloc_unless_disabled

if TYPE_CHECKING:
    from gmim_hub.engine.args import FinetuneArgs
    from gmim_hub.models.hub_models import GMIMForSegmentation

logger = logging.getLogger(__name__)

# Settings that must not change across a resume, or the continued run is not the run that was interrupted.
RESUME_KEYS = ("data", "base_dir", "fold", "fraction", "init", "revision", "total_steps", "batch_size",
               "num_samples", "lr", "weight_decay", "warmup", "grad_clip", "loss", "num_workers", "seed",
               "freeze_encoder", "val_every", "precision_resolved", "deterministic", "world_size")


@dataclass
class FinetuneRun:
    """Everything a training step touches; `step` / `epoch` / `batch_in_epoch` say where the run stands, and
    `best_dice` / `best_step` which validated weights are in `checkpoints/best`."""

    config: GMIMConfig
    model: nn.Module  # the GMIMForSegmentation, in DistributedDataParallel under torchrun (see `segmenter`)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler | None
    loss_fn: nn.Module
    device: torch.device
    precision: str
    train_loader: Callable[[int], Any]
    val_loader: Callable[[], Any] | None
    train_args: dict[str, Any]
    total_steps: int
    base_model: str | None
    train_images: list[Any] = field(default_factory=list)  # the training datalist's "image" entries
    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    best_dice: float = -1.0
    best_step: int = -1
    best_report: Any = None  # EvalReport of the best weights, when this process validated them (else re-scored)
    info: DistInfo = dataclasses.field(default_factory=DistInfo)

    @property
    def segmenter(self) -> GMIMForSegmentation:
        """The model itself (unwrapped from DistributedDataParallel): for saving, loading and validation."""
        return unwrap_model(self.model)  # type: ignore[return-value]


class DiceBCELoss(nn.Module):
    """Multi-label loss: sigmoid Dice + binary cross-entropy on logits (B, C, ...) vs targets (B, C, ...) in {0, 1}.
    MONAI's `DiceCELoss(sigmoid=True)` would apply a softmax cross-entropy across the overlapping channels."""

    def __init__(self, with_bce: bool = True) -> None:
        super().__init__()
        from monai.losses import DiceLoss

        self.dice = DiceLoss(sigmoid=True)
        self.bce = nn.BCEWithLogitsLoss() if with_bce else None

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        loss = self.dice(logits, target)
        return loss + self.bce(logits, target.float()) if self.bce is not None else loss


def build_loss(kind: str, multi_label: bool) -> nn.Module:
    """DiceCE (default) or Dice: softmax over classes with a (B, 1, ...) class-map target, or sigmoid per channel
    with a (B, C, ...) multi-label target. Background is part of the loss (it is only left out of the metrics)."""
    from monai.losses import DiceCELoss, DiceLoss

    if multi_label:
        return DiceBCELoss(with_bce=kind == "dicece")
    cls = DiceCELoss if kind == "dicece" else DiceLoss
    return cls(to_onehot_y=True, softmax=True)


# ------------------------------------------------------------------------------------------------------ build
def build_run(args: FinetuneArgs, config: GMIMConfig | None, info: DistInfo | None = None) -> FinetuneRun:
    """Seed, build the model from `args.init`, check the datalists (fail before training), and build the optimizer,
    schedule and loaders. `total_steps` is `args.steps`, or `args.epochs` passes over this rank's training shard.
    `info` (default: one process on `args.device`) says where this process sits under torchrun."""
    if info is None:
        from gmim_hub.engine.distributed import pick_device

        info = DistInfo(device=pick_device(args.device))
    device = info.device
    if device.type == "cpu":  # each step's large activations and gradients reuse mapped pages
        tune_malloc_unless_disabled()
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)  # the fresh decoder (and, from scratch, encoder) weights depend on the seed only
    model, base_model = _init_model(args, config)
    cfg = model.config
    train_data, val_data = _datalists(args, cfg)
    model.to(device).train()
    if args.freeze_encoder:
        model.swinViT.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    per_rank = math.ceil(len(train_data) / info.world_size)  # DistributedSampler pads every shard to this length
    total = args.steps if args.steps is not None else args.epochs * math.ceil(per_rank / args.batch_size)  # type: ignore[operator]
    precision = resolve_precision(args.precision, device)
    cache = {"cache": args.cache, "cache_dir": cache_folder(args)}
    train_ds = make_dataset(train_data, finetune_transforms(cfg, True, num_samples=args.num_samples), **cache)
    val_shard = val_data[info.rank::info.world_size] if val_data else None  # round-robin; gathered after scoring
    val_ds = make_dataset(val_shard, finetune_transforms(cfg, False), **cache) if val_shard else None
    train_args = {**args.to_dict(), "total_steps": total, "precision_resolved": precision,
                  "world_size": info.world_size}

    def train_loader(epoch: int) -> Any:
        return make_loader(train_ds, batch_size=args.batch_size, shuffle=True, num_workers=args.num_workers,
                           seed=args.seed, epoch=epoch, distributed=info.distributed)

    def val_loader() -> Any:
        if val_ds is None:  # fewer validation volumes than ranks: this rank scores none
            return []
        return make_loader(val_ds, batch_size=1, shuffle=False, num_workers=args.num_workers, seed=args.seed)

    return FinetuneRun(
        config=cfg, model=wrap_model(model, info), optimizer=optimizer,
        scheduler=warmup_cosine_scheduler(optimizer, args.warmup, total),
        scaler=make_grad_scaler(device, precision), loss_fn=build_loss(args.loss, cfg.data.multi_label),
        device=device, precision=precision, train_loader=train_loader,
        val_loader=val_loader if val_data else None, train_args=train_args, total_steps=total,
        base_model=base_model, train_images=[d["image"] for d in train_data], info=info,
    )


def cache_folder(args: Any) -> Path:
    """Where `--cache disk` keeps preprocessed volumes: `args.cache_dir`, else `<output_dir>/cache`."""
    return Path(args.cache_dir) if args.cache_dir is not None else Path(args.output_dir) / "cache"


def init_kind(source: str, revision: str | None = None) -> str:
    """'pretraining' or 'segmentation': what a saved model folder / Hub repo holds (from its weights' header)."""
    from safetensors import safe_open

    from gmim_hub.hub.resolve import resolve_model_files
    from gmim_hub.hub.state import file_kind

    files = resolve_model_files(source, revision=revision, need_config=False)
    with safe_open(str(files.weights_path), framework="pt", device="cpu") as f:
        kind = file_kind(dict(f.metadata() or {}), set(f.keys()))  # noqa: SIM118 - safe_open has no __iter__
    if kind is None:
        raise WeightsError(f"--init {source}: cannot tell whether it is a pre-training or a segmentation model "
                           "(no gmim_hub.model_kind in its weights); re-save it with save_pretrained")
    return kind


# MSD / nnU-Net channel names that say which kind of scanner made the images (DataConfig.modality).
_MRI_NAMES = {"mri", "mr", "t1", "t1w", "t2", "t2w", "flair", "adc", "dwi", "t1gd", "t1ce", "t1c", "pd", "swi",
              "bold", "epi", "fa", "md"}


def task_config(pretrained: str, data: str | Path, revision: str | None = None) -> tuple[GMIMConfig, dict[str, str]]:
    """The config of a fine-tuning task on `data` (a dataset.json) from the pre-training model `pretrained`: its
    architecture, window and preprocessing (what the encoder learnt on), with the classes (`out_channels`,
    `data.label_names`) and channel names / modality of the dataset.json. Returns the config and, per setting that
    was chosen, where it came from (for the table `gmim train` prints)."""
    from gmim_hub.hub.resolve import resolve_model_files

    files = resolve_model_files(pretrained, revision=revision)
    assert files.config_path is not None
    base = GMIMConfig.from_json_file(files.config_path)
    task = read_task(data)
    if len(task.label_names) < 2:
        raise ConfigError(f"--init {pretrained} is a pre-training model, so the classes come from {data}'s "
                          '"labels" ({"0": "background", "1": ...}), which it does not list; add them, or pass '
                          "--config with out_channels and data.label_names")
    channels = task.channel_names or base.data.channel_names
    if task.channel_names and len(task.channel_names) != base.in_channels:
        raise ConfigError(f"{data} lists {len(task.channel_names)} channel(s) ({', '.join(task.channel_names)}) but "
                          f"{pretrained} was pre-trained on {base.in_channels}; its encoder takes "
                          f"{base.in_channels}-channel volumes: pre-train on your channels, or --init scratch")
    modality: Literal["CT", "MRI"] = _modality(task.channel_names) or base.data.modality
    data_cfg = dataclasses.replace(base.data, label_names=task.label_names, channel_names=channels,
                                   modality=modality, multi_label=False)  # MSD labels: one class per voxel
    cfg = dataclasses.replace(base, out_channels=len(task.label_names), data=data_cfg)
    src_data, src_pre = f"{Path(data).name} labels", "pre-trained config"
    origin = {"out_channels": src_data, "data.label_names": src_data,
              "in_channels": src_pre,
              "data.channel_names": f"{Path(data).name} modality" if task.channel_names else src_pre,
              "data.modality": f"{Path(data).name} modality" if _modality(task.channel_names) else src_pre}
    if modality != base.data.modality:
        origin["data.modality"] += f" (pre-trained on {base.data.modality}; intensity kept: {base.data.intensity})"
    for name in ("feature_size", "roi_size", "data.spacing", "data.orientation", "data.intensity"):
        origin[name] = src_pre
    return cfg, origin


def preset_for_task(preset: GMIMConfig, data: str | Path | None) -> GMIMConfig:
    """A preset fitted to the task in `data` (a dataset.json): a softmax preset takes `out_channels` and the label
    names from its "labels"; a multi-label preset (brats21) keeps its regions, which are built from the label codes.
    Unchanged without `data` or without labels."""
    labels = read_task(data).label_names if data is not None else ()
    if labels and not preset.data.multi_label:
        return dataclasses.replace(preset, out_channels=len(labels),
                                   data=dataclasses.replace(preset.data, label_names=labels))
    return preset


def _modality(channel_names: tuple[str, ...]) -> Literal["CT", "MRI"] | None:
    """"CT" when every channel is CT, "MRI" when every channel is an MR contrast, else None (undecided)."""
    kinds = {"CT" if n.lower() == "ct" else "MRI" if n.lower().replace("-", "") in _MRI_NAMES else "?"
             for n in channel_names}
    if kinds == {"CT"}:
        return "CT"
    return "MRI" if kinds == {"MRI"} else None


def _init_model(args: FinetuneArgs, config: GMIMConfig | None) -> tuple[GMIMForSegmentation, str | None]:
    from gmim_hub.models.hub_models import GMIMForSegmentation

    if args.init == "scratch":
        if config is None:
            raise ConfigError("training from scratch needs a config (a preset or a config.json with out_channels "
                              "and data.label_names for the task)")
        return GMIMForSegmentation(config), None
    if init_kind(args.init, args.revision) == "pretraining":
        if config is None:
            raise ConfigError(f"--init {args.init} is a pre-training model; pass the task's config (out_channels, "
                              "data.label_names) built on its architecture")
        model = GMIMForSegmentation.from_pretrained_encoder(args.init, config=config, revision=args.revision)
    else:
        config = _keep_patch_merging(args.init, args.revision, config)
        loaded = GMIMForSegmentation.from_pretrained(args.init, revision=args.revision, config=config)
        assert isinstance(loaded, GMIMForSegmentation)  # not the (model, info) tuple of output_loading_info=True
        model = loaded
        src = model.hub_source or args.init
        model.base_model = str(Path(src).resolve()) if Path(src).is_dir() else src
    return model, model.base_model


def _keep_patch_merging(source: str, revision: str | None, config: GMIMConfig | None) -> GMIMConfig | None:
    """The task config given with a segmentation `--init` keeps the saved model's patch merging: the weights were
    trained with it and compute nothing else (docs/method.md, "Patch merging")."""
    if config is None:
        return None
    from gmim_hub.hub.mixin import _read_config
    from gmim_hub.hub.resolve import resolve_model_files

    saved = _read_config(resolve_model_files(source, revision=revision).config_path).patch_merging
    if saved != config.patch_merging:
        logger.warning("patch_merging %r of %s replaces the config's %r: the model was trained with it", saved,
                       source, config.patch_merging)
    return dataclasses.replace(config, patch_merging=saved)


def _datalists(args: FinetuneArgs, cfg: GMIMConfig) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    kw: dict[str, Any] = {"base_dir": args.base_dir, "fold": args.fold, "require_labels": True,
                          "channel_names": cfg.data.channel_names or None}
    train = load_datalist(args.data, split="training", fraction=args.fraction, seed=args.seed, **kw)
    try:
        val = load_datalist(args.data, split="validation", **kw)
    except ConfigError:
        if args.fold is not None:
            raise
        logger.warning("%s has no validation split (pass fold= for a held-out fold): no validation, no best "
                       "checkpoint, and the model card gets no metrics", args.data)
        val = None
    return train, val


def ckpt_dir(args: FinetuneArgs, which: str) -> Path:
    return Path(args.output_dir) / "checkpoints" / which


# ------------------------------------------------------------------------------------------- state / resume
def run_state(run: FinetuneRun) -> dict[str, Any]:
    """The checkpoint dict for the current step. Collective under torchrun: every rank must call it."""
    mine = ckpt.capture_rng_state()
    gathered: list[Any] = [mine]
    if run.info.distributed:
        gathered = [None] * run.info.world_size
        dist.all_gather_object(gathered, mine)
    return {
        "model": run.segmenter.state_dict(), "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict(), "scaler": run.scaler.state_dict() if run.scaler else None,
        "step": run.step, "epoch": run.epoch, "batch_in_epoch": run.batch_in_epoch,
        "best_dice": run.best_dice, "best_step": run.best_step, "rng": gathered[0],
        "rank_states": [{"rng": g} for g in gathered],
        "config": run.config.to_dict(), "train_args": run.train_args,
    }


def restore_run(run: FinetuneRun, args: FinetuneArgs) -> Path | None:
    """Apply `args.resume` (rank 0 picks the checkpoint, every rank loads it and restores its own RNG state)."""
    path = choose_checkpoint_collective(args.resume, ckpt_dir(args, "last"), run.info)
    if path is None:
        return None
    state = ckpt.load_checkpoint(path)
    _check_compatible(state, run, path)
    run.segmenter.load_state_dict(state["model"], strict=True)
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    if run.scaler is not None and state.get("scaler") is not None:
        run.scaler.load_state_dict(state["scaler"])
    run.step, run.epoch, run.batch_in_epoch = int(state["step"]), int(state["epoch"]), int(state["batch_in_epoch"])
    run.best_dice, run.best_step = float(state["best_dice"]), int(state["best_step"])
    ranks = state.get("rank_states")  # absent from single-process checkpoints written before torchrun support
    ckpt.restore_rng_state(ranks[run.info.rank]["rng"] if ranks else state["rng"])
    logger.info("resumed from %s at step %d (epoch %d, batch %d)", path, run.step, run.epoch, run.batch_in_epoch)
    return path


def _check_compatible(state: dict[str, Any], run: FinetuneRun, path: Path) -> None:
    """Refuse to continue with other settings: the continued run would no longer be the interrupted one."""
    missing = [k for k in ("model", "optimizer", "scheduler", "step", "rng", "config", "train_args", "best_dice")
               if k not in state]
    if missing:
        raise ConfigError(f"{path.name} is not a gmim fine-tuning checkpoint (missing {', '.join(missing)})")
    if upgrade_config_dict(state["config"]) != run.config.to_dict():  # a version-1 checkpoint resumes as it was
        raise ConfigError(f"{path.name} was written with a different model config; resume with the same config, "
                          "or start over with --resume never in a new --output")
    old, new = {"world_size": 1, **state["train_args"]}, run.train_args  # older checkpoints: one process
    changed = [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in RESUME_KEYS if old.get(k) != new.get(k)]
    if changed:
        raise ConfigError(f"{path.name} was written with different settings ({'; '.join(changed)}); resume with "
                          "the same settings, or start over with --resume never in a new --output")


