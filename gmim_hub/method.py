"""GMIM in one file: one pre-training step, top to bottom (docs/method.md explains each part and its deviations).

    grid choice -> cell ratios -> token masks -> online / target forward -> losses

1. `select_grid`: for each candidate grid g (cells per axis), the entropy of every cell's voxel values; keep the grid
   whose cell entropies vary most relative to their mean, with a penalty g^-grid_penalty against fine grids.
2. `cell_mask_ratios`: a cell's mask ratio is linear in the rank of its entropy, from base*(1-scale) for the lowest
   to base*(1+scale) for the highest: informative cells are masked more.
3. `draw_masks`: at each of the encoder's four insertion points t, exactly floor(T_k * r_k * h^t) of the T_k tokens
   of cell k are masked, uniformly at random within the cell; points t >= 1 mask only with probability p.
4. `forward_loss`: the online encoder sees the masked view x, the target encoder the other view y without gradient;
   loss = alpha_cc * cross-correlation(projections) + alpha_rec * squared error of the reconstruction of x on the
   masked voxels.

Steps 1-3 run on the CPU in the data-loader workers (`gmim_hub.masking.GridChoiced` calls `mask_info` per sample,
`MaskingCollate` calls `draw_masks` per batch), overlapped with the model step; step 4 is what the training step
(`gmim_hub.engine.pretrain_step`) runs. The bit-exact entropy arithmetic is in `gmim_hub/_entropy.py`, the
exact-count sampler in `gmim_hub/_token_masks.py`, the two losses in `gmim_hub/losses.py` and the network in
`gmim_hub/models/pretraining.py`. Every hyper-parameter named here is a field of `gmim_hub.config.MaskingConfig`,
`LossConfig` or `GMIMConfig`, with its meaning and default written there.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from gmim_hub._entropy import cell_entropies
from gmim_hub._token_masks import Shape3, sample_stage_masks, voxel_loss_mask
from gmim_hub.config import GMIMConfig, MaskingConfig
from gmim_hub.errors import InputError
from gmim_hub.losses import LossOutput, gmim_loss

if TYPE_CHECKING:
    from gmim_hub.models.pretraining import GMIMModel, PretrainingOutput

__all__ = ["GridChoice", "StepOutput", "cell_mask_ratios", "draw_masks", "forward_loss", "mask_info",
           "select_grid", "uniform_mask_info"]


# ------------------------------------------------------------------------------------------ 1. grid choice
@dataclass(frozen=True)
class GridChoice:
    """The grid chosen for one sample. grid: cells per axis; entropy: (grid**3,) float64 cell entropies in bits,
    cells in (d, h, w) raster order (pseudo-cells when `legacy_chained_cells=True`, as in the original)."""

    grid: int
    entropy: np.ndarray


def select_grid(volume: np.ndarray | torch.Tensor, cfg: MaskingConfig,
                value_range: tuple[float, float] | None = None) -> GridChoice:
    """Choose the grid with the largest g^-penalty * std/mean of its cell entropies (ddof 0); first maximum wins.

    volume: (C, D, H, W), the online view the encoder will see (already intensity-normalised). A grid whose cells
    are all constant has mean 0 and a NaN score; as with the original's `np.argmax`, the first NaN wins, so a
    constant volume gets the first grid. No warnings are emitted. value_range: the histogram estimator's range
    when `cfg.histogram_range` is None (pass `GMIMConfig.histogram_range`, which derives it from the data)."""
    entropies = cell_entropies(volume, cfg.grids, legacy_chained_cells=cfg.legacy_chained_cells,
                               estimator=cfg.entropy_estimator, bins=cfg.histogram_bins,
                               value_range=cfg.histogram_range or value_range)
    with np.errstate(divide="ignore", invalid="ignore"):
        scores = [g ** -cfg.grid_penalty * h.std() / h.mean() for g, h in zip(cfg.grids, entropies, strict=True)]
    best = int(np.argmax(scores))
    return GridChoice(grid=int(cfg.grids[best]), entropy=entropies[best])


# ------------------------------------------------------------------------------------------ 2. cell ratios
def cell_mask_ratios(entropy: np.ndarray, cfg: MaskingConfig) -> torch.Tensor:
    """Per-cell mask ratios (g^3,) float64 from cell entropies (g^3,) (docs/method.md, "Mask ratios").

    The ratio is linear in the entropy's rank among the *distinct* values (optionally rounded to
    `cfg.entropy_decimals` first, which makes ties robust to last-ulp noise), spread over
    base*(1-scale) .. base*(1+scale); a single distinct value gives base*(1-scale), as the original."""
    h = np.asarray(entropy, dtype=np.float64)
    if h.ndim != 1 or h.size == 0:
        raise InputError(f"entropy must be a non-empty 1-D array (one value per cell), got shape {h.shape}")
    if not np.isfinite(h).all():
        raise InputError("entropy has non-finite values; compute it with select_grid on a finite volume")
    if not cfg.dynamic:
        return torch.full((h.size,), cfg.base_ratio, dtype=torch.float64)
    if cfg.entropy_decimals is not None:
        h = np.round(h, cfg.entropy_decimals)
    distinct = np.unique(h)
    levels = np.linspace(1 - cfg.scale, 1 + cfg.scale, distinct.size)
    ratios = cfg.base_ratio * levels[np.searchsorted(distinct, h)]
    return torch.from_numpy(ratios)  # float64 as the original: float32 changes some floor(T * r) counts by one


def uniform_mask_info(cfg: MaskingConfig) -> tuple[int, torch.Tensor]:
    """Grid and ratios of strategy="uniform": one cell spanning the whole token grid at the uniform ratio, so
    `draw_masks` masks exactly floor(N * r) of the N tokens, uniformly at random (SimMIM-style)."""
    return 1, torch.tensor([cfg.mean_uniform_ratio], dtype=torch.float64)


def mask_info(volume: np.ndarray | torch.Tensor, cfg: MaskingConfig,
              value_range: tuple[float, float] | None = None) -> tuple[int, torch.Tensor]:
    """Steps 1 and 2 for one sample: (grid, per-cell ratios (grid**3,) float64). The "uniform" baseline does not
    look at the image."""
    if cfg.strategy == "uniform":
        return uniform_mask_info(cfg)
    choice = select_grid(volume, cfg, value_range)
    return choice.grid, cell_mask_ratios(choice.entropy, cfg)


# ------------------------------------------------------------------------------------------ 3. token masks
def draw_masks(grids: Sequence[int], ratios: Sequence[Tensor], token_grids: Sequence[Shape3], cfg: MaskingConfig,
               seeds: Sequence[int]) -> list[Tensor | None]:
    """Token masks of one batch, one bool (B, Nd, Nh, Nw) tensor (True = masked) or None per insertion point.

    grids, ratios: per sample, from `mask_info`; token_grids: `gmim_hub.masking.token_grids(roi_size)`; seeds: one
    int per sample, in batch order. The generator is seeded from the samples' seeds, so the masks depend only on
    the samples in the batch (not on which loader worker made it): a loader rebuilt for the same epoch gives the
    same masks again, which is what makes resume exact. Hierarchy: r * h^t at point t (`hierarchical_decay`), each
    point t >= 1 applied with probability `extra_mask_prob`; see `sample_stage_masks` for the exact-count draw."""
    state = np.random.SeedSequence([int(s) for s in seeds]).generate_state(1, np.uint64)[0]
    generator = torch.Generator().manual_seed(int(state) >> 1)
    return sample_stage_masks(grids, ratios, token_grids, cfg, generator)


# ------------------------------------------------------------------------------ 4. forward and losses
@dataclass
class StepOutput:
    """What one forward pass gives: the network's outputs, the losses and the voxels the reconstruction loss saw."""

    out: PretrainingOutput
    losses: LossOutput
    loss_mask: Tensor  # (B, 1, D, H, W) bool


def forward_loss(model: GMIMModel | torch.nn.Module, x: Tensor, y: Tensor, masks: Sequence[Tensor | None],
                 config: GMIMConfig) -> StepOutput:
    """Step 4. x, y: (B, C, *roi) online and target views; masks: `draw_masks` output, on x's device.

    `model(x, y, masks)` (`GMIMModel.forward`) runs the online encoder on x with `x * ~mask` applied to the tokens
    at each insertion point, the target encoder on y under `torch.no_grad` (the same weights, or an EMA copy when
    `target_momentum > 0`), projects the deepest tokens of both (z_x, z_y) and decodes the online ones into a
    reconstruction of x. The reconstruction loss sees the voxels under the first insertion point's mask (or
    under any point's, `loss_mask="union"`). Call it inside the caller's autocast region; the losses upcast."""
    loss_mask = voxel_loss_mask(masks, config.patch_size, config.masking.loss_mask)
    out = model(x, y, masks)
    losses = gmim_loss(out.z_x, out.z_y, out.reconstruction, x, loss_mask, config.loss)
    return StepOutput(out=out, losses=losses, loss_mask=loss_mask)
