"""Stratified random token masks at the encoder's insertion points, and the voxel mask of the loss: the sampling
behind `gmim_hub.method.draw_masks` (private; docs/method.md, "Token masks").

Pure functions of (per-sample grids, per-cell ratios, token grid sizes, config, `torch.Generator`): no module state,
no global RNG. Masks are bool, True = masked; the encoder applies `x * ~mask` over all channels of a token.

Token -> cell mapping, per axis: token i of an N-token axis belongs to cell floor(i * g / N). When N is a multiple
of g this is the original's layout (cells of (N/g)^3 tokens in raster order); otherwise cells hold
unequal numbers of tokens, or one or none when N < g (deep stages of small ROIs), which the original could not do.

Sampling is exact-count and uniform within each cell: cells are the rows of a (G, T_max) table (padding slots when
cells are unequal), every slot gets a distinct random key from one permutation, and the n_k smallest keys of row k
are masked. One permutation and one row sort serve all cells and all samples that share a grid.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from gmim_hub.config import MaskingConfig
from gmim_hub.errors import ConfigError, InputError

__all__ = ["sample_stage_masks", "token_grids", "voxel_loss_mask"]

Shape3 = tuple[int, int, int]


def token_grids(roi_size: Sequence[int], patch_size: int = 2) -> list[Shape3]:
    """Token grid (Nd, Nh, Nw) at each of the four insertion points: the patch-embedding output (twice,
    before and after pos_drop), the stage-2 block input and the stage-3 block input, i.e. roi/p, roi/p, roi/2p,
    roi/4p. For ROI 128 and p=2: 64^3, 64^3, 32^3, 16^3."""
    roi = tuple(int(r) for r in roi_size)
    if len(roi) != 3 or patch_size < 1 or any(r <= 0 or r % (4 * patch_size) for r in roi):
        raise ConfigError(f"roi_size must be three positive multiples of 4*patch_size={4 * patch_size}, "
                          f"got {tuple(roi_size)}")
    first = tuple(r // patch_size for r in roi)
    return [first, first, *(tuple(n // f for n in first) for f in (2, 4))]  # type: ignore[list-item]


@dataclass(frozen=True)
class _CellLayout:
    """Where each token of an (Nd, Nh, Nw) grid sits in a (G, T_max) table with one row per cell."""

    index: torch.Tensor  # (Ntok,) long: flat position cell * T_max + slot of each token, raster token order
    sizes: torch.Tensor  # (G,) long: tokens per cell, T_k
    valid: torch.Tensor  # (G, T_max) bool: table slots that hold a token


def _axis_layout(n: int, g: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One axis of n tokens: cell of each token (floor(i*g/n)), its position within the cell, cell sizes (g,)."""
    cell = torch.arange(n) * g // n
    sizes = torch.bincount(cell, minlength=g)
    return cell, torch.arange(n) - (torch.cumsum(sizes, 0) - sizes)[cell], sizes


@functools.lru_cache(maxsize=64)
def _cell_layout(shape: Shape3, g: int) -> _CellLayout:
    (cd, sd, zd), (ch, sh, zh), (cw, sw, zw) = (_axis_layout(n, g) for n in shape)
    td, th, tw = int(zd.max()), int(zh.max()), int(zw.max())
    cell = (cd[:, None, None] * g + ch[None, :, None]) * g + cw[None, None, :]
    slot = (sd[:, None, None] * th + sh[None, :, None]) * tw + sw[None, None, :]
    sizes = (zd[:, None, None] * zh[None, :, None] * zw[None, None, :]).reshape(-1)
    vd, vh, vw = (torch.arange(t)[None, :] < z[:, None] for t, z in ((td, zd), (th, zh), (tw, zw)))
    valid = vd[:, None, None, :, None, None] & vh[None, :, None, None, :, None] & vw[None, None, :, None, None, :]
    return _CellLayout((cell * td * th * tw + slot).reshape(-1), sizes, valid.reshape(g**3, -1))


def _sort_last(x: torch.Tensor) -> torch.Tensor:
    """Sorted values along the last dim. On the CPU numpy's (AVX-512) sort is ~10x faster than torch's."""
    if x.device.type == "cpu":
        return torch.from_numpy(np.sort(x.numpy(), axis=-1))
    return torch.sort(x, dim=-1).values


def _masked_counts(sizes: torch.Tensor, ratios: torch.Tensor, rounding: str) -> torch.Tensor:
    """n_k = floor(T_k * min(r_k, 1)) as the original, or the nearest integer (halves up); (nb, G) long."""
    x = sizes.to(torch.float64) * ratios.clamp(0.0, 1.0)
    return torch.floor(x + 0.5 if rounding == "round" else x).long()


def _sample_group(layout: _CellLayout, counts: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Exact-count uniform masks for nb samples sharing one grid: counts (nb, G) -> (nb, Ntok) bool.

    Every table slot gets a distinct random key (one permutation), padding slots a key above all others; in each
    cell the tokens whose key is at most the n_k-th smallest key are masked: exactly n_k, uniformly chosen."""
    dev = counts.device
    nb, (n_cells, t_max) = counts.shape[0], layout.valid.shape
    n = nb * n_cells * t_max
    keys = torch.randperm(n, generator=generator, device=dev).view(nb, n_cells, t_max)
    keys = keys.masked_fill(~layout.valid.to(dev), n)
    kth = _sort_last(keys).gather(-1, (counts - 1).clamp(min=0)[..., None])
    kth = torch.where(counts[..., None] > 0, kth, -1)
    return (keys <= kth).view(nb, -1)[:, layout.index.to(dev)]


def _check_inputs(grids: Sequence[int], ratios: Sequence[torch.Tensor], shapes: Sequence[Shape3]) -> None:
    if len(grids) == 0 or len(grids) != len(ratios):
        raise InputError(f"need one grid and one ratio tensor per sample, got {len(grids)} grids and "
                         f"{len(ratios)} ratio tensors")
    for b, (g, r) in enumerate(zip(grids, ratios, strict=True)):
        if int(g) < 1 or tuple(r.shape) != (int(g) ** 3,):
            raise InputError(f"sample {b}: ratios must have shape (grid**3,) = ({int(g) ** 3},) for grid {g}, "
                             f"got {tuple(r.shape)}; pass the output of cell_mask_ratios for that sample's grid")
        if not bool(torch.isfinite(r).all()) or bool((r < 0).any()) or bool((r > 1).any()):
            raise InputError(f"sample {b}: mask ratios must be finite and in [0, 1]")
    for s in shapes:
        if len(s) != 3 or any(int(n) < 1 for n in s):
            raise InputError(f"token grids must be (Nd, Nh, Nw) with positive sizes, got {tuple(s)}; "
                             "use token_grids(roi_size)")


def _applied(t: int, batch: int, cfg: MaskingConfig, generator: torch.Generator) -> torch.Tensor:
    """Which samples call t masks (B,) bool: t=0 always; t>=1 with probability p if the decay h > 0."""
    dev = generator.device
    if t == 0:
        return torch.ones(batch, dtype=torch.bool, device=dev)
    if cfg.hierarchical_decay <= 0:
        return torch.zeros(batch, dtype=torch.bool, device=dev)
    draws = torch.rand(batch if cfg.per_sample_draws else 1, generator=generator, device=dev)
    return (draws < cfg.extra_mask_prob).expand(batch)


def _mask_one_call(grids: Sequence[int], ratios: Sequence[torch.Tensor], applied: list[bool], shape: Shape3,
                   cfg: MaskingConfig, generator: torch.Generator) -> torch.Tensor | None:
    """(B, *shape) bool mask of one insertion point, or None when no token ends up masked."""
    batch, dev = len(grids), generator.device
    mask = torch.zeros((batch, *shape), dtype=torch.bool, device=dev)
    for g in sorted({int(grids[b]) for b in range(batch) if applied[b]}):  # one group per grid, not per cell
        idx = [b for b in range(batch) if applied[b] and int(grids[b]) == g]
        layout = _cell_layout(shape, g)
        counts = _masked_counts(layout.sizes.to(dev), torch.stack([ratios[b] for b in idx]), cfg.count_rounding)
        mask[idx] = _sample_group(layout, counts, generator).view(len(idx), *shape)
    return mask if bool(mask.any()) else None  # e.g. floor(T_k * r) == 0 in every cell at a deep stage


def _call_ratios(ratios: list[torch.Tensor], decay: float, n_calls: int) -> list[list[torch.Tensor]]:
    """Per-cell ratios at calls 0..n_calls-1: r * h^t by repeated float64 multiplication, as the original's per-call
    update (a power h**t, or float32, changes some floor(T * r) counts by one)."""
    out = [ratios]
    for _ in range(1, n_calls):
        out.append([r * decay for r in out[-1]])
    return out


def sample_stage_masks(grids: Sequence[int], ratios: Sequence[torch.Tensor], token_grids: Sequence[Shape3],
                       cfg: MaskingConfig, generator: torch.Generator) -> list[torch.Tensor | None]:
    """Token masks for one batch, one entry per insertion point (docs/method.md, "Token masks").

    grids: (B,) chosen grid per sample; ratios: B tensors (g_b^3,) from `cell_mask_ratios`; token_grids: the
    (Nd, Nh, Nw) of each insertion point, from `token_grids(roi_size)`. Returns, per insertion point t, a bool
    tensor (B, Nd, Nh, Nw), True = masked, or None when no token is masked at t (not applied, or all counts 0).
    Call t=0 always masks; t>=1 masks only if hierarchical_decay h > 0, each with probability extra_mask_prob (per
    sample, or once for the batch when per_sample_draws=False), at ratio r*h^t; per cell exactly
    floor(T_k * r) tokens (or rounded, `count_rounding`). Masks live on `generator.device`; the same generator
    state gives the same masks."""
    ratios = [torch.as_tensor(r) for r in ratios]
    _check_inputs(grids, ratios, token_grids)
    start = [r.detach().to(device=generator.device, dtype=torch.float64) for r in ratios]
    out: list[torch.Tensor | None] = []
    for t, (shape, current) in enumerate(zip(token_grids, _call_ratios(start, cfg.hierarchical_decay,
                                                                        len(token_grids)), strict=True)):
        applied = _applied(t, len(grids), cfg, generator).tolist()
        shape3 = (int(shape[0]), int(shape[1]), int(shape[2]))
        out.append(_mask_one_call(grids, current, applied, shape3, cfg, generator) if any(applied) else None)
    return out


def _upsample(mask: torch.Tensor, factors: Sequence[int]) -> torch.Tensor:
    """Nearest upsampling of (B, n0, n1, n2) by integer factors -> (B, n0*f0, n1*f1, n2*f2)."""
    b, n0, n1, n2 = mask.shape
    f0, f1, f2 = factors
    return mask[:, :, None, :, None, :, None].expand(b, n0, f0, n1, f1, n2, f2).reshape(b, n0 * f0, n1 * f1, n2 * f2)


def voxel_loss_mask(masks: Sequence[torch.Tensor | None], patch_size: int = 2,
                    mode: Literal["first", "union"] = "first") -> torch.Tensor:
    """Voxels the reconstruction loss supervises (docs/method.md, "Loss mask"): (B, 1, D, H, W) bool, True = masked.

    masks: `sample_stage_masks` output; masks[0] (B, Nd, Nh, Nw) must be the patch-embedding mask, so the voxel
    grid is Nd*patch_size etc. mode "first": masks[0] upsampled (the original; token i covers voxels
    [p*i, p*(i+1)) as MONAI's stride-p patch embedding); "union": any insertion point's mask, each upsampled by
    roi/N to voxel size."""
    if mode not in ("first", "union"):
        raise ConfigError(f"loss mask mode must be 'first' or 'union', got {mode!r}")
    if len(masks) == 0 or masks[0] is None or masks[0].dim() != 4 or masks[0].dtype != torch.bool:
        got = "nothing" if len(masks) == 0 or masks[0] is None else f"{masks[0].dtype} {tuple(masks[0].shape)}"
        raise InputError(f"masks[0] must be the bool (B, Nd, Nh, Nw) mask of the first insertion point, got {got}")
    first = masks[0]
    roi = tuple(n * patch_size for n in first.shape[1:])
    out = _upsample(first, (patch_size,) * 3)
    for m in masks[1:] if mode == "union" else ():
        if m is None:
            continue
        if m.dim() != 4 or m.shape[0] != first.shape[0] or any(r % n for r, n in zip(roi, m.shape[1:], strict=True)):
            raise InputError(f"mask of shape {tuple(m.shape)} does not tile the voxel grid {roi} of batch "
                             f"{first.shape[0]}; masks must come from token_grids(roi_size)")
        out = out | _upsample(m, [r // n for r, n in zip(roi, m.shape[1:], strict=True)])
    return out[:, None]
