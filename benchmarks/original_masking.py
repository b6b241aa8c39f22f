"""Baseline for P3: a re-creation of the original GMIM masking approach (docs/method.md), written for this benchmark.

What it re-creates, because that is what costs time in the original:

- a **stateful** mask layer that lives inside the encoder's forward pass: `initial(x)` runs on the batch at the
  start of every forward, and each call of the layer advances a step counter and decays the ratios;
- the grid choice computes one Shannon entropy per cell with `np.unique` + `scipy.stats.entropy` (what
  `skimage.measure.shannon_entropy` does), for every sample and every candidate grid (64 + 512 + 4096 cells for
  grids 4/8/16 at ROI 128), on per-cell slices of the batch tensor converted to numpy one by one, with the
  original's chained buffer re-use between grids (docs/method.md, "Grid choice");
- ranks of distinct entropies -> per-cell ratios;
- token masks built per sample and per cell: a 0/1 vector with floor(T * r) zeros, `np.random.shuffle`d, scattered
  into the token grid and multiplied into the features; extra calls with probability p, one draw for the
  whole batch; the t=0 mask kept for the loss.

It is not the original's code (none is copied); it follows the behaviour docs/method.md describes and a stateless
reference transcription. `OriginalMaskedEncoder` has exactly the parameters of
`gmim_hub.models.encoder.MaskedSwinEncoder`, so both sides of P3 train the same network.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.stats import entropy as scipy_entropy
from torch import Tensor

from gmim_hub.config import GMIMConfig, MaskingConfig
from gmim_hub.models.encoder import MaskedSwinEncoder

STATEFUL = "stateful"  # the `masks` argument that selects the in-forward mask layer


def shannon_entropy(values: np.ndarray) -> float:
    """Base-2 entropy of the distinct exact values (skimage.measure.shannon_entropy's definition)."""
    _, counts = np.unique(values, return_counts=True)
    return float(scipy_entropy(counts, base=2))


class OriginalGridMaskLayer(torch.nn.Module):
    """The original's stateful grid mask layer: `initial(x)` per forward, then one call per insertion point."""

    def __init__(self, cfg: MaskingConfig) -> None:
        super().__init__()
        self.grids = tuple(cfg.grids)
        self.penalty, self.r0, self.scale = cfg.grid_penalty, cfg.base_ratio, cfg.scale
        self.dynamic, self.decay, self.p = cfg.dynamic, cfg.hierarchical_decay, cfg.extra_mask_prob
        self.step = 0
        self.grid_resolution: list[int] = []
        self.ratios: list[np.ndarray] = []
        self.mask_list: list[np.ndarray] = []

    # ----------------------------------------------------------------------------------- per-batch state
    def initial(self, x: Tensor) -> None:
        """x: (B, C, S, S, S), the online view. Chooses a grid and per-cell ratios for every sample."""
        self.step, self.mask_list = 0, []
        self.grid_resolution, self.ratios = [], []
        for b in range(x.shape[0]):
            grid, ent = self._grid_resolution(x[b])
            self.grid_resolution.append(grid)
            self.ratios.append(self._dynamic_ratio(ent))

    def _grid_resolution(self, image: Tensor) -> tuple[int, np.ndarray]:
        c, size = image.shape[0], image.shape[1]
        entropies, scores = [], []
        for g in self.grids:
            s = size // g
            # re-views the previous grid's (G, C, T) buffer as a (C, S, S, S) volume: the original's chaining
            image = image.contiguous().view(c, g, s, g, s, g, s).permute(1, 3, 5, 0, 2, 4, 6).reshape(g**3, c, -1)
            ent = np.array([shannon_entropy(image[k].detach().cpu().numpy()) for k in range(g**3)])
            entropies.append(ent)
            with np.errstate(invalid="ignore", divide="ignore"):
                scores.append(g ** (-self.penalty) * ent.std() / ent.mean())
        best = int(np.argmax(scores))
        return self.grids[best], entropies[best]

    def _dynamic_ratio(self, ent: np.ndarray) -> np.ndarray:
        if not self.dynamic:
            return np.full(len(ent), self.r0)
        distinct = sorted(set(ent.tolist()))
        line = np.linspace(1 - self.scale, 1 + self.scale, len(distinct))
        return np.array([self.r0 * line[distinct.index(h)] for h in ent])

    # ------------------------------------------------------------------------------- one insertion point
    def forward(self, feats: Tensor) -> Tensor:
        """feats: (B, Ch, N, N, N). Call 0 always masks; later calls with probability p (one draw per batch)."""
        if self.step == 0 or (self.decay > 0 and np.random.random(1)[0] < self.p):
            feats = self._mask_token(feats)
        self.step += 1
        if self.decay > 0:
            self.ratios = [r * self.decay for r in self.ratios]
        return feats

    def _mask_token(self, feats: Tensor) -> Tensor:
        n = feats.shape[-1]
        masks = []
        for b, g in enumerate(self.grid_resolution):
            s = n // g
            t = s**3
            cell_masks = np.ones((g**3, t))
            for k, r in enumerate(self.ratios[b]):
                vec = np.ones(t)
                vec[:int(t * min(r, 1.0))] = 0
                np.random.shuffle(vec)
                cell_masks[k] = vec
            masks.append(cell_masks.reshape(g, g, g, s, s, s).transpose(0, 3, 1, 4, 2, 5).reshape(n, n, n))
        stacked = np.stack(masks)  # (B, N, N, N), 1 = visible
        if self.step == 0:
            self.mask_list = masks
        return feats * torch.from_numpy(stacked).to(feats.device, feats.dtype)[:, None]

    def voxel_loss_mask(self, patch: int = 2) -> Tensor:
        """(B, 1, D, H, W) bool, True where the t=0 token was masked (the loss's voxels)."""
        m0 = np.stack(self.mask_list)
        up = m0.repeat(patch, 1).repeat(patch, 2).repeat(patch, 3)
        return torch.from_numpy(up == 0)[:, None]


class OriginalMaskedEncoder(MaskedSwinEncoder):
    """Same parameters as `MaskedSwinEncoder`; with `masks=STATEFUL` the masks come from a stateful layer called
    inside forward (the online branch). Any other `masks` (None for the target branch) runs the parent's forward,
    as the original's target encoder whose mask layer is an Identity."""

    def __init__(self, cfg: GMIMConfig) -> None:
        super().__init__(cfg)
        self.mask_layer = OriginalGridMaskLayer(cfg.masking)

    def forward(self, x: Tensor, masks=None, normalize: bool = True) -> list[Tensor]:  # type: ignore[override]
        if not isinstance(masks, str) or masks != STATEFUL:
            return super().forward(x, masks, normalize)
        layer = self.mask_layer
        layer.initial(x)
        x0 = layer(self.patch_embed(x))
        x0 = self.pos_drop(x0)
        x0_out = self.proj_out(x0, normalize)
        x0 = layer(x0)
        x1 = self._stage(x0, 1)
        x1_out = self.proj_out(x1, normalize)
        x1 = layer(x1)
        x2 = self._stage(x1, 2)
        x2_out = self.proj_out(x2, normalize)
        x2 = layer(x2)
        x3 = self._stage(x2, 3)
        x3_out = self.proj_out(x3, normalize)
        x4 = self._stage(x3, 4)
        return [x0_out, x1_out, x2_out, x3_out, self.proj_out(x4, normalize)]
