"""Segmentation metrics: hard Dice and HD95 per class, thin wrappers over MONAI's metric functions.

Conventions (the same in `gmim train` validation and `gmim evaluate`, so the model card and a later evaluation agree):

- Predictions are made **hard** before any metric: argmax for softmax tasks, `sigmoid > 0.5` for multi-label tasks
  (the original's BraTS validation silently scored soft probabilities).
- Softmax tasks: channel 0 is background and is **excluded** from every per-class value and mean (AMOS's reported
  mean included it). Multi-label tasks (BraTS TC/WT/ET) have no background channel: all channels
  are scored.
- Dice of a class absent from both prediction and ground truth is **NaN** (undefined, not a free 1.0), and NaNs are
  left out of every mean. A class absent from the ground truth but predicted scores 0.
- HD95 is MONAI's symmetric 95th-percentile Hausdorff distance between the **surfaces** (edges) of the two masks,
  in **mm** (voxel distances scaled by the image spacing, so anisotropic voxels are handled). It is NaN when either
  mask is empty (the distance is undefined there); such cases are left out of the means.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import torch
from monai.metrics import compute_dice, compute_hausdorff_distance
from torch import Tensor

from gmim_hub.config import GMIMConfig
from gmim_hub.errors import InputError


def foreground_names(cfg: GMIMConfig) -> list[str]:
    """Names of the scored channels: all of them for multi-label tasks, all but channel 0 (background) otherwise."""
    names = list(cfg.data.label_names) or [f"class{i}" for i in range(cfg.out_channels)]
    return names if cfg.data.multi_label else names[1:]


def discretize(logits: Tensor, multi_label: bool) -> Tensor:
    """logits: (B, C, *spatial) -> hard masks (B, C, *spatial) float in {0, 1}: one-hot of the argmax (softmax
    tasks) or `sigmoid(logits) > 0.5` (multi-label)."""
    if multi_label:
        return (logits > 0).float()  # sigmoid(x) > 0.5 <=> x > 0, without computing the sigmoid
    return one_hot(logits.argmax(dim=1, keepdim=True), logits.shape[1])


def one_hot(labels: Tensor, num_classes: int) -> Tensor:
    """labels: (B, 1, *spatial) integer class map -> (B, num_classes, *spatial) float one-hot."""
    if labels.ndim < 3 or labels.shape[1] != 1:
        raise InputError(f"a label map must be (B, 1, *spatial), got {tuple(labels.shape)}")
    lab = labels.long()
    lo, hi = int(lab.min()), int(lab.max())
    if lo < 0 or hi >= num_classes:
        raise InputError(f"label values must be in [0, {num_classes - 1}] for {num_classes} classes, found "
                         f"[{lo}, {hi}]; check the label files or out_channels / data.label_names")
    out = torch.zeros((lab.shape[0], num_classes, *lab.shape[2:]), dtype=torch.float32, device=lab.device)
    return out.scatter_(1, lab, 1.0)


def target_masks(label: Tensor, num_classes: int, multi_label: bool) -> Tensor:
    """Ground truth as hard masks (B, C, *spatial): a class map (B, 1, ...) is one-hot encoded; a multi-label target
    must already have one channel per class (e.g. after `ConvertToMultiChannelBasedOnBratsClassesd`)."""
    if multi_label:
        if label.shape[1] != num_classes:
            raise InputError(f"a multi-label target needs {num_classes} channels, got {tuple(label.shape)}; "
                             "convert the label map to one channel per class in the transforms")
        return (label > 0.5).float()
    return one_hot(label, num_classes)


def dice_per_class(pred: Tensor, target: Tensor, *, include_background: bool) -> Tensor:
    """pred, target: (B, C, *spatial) hard masks -> Dice (B, C') with C' = C or C - 1; NaN where both are empty."""
    _check_pair(pred, target)
    dice = compute_dice(pred, target, include_background=include_background, ignore_empty=False)
    both_empty = _empty(pred, include_background) & _empty(target, include_background)
    return dice.masked_fill(both_empty, float("nan"))


def hd95_per_class(pred: Tensor, target: Tensor, *, spacing: Sequence[float] | None,
                   include_background: bool) -> Tensor:
    """pred, target: (B, C, *spatial) hard masks -> HD95 in mm (B, C'); NaN where either mask is empty.

    spacing: voxel size (mm) of the grid the masks live on, one value per spatial axis; None = 1 mm isotropic."""
    _check_pair(pred, target)
    if spacing is not None and len(spacing) != pred.ndim - 2:
        raise InputError(f"spacing needs {pred.ndim - 2} values (one per spatial axis), got {list(spacing)}")
    with warnings.catch_warnings():  # MONAI warns once per empty mask; we turn those cases into NaN ourselves
        warnings.simplefilter("ignore")
        hd = compute_hausdorff_distance(pred, target, include_background=include_background, percentile=95,
                                        spacing=None if spacing is None else [float(s) for s in spacing])
    either_empty = _empty(pred, include_background) | _empty(target, include_background)
    return hd.float().cpu().masked_fill(either_empty.cpu(), float("nan"))


def nanmean(values: Sequence[float]) -> float:
    """Mean over the finite entries; NaN when there are none (so an all-undefined metric stays visibly undefined)."""
    finite = [v for v in values if not math.isnan(v)]
    return sum(finite) / len(finite) if finite else float("nan")


def _empty(masks: Tensor, include_background: bool) -> Tensor:
    m = masks if include_background else masks[:, 1:]
    return m.flatten(2).sum(-1) == 0


def _check_pair(pred: Tensor, target: Tensor) -> None:
    if pred.shape != target.shape:
        raise InputError(f"prediction {tuple(pred.shape)} and ground truth {tuple(target.shape)} differ in shape; "
                         "they must be masks on the same voxel grid")
