"""Data-pipeline side of the masking: grid choice and cell ratios per sample, in the loader workers.

The original computed the entropies inside the model from GPU tensors (thousands of device->host copies per step,
spec 2.1). Here `GridChoiced` computes them on the CPU in the workers. Per-sample ratio vectors have different
lengths (g^3 for the sample's grid), so the default collate cannot stack them: use `collate_with_mask_info` as the
DataLoader's `collate_fn` (or `collate_mask_info` on a list of samples) to get `grids: list[int]` and
`ratios: list[Tensor]`, then call `sample_stage_masks(grids, ratios, token_grids(roi), cfg, generator)` in the main
process with a seeded generator. Drawing the masks there keeps them reproducible regardless of worker count.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any

import torch
from monai.data import list_data_collate
from monai.transforms import MapTransform

from gmim_hub.config import MaskingConfig
from gmim_hub.errors import ConfigError, InputError
from gmim_hub.masking.entropy import cell_mask_ratios, select_grid

__all__ = ["GridChoiced", "collate_mask_info", "collate_with_mask_info"]

GRID_KEY = "mask_grid"
RATIOS_KEY = "mask_ratios"


class GridChoiced(MapTransform):
    """Add `mask_grid` (int) and `mask_ratios` (float32 (g^3,)) computed from `data[key]` (C, D, H, W).

    Deterministic (no randomness), so it needs no worker seeding. Put it after the crop that yields the online
    view, i.e. on the exact tensor the encoder will receive, as in the original."""

    def __init__(self, keys: Hashable | Sequence[Hashable] = ("image",), cfg: MaskingConfig | None = None,
                 grid_key: str = GRID_KEY, ratios_key: str = RATIOS_KEY, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        if len(self.keys) != 1:
            raise ConfigError(f"GridChoiced takes exactly one image key (the online view), got {self.keys!r}")
        self.cfg = cfg if cfg is not None else MaskingConfig()
        self.grid_key, self.ratios_key = grid_key, ratios_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            choice = select_grid(d[key], self.cfg)
            d[self.grid_key] = choice.grid
            d[self.ratios_key] = cell_mask_ratios(choice.entropy, self.cfg)
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
    rest = [{k: v for k, v in s.items() if k not in (grid_key, ratios_key)} for s in samples]
    out = dict(collate(rest))
    out[grid_key], out[ratios_key] = grids, ratios
    return out
