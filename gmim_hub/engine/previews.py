"""PNG previews of what the network sees and produces during pre-training (matplotlib, Agg backend, no display).

One figure per call, for sample 0 of a batch, middle axial slice (last spatial axis, S in RAS):
input view x | masked input (the voxel loss mask applied) | reconstruction | per-cell mask ratios of the chosen
grid, drawn over the input with the cell boundaries.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from torch import Tensor


def _slice(volume: Tensor, index: int) -> np.ndarray:
    """(C, D, H, W) -> (W', H') float image of channel 0 at depth index `index` of the last axis, for imshow with
    origin='lower' (rows = second spatial axis)."""
    return volume[0, :, :, index].detach().float().cpu().numpy().T


def _ratio_plane(ratios: Tensor, grid: int, index: int, depth: int) -> np.ndarray:
    """The (g, g) ratios of the cells crossing slice `index` of a `depth`-voxel last axis; cells are raster
    ordered (d, h, w) as in `gmim_hub.masking`: cell = (cd * g + ch) * g + cw."""
    cube = ratios.detach().float().cpu().reshape(grid, grid, grid).numpy()
    cw = min(grid - 1, index * grid // depth)
    return cube[:, :, cw].T


def save_preview(
    path: Path,
    image: Tensor,
    loss_mask: Tensor,
    reconstruction: Tensor,
    grid: int,
    ratios: Tensor,
    *,
    step: int,
) -> Path:
    """image, reconstruction: (C, D, H, W); loss_mask: (1, D, H, W) bool, True = masked; ratios: (grid^3,).
    Writes `path` (PNG) and returns it."""
    import matplotlib
    from matplotlib.figure import Figure  # no pyplot: no global backend or figure state, safe in threads

    depth = int(image.shape[-1])
    mid = depth // 2
    img = _slice(image, mid)
    hidden = _slice(loss_mask.to(image.dtype), mid) > 0.5
    masked = np.where(hidden, np.nan, img)  # drawn in the "bad" colour: the voxels the loss supervises
    rec = _slice(reconstruction, mid)
    lo, hi = float(np.percentile(img, 1)), float(np.percentile(img, 99))
    extent = (0, image.shape[1], 0, image.shape[2])
    fig = Figure(figsize=(13, 3.6))
    axes = fig.subplots(1, 4)
    panels = (("input x", img), ("masked input (blue: masked, in the loss)", masked), ("reconstruction", rec))
    gray = matplotlib.colormaps["gray"].with_extremes(bad="tab:blue")
    for ax, (title, arr) in zip(axes[:3], panels, strict=True):
        ax.imshow(arr, cmap=gray, vmin=lo, vmax=hi if hi > lo else lo + 1, origin="lower", extent=extent)
        ax.set_title(title, fontsize=10)
    ax = axes[3]
    ax.imshow(img, cmap="gray", vmin=lo, vmax=hi if hi > lo else lo + 1, origin="lower", extent=extent)
    heat = ax.imshow(_ratio_plane(ratios, grid, mid, depth), cmap="magma", alpha=0.55, vmin=0.0, vmax=1.0,
                     origin="lower", extent=extent, interpolation="nearest")
    for k in range(1, grid):
        ax.axvline(k * image.shape[1] / grid, color="cyan", lw=0.6)
        ax.axhline(k * image.shape[2] / grid, color="cyan", lw=0.6)
    ax.set_title(f"grid {grid}^3, cell mask ratios", fontsize=10)
    fig.colorbar(heat, ax=ax, fraction=0.046, pad=0.04)
    for a in axes:
        a.set_xticks([])
        a.set_yticks([])
    fig.suptitle(f"step {step}: masked {float(loss_mask.float().mean()):.0%} of voxels", fontsize=11)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    return path
