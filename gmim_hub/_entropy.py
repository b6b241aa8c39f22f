"""Cell entropies, bit-exact: the arithmetic behind `gmim_hub.method.select_grid` (private; the method reads
`cell_entropies` as "the Shannon entropy of each cell's voxel values, channels pooled").

Everything here is numpy on the CPU, pure and deterministic, so it can run per sample in data-loader workers
instead of inside the model on the GPU, as the original did.

Bit-exactness. The original ranks cells by their *distinct* entropy values, so a last-ulp difference
changes ratios. `skimage.measure.shannon_entropy` is `scipy.stats.entropy(np.unique counts, base=2)`: counts / their
sum, `scipy.special.entr`, `np.sum`, then `/ math.log(2)`. We do the same arithmetic on all cells at once: a row-wise
sort of the finest grid's cells gives every cell's runs (= np.unique values and counts, same order), coarser nested
grids merge those runs instead of re-sorting the voxels, `entr` is applied to the same quotients, and the per-cell
sums reuse `np.sum` on blocks of equally long rows, because numpy's pairwise summation depends only on the row
length. The tests check equality with scipy, not closeness.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy import special

from gmim_hub.errors import ConfigError, InputError

__all__ = ["cell_entropies", "cell_entropy", "check_grids_divide"]


def check_grids_divide(spatial_size: Sequence[int], grids: Sequence[int]) -> None:
    """Raise ConfigError unless every grid divides every side of `spatial_size` (cells must tile the volume)."""
    size = tuple(int(s) for s in spatial_size)
    for g in grids:
        if any(s % g for s in size):
            common = math.gcd(*size)
            ok = [d for d in range(2, min(common, 64) + 1) if common % d == 0]
            raise ConfigError(
                f"grid {g} does not divide the volume/roi size {size} (masking.grids={tuple(grids)}); "
                f"choose masking.grids whose values all divide roi_size (here: {ok or [1]})"
            )


def _as_volume(volume: np.ndarray | torch.Tensor) -> np.ndarray:
    """Validate and convert a (C, D, H, W) volume to numpy without copying when possible."""
    if isinstance(volume, torch.Tensor):
        t = volume.detach().cpu()
        if t.dtype in (torch.bfloat16, torch.float16):
            t = t.float()
        volume = t.as_subclass(torch.Tensor).numpy()
    arr = np.asarray(volume)
    if arr.ndim != 4:
        raise InputError(f"volume must be 4-D (C, D, H, W), got shape {tuple(arr.shape)}; add a channel axis "
                         "with volume[None] for a single-channel 3-D image")
    if arr.size == 0:
        raise InputError(f"volume is empty, shape {tuple(arr.shape)}")
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)
            or arr.dtype == np.bool_):
        raise InputError(f"volume must hold real numbers, got dtype {arr.dtype}")
    if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
        bad = int(arr.size - np.count_nonzero(np.isfinite(arr)))
        raise InputError(f"volume has {bad} non-finite value(s) (NaN or inf); clean it (e.g. np.nan_to_num) "
                         "before computing the masking entropy")
    return arr


def _spatial_rows(volume: np.ndarray, g: int) -> np.ndarray:
    """(C, D, H, W) -> (g^3, C * cell voxels): spatial cells in raster order, channels pooled."""
    c, d, h, w = volume.shape
    v = volume.reshape(c, g, d // g, g, h // g, g, w // g).transpose(1, 3, 5, 0, 2, 4, 6)
    return v.reshape(g**3, -1)


def _chained_rows(volume: np.ndarray, grids: Sequence[int]) -> list[np.ndarray]:
    """The original's buffer-reuse bug (docs/method.md, "Grid choice"): each grid re-views the previous grid's
    (G, C, T) buffer as if it were the (C, D, H, W) volume, so only the first grid's cells are spatial."""
    c, d, h, w = volume.shape
    image, out = volume, []
    for g in grids:
        v = image.reshape(c, g, d // g, g, h // g, g, w // g).transpose(0, 1, 3, 5, 2, 4, 6)
        v = np.ascontiguousarray(v.reshape(c, g**3, -1).transpose(1, 0, 2))  # (G, C, T)
        out.append(v.reshape(g**3, -1))
        image = v.reshape(c, d, h, w)
    return out


@dataclass(frozen=True)
class _Runs:
    """Distinct values of every cell with their counts, cell by cell, ascending values (= np.unique per cell)."""

    values: np.ndarray  # (R,) distinct values
    counts: np.ndarray  # (R,) int64 occurrences
    lengths: np.ndarray  # (G,) number of distinct values per cell


def _runs_of_rows(rows: np.ndarray) -> _Runs:
    """Runs of each row of (G, M): one vectorised sort, then run starts where neighbouring values differ."""
    n_rows, m = rows.shape
    s = np.sort(rows, axis=1)
    run_start = np.empty((n_rows, m), dtype=bool)
    run_start[:, 0] = True
    np.not_equal(s[:, 1:], s[:, :-1], out=run_start[:, 1:])
    starts = np.flatnonzero(run_start)
    return _Runs(s.reshape(-1)[starts], np.diff(starts, append=n_rows * m), run_start.sum(axis=1))


def _coarsen_runs(runs: _Runs, g_fine: int, g: int) -> _Runs:
    """Runs of the g-grid cells from the runs of the g_fine-grid cells they consist of (g divides g_fine): order
    the runs by (parent cell, value), then merge equal neighbours. Cheaper than re-sorting every voxel when the
    fine cells have many ties (typical: few hundred intensity levels)."""
    q = g_fine // g
    d, h, w = np.unravel_index(np.arange(g_fine**3), (g_fine,) * 3)
    parent = (((d // q) * g + h // q) * g + w // q).astype(np.uint16 if g**3 <= 1 << 16 else np.int64)
    parent_of_run = np.repeat(parent, runs.lengths)
    by_value = np.argsort(runs.values)  # ties among equal values are merged below, so no need for stability
    order = by_value[np.argsort(parent_of_run[by_value], kind="stable")]  # radix sort on uint16
    v, p = runs.values[order], parent_of_run[order]
    new = np.empty(v.size, dtype=bool)
    new[0] = True
    new[1:] = (v[1:] != v[:-1]) | (p[1:] != p[:-1])
    starts = np.flatnonzero(new)
    return _Runs(v[starts], np.add.reduceat(runs.counts[order], starts), np.bincount(p[starts], minlength=g**3))


def _entropy_of_runs(runs: _Runs, cell_size: int) -> np.ndarray:
    """Cell entropies in bits, with scipy.stats.entropy's arithmetic: counts / total, entr, np.sum, / log(2)."""
    return _sum_rows(special.entr(runs.counts / cell_size), runs.lengths) / math.log(2)


def _spatial_runs(volume: np.ndarray, grids: Sequence[int]) -> dict[int, _Runs]:
    """Runs for every grid, finest first; a coarser grid is merged from a finer one it divides when that finer
    grid has at most a quarter as many runs as voxels (else re-sorting the voxels is faster)."""
    out: dict[int, _Runs] = {}
    for g in sorted(set(grids), reverse=True):
        finer = [f for f in sorted(out) if f % g == 0 and out[f].values.size * 4 <= volume.size]
        out[g] = _coarsen_runs(out[finer[0]], finer[0], g) if finer else _runs_of_rows(_spatial_rows(volume, g))
    return out


def _sum_rows(terms: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Sum consecutive segments of `terms` (segment i has lengths[i] items) exactly as `np.sum` on each segment
    would: segments of equal length are stacked and reduced together (loop over distinct lengths, not cells)."""
    if np.all(lengths == lengths[0]):  # e.g. continuous values: every cell has all-distinct values
        return terms.reshape(len(lengths), -1).sum(axis=1)
    offsets = np.cumsum(lengths) - lengths
    order = np.argsort(lengths, kind="stable")
    sorted_len = lengths[order]
    bounds = np.flatnonzero(np.diff(sorted_len)) + 1
    out = np.empty(len(lengths), dtype=np.float64)
    for group in np.split(order, bounds):
        n = int(lengths[group[0]])
        out[group] = terms[offsets[group, None] + np.arange(n)].sum(axis=1)
    return out


def _bin_index(volume: np.ndarray, bins: int, value_range: tuple[float, float]) -> np.ndarray:
    """Histogram bin of every voxel: `bins` equal bins over value_range, values outside in the end bins."""
    lo, hi = float(value_range[0]), float(value_range[1])
    idx = np.floor((volume.astype(np.float64) - lo) * (bins / (hi - lo)))
    return np.clip(idx, 0, bins - 1).astype(np.int32 if bins > 32767 else np.int16)


def _histogram_entropy(rows: np.ndarray, bins: int) -> np.ndarray:
    """Entropy (bits) of the bin histogram of each row of (G, M) bin indices: one bincount for all cells."""
    n_rows, m = rows.shape
    flat = (np.arange(n_rows, dtype=np.int64)[:, None] * bins + rows).ravel()
    counts = np.bincount(flat, minlength=n_rows * bins).reshape(n_rows, bins)
    return special.entr(counts / m).sum(axis=1) / math.log(2)


def cell_entropies(volume: np.ndarray | torch.Tensor, grids: Sequence[int], *, legacy_chained_cells: bool = False,
                   estimator: str = "unique", bins: int = 64,
                   value_range: tuple[float, float] | None = None) -> list[np.ndarray]:
    """Cell entropies for each grid in `grids` (same order): a list of (g^3,) float64 arrays, bits.

    volume: (C, D, H, W); every grid must divide D, H and W. Channels are pooled within a cell. With
    `legacy_chained_cells=True` the grids are chained in the given order as the original did. estimator "unique":
    entropy of the distinct values (the original); "histogram": of `bins` fixed bins over `value_range`
    (required), so resampled and float images give entropies of their content (docs/method.md, "Cell entropy")."""
    vol = _as_volume(volume)
    check_grids_divide(vol.shape[1:], grids)
    if estimator == "histogram":
        if value_range is None:
            raise ConfigError("the histogram cell entropy needs an intensity range: set masking.histogram_range "
                              "(or pass value_range=GMIMConfig.histogram_range)")
        index = _bin_index(vol, bins, value_range)
        rows = _chained_rows(index, grids) if legacy_chained_cells else [_spatial_rows(index, g) for g in grids]
        return [_histogram_entropy(r, bins) for r in rows]
    if estimator != "unique":
        raise ConfigError(f"estimator must be 'unique' or 'histogram', got {estimator!r}")
    if legacy_chained_cells:
        runs = [_runs_of_rows(r) for r in _chained_rows(vol, grids)]
    else:
        by_grid = _spatial_runs(vol, grids)
        runs = [by_grid[g] for g in grids]
    return [_entropy_of_runs(r, vol.size // g**3) for r, g in zip(runs, grids, strict=True)]


def cell_entropy(volume: np.ndarray | torch.Tensor, grid: int, *, legacy_chained_cells: bool = False,
                 preceding_grids: Sequence[int] = ()) -> np.ndarray:
    """Entropies (bits) of the grid**3 cells of volume (C, D, H, W), raster (d, h, w) order, channels pooled.

    In legacy mode the cells of a grid depend on the grids computed before it in the original's loop; pass them as
    `preceding_grids` (e.g. grid=16, preceding_grids=(4, 8)). Without them legacy cells equal spatial cells."""
    grids = (*preceding_grids, grid) if legacy_chained_cells else (grid,)
    return cell_entropies(volume, grids, legacy_chained_cells=legacy_chained_cells)[-1]
