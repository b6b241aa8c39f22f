"""The original GMIM masking arithmetic, transcribed statelessly (per-cell loops, np.unique + scipy), and the test
volumes that the masking tests compare gmim_hub against."""

from __future__ import annotations

import numpy as np
from scipy.stats import entropy as scipy_entropy

from gmim_hub.config import MaskingConfig


def UniqueCfg(**kw) -> MaskingConfig:
    """The original's cell entropy (distinct values), which the reproductions below compare against."""
    return MaskingConfig(entropy_estimator="unique", **kw)


def appendix_cells(vol, g):
    c, d, h, w = vol.shape
    v = vol.reshape(c, g, d // g, g, h // g, g, w // g).transpose(1, 3, 5, 0, 2, 4, 6)
    return v.reshape(g**3, -1)


def appendix_entropy(a):
    _, cnt = np.unique(a, return_counts=True)
    return scipy_entropy(cnt, base=2)


def appendix_cells_chained(vol, grids):
    c, d, h, w = vol.shape
    image, out = vol, []
    for g in grids:
        v = image.reshape(c, g, d // g, g, h // g, g, w // g).transpose(0, 1, 3, 5, 2, 4, 6)
        v = v.reshape(c, g**3, -1).transpose(1, 0, 2)
        out.append(v.reshape(g**3, -1))
        image = np.ascontiguousarray(v)
        image = image.reshape(c, d, h, w)
    return out


def appendix_select_grid(vol, grids, legacy):
    cells = appendix_cells_chained(vol, grids) if legacy else [appendix_cells(vol, g) for g in grids]
    hs = [np.array([appendix_entropy(c) for c in cl]) for cl in cells]
    with np.errstate(divide="ignore", invalid="ignore"):
        score = [g**-0.1 * h.std() / h.mean() for g, h in zip(grids, hs, strict=True)]
    best = int(np.argmax(score))
    return grids[best], hs[best], hs


def appendix_cell_ratios(h, r0=0.5, scale=0.3):
    u = sorted(set(h.tolist()))
    levels = np.linspace(1 - scale, 1 + scale, len(u))
    return np.array([r0 * levels[u.index(x)] for x in h])


def appendix_token_cell_layout(n, g):
    """Cell index of every token of an (n, n, n) grid, laid out as the original's mask_token / token_mask."""
    s = n // g
    ids = np.repeat(np.arange(g**3), s**3).reshape(g, g, g, s, s, s)
    return ids.transpose(0, 3, 1, 4, 2, 5).reshape(n, n, n)


def appendix_token_mask(n, g, ratios, rng):
    t = (n // g) ** 3
    m = np.ones((g**3, t))
    for k, r in enumerate(ratios):
        m[k, rng.permutation(t)[: int(t * min(r, 1.0))]] = 0
    s = n // g
    return m.reshape(g, g, g, s, s, s).transpose(0, 3, 1, 4, 2, 5).reshape(n, n, n)


# ---- test volumes ------------------------------------------------------------------------------------------


def smooth_volume(shape, levels, seed):
    """Blocky random field quantised to `levels` values: realistic ties and varied cell entropies."""
    rng = np.random.default_rng(seed)
    c, d, h, w = shape
    coarse = rng.standard_normal((c, d // 4, h // 4, w // 4))
    field = coarse.repeat(4, 1).repeat(4, 2).repeat(4, 3) + 0.3 * rng.standard_normal(shape)
    return np.round((field - field.min()) / np.ptp(field) * (levels - 1)).astype(np.float32)


VOLUMES = {  # 16^3 keeps the per-cell scipy loops fast; 2-grid cells of 512 values exercise long rows
    "uint8-like": lambda: smooth_volume((1, 16, 16, 16), 256, 0),
    "few-values": lambda: smooth_volume((1, 16, 16, 16), 5, 1),
    "two-channel": lambda: smooth_volume((2, 16, 16, 16), 40, 2),
    "continuous": lambda: np.random.default_rng(3).standard_normal((1, 16, 16, 16)).astype(np.float32),
    "background": lambda: smooth_volume((1, 16, 16, 16), 30, 4) * (np.arange(16) < 6)[None, None, None],
    "non-cubic": lambda: smooth_volume((1, 8, 16, 24), 20, 5),
}


def block_cell(values, shape=(4, 4, 4)):
    return np.asarray(values, dtype=np.float32).reshape(shape)


def half_flat_volume():
    """Left half a 0/1 voxel checkerboard (1 bit in any even cell), right half constant: std/mean = 1 exactly."""
    i = np.indices((16, 16, 16)).sum(0) % 2
    vol = np.where(np.arange(16) < 8, i, 5).astype(np.float32)
    return vol[None]
