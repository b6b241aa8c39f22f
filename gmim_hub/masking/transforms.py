"""Data-pipeline side of the masking: grid choice, cell ratios and the token masks themselves, in the loader workers.

The original computed the entropies inside the model from GPU tensors (thousands of device->host copies per step,
docs/method.md). Here all of the masking runs on the CPU in the DataLoader workers, overlapped with the model step:

- `GridChoiced` adds each sample's grid and cell ratios (`gmim_hub.method.mask_info`);
- `MaskSeedd` adds a per-sample seed drawn from its own random state, which the loader seeds per worker from
  `(seed, epoch, rank)` like every other random transform;
- `MaskingCollate` (the DataLoader's `collate_fn`, also run in the worker) collates the batch and draws its token
  masks with `gmim_hub.method.draw_masks`, from a generator seeded by the batch's sample seeds. The masks therefore depend
  only on the samples in the batch, not on which worker made it or how many workers there are, and a loader
  rebuilt for the same `(seed, epoch)` gives the same masks again (what resume relies on).

`collate_with_mask_info` collates without drawing masks (`grids: list[int]`, `ratios: list[Tensor]`, whose
lengths differ per grid) for callers that draw masks themselves with their own generator.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.data import list_data_collate
from monai.transforms import MapTransform, Randomizable, Transform

from gmim_hub._token_masks import Shape3
from gmim_hub.config import MaskingConfig
from gmim_hub.errors import ConfigError, InputError
from gmim_hub.method import draw_masks, mask_info

__all__ = ["GridChoiced", "MaskSeedd", "MaskingCollate", "collate_mask_info", "collate_with_mask_info"]

GRID_KEY = "mask_grid"
RATIOS_KEY = "mask_ratios"
SEED_KEY = "mask_seed"
MASKS_KEY = "masks"


class GridChoiced(MapTransform):
    """Add `mask_grid` (int) and `mask_ratios` (float64 (g^3,)) computed from `data[key]` (C, D, H, W); with
    `cfg.strategy == "uniform"` the grid is 1 and the ratio the uniform one, whatever the image.

    Deterministic (no randomness), so it needs no worker seeding. Put it after the crop that yields the online
    view, i.e. on the exact tensor the encoder will receive, as in the original. value_range: the intensity range
    of the histogram cell entropy when `cfg.histogram_range` is None (pass `GMIMConfig.histogram_range`)."""

    def __init__(self, keys: Hashable | Sequence[Hashable] = ("image",), cfg: MaskingConfig | None = None,
                 grid_key: str = GRID_KEY, ratios_key: str = RATIOS_KEY, allow_missing_keys: bool = False,
                 value_range: tuple[float, float] | None = None) -> None:
        super().__init__(keys, allow_missing_keys)
        if len(self.keys) != 1:
            raise ConfigError(f"GridChoiced takes exactly one image key (the online view), got {self.keys!r}")
        self.cfg = cfg if cfg is not None else MaskingConfig()
        self.value_range = value_range  # the histogram estimator's range (GMIMConfig.histogram_range)
        self.grid_key, self.ratios_key = grid_key, ratios_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[self.grid_key], d[self.ratios_key] = mask_info(d[key], self.cfg, self.value_range)
        return d


def _flatten(batch: Sequence[Any]) -> list[Any]:
    """Flatten one level of lists, as MONAI's list_data_collate does for multi-sample crops."""
    return [s for item in batch for s in (item if isinstance(item, list) else [item])]


def collate_mask_info(batch: Sequence[Mapping[Hashable, Any]], grid_key: str = GRID_KEY,
                      ratios_key: str = RATIOS_KEY) -> tuple[list[int], list[torch.Tensor]]:
    """Per-sample grids and ratio tensors from a list of samples (dicts made by `GridChoiced`)."""
    samples = _flatten(batch)
    missing = [i for i, s in enumerate(samples) if grid_key not in s or ratios_key not in s]
    if missing:
        raise InputError(f"samples {missing} lack {grid_key!r}/{ratios_key!r}; add GridChoiced to the transforms")
    return [int(s[grid_key]) for s in samples], [torch.as_tensor(s[ratios_key]) for s in samples]


def collate_with_mask_info(batch: Sequence[Any], collate: Callable[[list[Any]], Any] = list_data_collate,
                           grid_key: str = GRID_KEY, ratios_key: str = RATIOS_KEY) -> dict[Hashable, Any]:
    """DataLoader `collate_fn`: collates everything but the mask info with `collate` (MONAI's list_data_collate by
    default) and returns `grid_key` as list[int] and `ratios_key` as list[Tensor] (lengths differ per grid)."""
    samples = _flatten(batch)
    grids, ratios = collate_mask_info(samples, grid_key, ratios_key)
    rest = [{k: v for k, v in s.items() if k not in (grid_key, ratios_key, SEED_KEY)} for s in samples]
    out = dict(collate(rest))
    out[grid_key], out[ratios_key] = grids, ratios
    return out


class MaskSeedd(Randomizable, Transform):
    """Add `mask_seed`, a 63-bit int drawn from this transform's random state (seeded per loader worker like every
    MONAI random transform), for `MaskingCollate`. Put it after `GridChoiced`."""

    def __init__(self, key: str = SEED_KEY) -> None:
        self.key = key
        self._seed = 0

    def randomize(self, data: Any = None) -> None:
        self._seed = int(self.R.randint(0, np.iinfo(np.int64).max, dtype=np.int64))

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        self.randomize()
        return {**data, self.key: self._seed}


class MaskingCollate:
    """DataLoader `collate_fn` that collates like `collate_with_mask_info` and also draws the batch's token masks
    (`gmim_hub.method.draw_masks` with `cfg` and `token_grids`), so that masking runs in the workers, not in the training
    step. Adds `masks`: one bool (B, Nd, Nh, Nw) tensor or None per insertion point.

    The generator is seeded from the samples' `mask_seed`s (`MaskSeedd`), in batch order: the same samples in the
    same order give the same masks. Picklable, so it works with worker processes."""

    def __init__(self, cfg: MaskingConfig, token_grids: Sequence[Shape3],
                 collate: Callable[[list[Any]], Any] = list_data_collate) -> None:
        self.cfg, self.collate = cfg, collate
        self.token_grids = [tuple(int(n) for n in g) for g in token_grids]

    def __call__(self, batch: Sequence[Any]) -> dict[Hashable, Any]:
        samples = _flatten(batch)
        missing = [i for i, s in enumerate(samples) if SEED_KEY not in s]
        if missing:
            raise InputError(f"samples {missing} lack {SEED_KEY!r}; add MaskSeedd after GridChoiced to the transforms")
        seeds = [int(s[SEED_KEY]) for s in samples]
        out = collate_with_mask_info(samples, self.collate)
        out[MASKS_KEY] = draw_masks(out[GRID_KEY], out[RATIOS_KEY], self.token_grids, self.cfg, seeds)
        return out
