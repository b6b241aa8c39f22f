"""One pre-training step and one validation pass, for `gmim_hub.engine.pretrain`.

The step is split in two (`forward_step`, then `update_step`) so the engine can check the loss for NaN/inf on every
rank *before* any backward: under DDP a rank that stopped alone would leave the others waiting in the all-reduce.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import Tensor

from gmim_hub.engine.checkpoint import capture_rng_state, restore_rng_state
from gmim_hub.engine.distributed import DistInfo, reduce_mean, unwrap_model
from gmim_hub.engine.precision import autocast_context, optimizer_step
from gmim_hub.engine.pretrain_setup import Run
from gmim_hub.errors import ConfigError
from gmim_hub.masking import GRID_KEY, MASKS_KEY, RATIOS_KEY
from gmim_hub.method import StepOutput, forward_loss

if TYPE_CHECKING:
    from gmim_hub.engine.args import PretrainArgs
    from gmim_hub.models.pretraining import PretrainingNetwork


@dataclass
class StepResult:
    """components: loss/cc/rec of this rank's batch (floats); loss: the graph's total (for backward);
    preview: sample-0 tensors for the PNG preview (detached, on the CPU only when used)."""

    components: dict[str, float]
    loss: Tensor
    preview: dict[str, Any]
    lr: float = float("nan")
    grad_norm: float = float("nan")

    @property
    def values(self) -> dict[str, float]:
        return {**self.components, "lr": self.lr, "grad_norm": self.grad_norm}


def _plain(t: Any, device: torch.device) -> Tensor:
    """MetaTensor -> plain tensor on `device` (the model needs no metadata, and plain tensors are faster)."""
    t = t.as_tensor() if hasattr(t, "as_tensor") else torch.as_tensor(t)
    return t.to(device, non_blocking=True)


def _forward(model: torch.nn.Module, run: Run, batch: dict[str, Any]) -> tuple[Tensor, StepOutput]:
    """The online view x and `gmim_hub.method.forward_loss` on this batch; its masks were drawn in the loader
    workers (`MaskingCollate`, set as the engine's `collate_fn`) and are only moved to the device here."""
    if MASKS_KEY not in batch:
        raise ConfigError(f"the pre-training batch has no {MASKS_KEY!r}; build its loader with "
                          "collate_fn=MaskingCollate(config.masking, token_grids(config.roi_size))")
    x, y = _plain(batch["image"], run.device), _plain(batch["target"], run.device)
    masks = [m.to(run.device, non_blocking=True) if m is not None else None for m in batch[MASKS_KEY]]
    with autocast_context(run.device, run.precision):
        return x, forward_loss(model, x, y, masks, run.config)


def forward_step(run: Run, batch: dict[str, Any]) -> StepResult:
    """Masks, forward and loss for one training batch; nothing is updated yet."""
    lr = float(run.scheduler.get_last_lr()[0])
    x, step = _forward(run.model, run, batch)
    losses = step.losses
    components = {"loss": float(losses.total.detach()), "cc": float(losses.cross_correlation.detach()),
                  "rec": float(losses.reconstruction.detach())}
    preview = {"image": x[0].detach(), "loss_mask": step.loss_mask[0],
               "reconstruction": step.out.reconstruction[0].detach(),
               "grid": int(batch[GRID_KEY][0]), "ratios": batch[RATIOS_KEY][0]}
    return StepResult(components=components, loss=losses.total, preview=preview, lr=lr)


def update_step(run: Run, result: StepResult, args: PretrainArgs) -> None:
    """backward (scaled under fp16) -> unscale -> clip -> AdamW -> lr schedule -> EMA target update."""
    params = [p for p in run.model.parameters() if p.requires_grad]
    result.grad_norm = optimizer_step(result.loss, run.optimizer, params, run.scaler, args.grad_clip or None)
    run.scheduler.step()
    cast("PretrainingNetwork", unwrap_model(run.model)).update_target()
    result.loss = result.loss.detach()  # free the graph before the next step


@torch.no_grad()
def validate(run: Run, args: PretrainArgs, info: DistInfo) -> dict[str, float]:
    """Mean loss components over the held-out split: same crops and masks at every evaluation (a loader rebuilt
    for epoch 0 without shuffling draws them again in its workers). Leaves every RNG and train mode as found."""
    if run.val_loader is None:
        return {}
    saved = capture_rng_state()
    model = unwrap_model(run.model)
    model.eval()
    sums = {"val_loss": 0.0, "val_cc": 0.0, "val_rec": 0.0}
    n = 0
    try:
        for i, batch in enumerate(run.val_loader()):
            if args.val_batches is not None and i >= args.val_batches:
                break
            losses = _forward(model, run, batch)[1].losses
            b = len(batch[GRID_KEY])
            sums["val_loss"] += float(losses.total) * b
            sums["val_cc"] += float(losses.cross_correlation) * b
            sums["val_rec"] += float(losses.reconstruction) * b
            n += b
    finally:
        model.train()
        restore_rng_state(saved)
    return reduce_mean({k: v / max(n, 1) for k, v in sums.items()}, info)
