"""GMIM objective (docs/method.md): Barlow-Twins style cross-correlation over tokens + masked voxel reconstruction.

Pure functions of tensors; nothing here holds state or moves tensors between devices.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from gmim_hub.config import LossConfig
from gmim_hub.errors import ConfigError, InputError

__all__ = ["LossOutput", "cross_correlation_loss", "gmim_loss", "masked_reconstruction_loss"]

_STD_EPS = 1e-5


@dataclass
class LossOutput:
    """total = alpha_cc * cross_correlation + alpha_rec * reconstruction; all scalar tensors (components for
    logging; only `total` needs backward)."""

    total: Tensor
    cross_correlation: Tensor
    reconstruction: Tensor


def _upcast(x: Tensor) -> Tensor:
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _full_precision(x: Tensor) -> torch.autocast:
    """Losses run outside autocast: a 512x512 correlation or a sum of squares over 128^3 voxels in fp16/bf16 loses
    precision (or overflows), and the training step calls the loss inside its autocast region."""
    return torch.autocast(device_type=x.device.type, enabled=False)


def cross_correlation_loss(z_x: Tensor, z_y: Tensor, lambd: float = 0.005, standardize: bool = False) -> Tensor:
    """Per-sample cross-correlation over tokens, averaged over the batch.

    z_x, z_y: (B, N, P) projected tokens of the two views. For each sample C = Z_x^T Z_y / N (P, P) and
    L = sum_i (C_ii - 1)^2 + lambd * sum_{i!=j} C_ij^2. The original does not standardise features
    (`standardize=False`); `True` first maps each feature to zero mean, unit (biased) variance over the sample's N
    tokens, with eps 1e-5 inside the square root as Barlow Twins' affine-free BatchNorm."""
    if z_x.dim() != 3 or z_x.shape != z_y.shape or z_x.shape[1] < 1:
        raise InputError(f"cross-correlation inputs must both be (B, N, P) with N >= 1, got z_x "
                         f"{tuple(z_x.shape)} and z_y {tuple(z_y.shape)}")
    with _full_precision(z_x):
        z_x, z_y = _upcast(z_x), _upcast(z_y)
        if standardize:
            z_x, z_y = (
                (z - z.mean(dim=1, keepdim=True)) / torch.sqrt(z.var(dim=1, unbiased=False, keepdim=True) + _STD_EPS)
                for z in (z_x, z_y)
            )
        c = torch.bmm(z_x.transpose(1, 2), z_y) / z_x.shape[1]  # (B, P, P)
        diag = torch.diagonal(c, dim1=1, dim2=2)
        on_diag = (diag - 1).pow(2).sum(dim=1)
        off_diag = c.pow(2).sum(dim=(1, 2)) - diag.pow(2).sum(dim=1)
        return (on_diag + lambd * off_diag).mean()


def masked_reconstruction_loss(pred: Tensor, target: Tensor, voxel_mask: Tensor | None,
                               normalize: Literal["all_voxels", "masked_voxels"] = "all_voxels") -> Tensor:
    """Squared error on the masked voxels.

    pred, target: (B, C, D, H, W); voxel_mask: (B, 1, D, H, W) bool, True = supervised (masked), e.g. from
    `gmim_hub.masking.voxel_loss_mask`; None supervises every voxel (plain MSE). "all_voxels" divides the masked
    squared error by all B*C*D*H*W voxels, as the original's MSELoss on zeroed tensors (= masked fraction x MSE over
    masked voxels); "masked_voxels" divides by the C * number of masked voxels (0 when nothing is masked)."""
    if normalize not in ("all_voxels", "masked_voxels"):
        raise ConfigError(f"normalize must be 'all_voxels' or 'masked_voxels', got {normalize!r}")
    if pred.dim() != 5 or pred.shape != target.shape:
        raise InputError(f"reconstruction and target must both be (B, C, D, H, W), got {tuple(pred.shape)} and "
                         f"{tuple(target.shape)}")
    b, _, d, h, w = pred.shape
    if voxel_mask is not None and (voxel_mask.dtype != torch.bool or tuple(voxel_mask.shape) != (b, 1, d, h, w)):
        raise InputError(f"voxel_mask must be bool (B, 1, D, H, W) = {(b, 1, d, h, w)} for reconstruction "
                         f"{tuple(pred.shape)}, got {voxel_mask.dtype} {tuple(voxel_mask.shape)}")
    with _full_precision(pred):
        diff = _upcast(pred) - _upcast(target)
        if voxel_mask is None:
            return diff.pow(2).mean()
        sq = (diff * voxel_mask).pow(2).sum()
        if normalize == "all_voxels":
            return sq / pred.numel()
        return sq / (voxel_mask.sum() * pred.shape[1]).clamp(min=1)


def gmim_loss(z_x: Tensor, z_y: Tensor, reconstruction: Tensor, target: Tensor, voxel_mask: Tensor | None,
              cfg: LossConfig) -> LossOutput:
    """The GMIM objective: alpha_cc * CC(z_x, z_y) + alpha_rec * masked MSE(reconstruction, target).

    z_x, z_y: (B, N, P) projections of the online and target views; reconstruction, target: (B, C, D, H, W) (target
    = the online view x before masking); voxel_mask: (B, 1, D, H, W) bool from `voxel_loss_mask`."""
    cc = cross_correlation_loss(z_x, z_y, lambd=cfg.lambd, standardize=cfg.standardize)
    rec = masked_reconstruction_loss(reconstruction, target, voxel_mask, normalize=cfg.rec_normalize)
    return LossOutput(total=cfg.alpha_cc * cc + cfg.alpha_rec * rec, cross_correlation=cc, reconstruction=rec)
