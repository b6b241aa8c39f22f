"""GMIM's adaptive, hierarchical grid masking: the public names, and the data-pipeline transforms that run it in
the loader workers.

The method itself (grid choice -> ratios -> masks -> forward -> losses) reads top to bottom in `gmim_hub.method`;
this package gathers its masking functions under one name and adds the pipeline side (`transforms.py`):
`GridChoiced` per sample (grid and cell ratios), `MaskSeedd` (a per-sample seed) and `MaskingCollate` (the
DataLoader's `collate_fn`, which draws the batch's token masks). Masks are bool tensors, True = masked.
"""

from gmim_hub._entropy import cell_entropies, cell_entropy, check_grids_divide
from gmim_hub._token_masks import sample_stage_masks, token_grids, voxel_loss_mask
from gmim_hub.masking.transforms import (
    GRID_KEY,
    MASKS_KEY,
    RATIOS_KEY,
    SEED_KEY,
    GridChoiced,
    MaskingCollate,
    MaskSeedd,
    collate_mask_info,
    collate_with_mask_info,
)
from gmim_hub.method import GridChoice, cell_mask_ratios, draw_masks, mask_info, select_grid, uniform_mask_info

__all__ = [
    "GRID_KEY", "MASKS_KEY", "RATIOS_KEY", "SEED_KEY", "GridChoice", "GridChoiced", "MaskSeedd", "MaskingCollate",
    "cell_entropies", "cell_entropy", "cell_mask_ratios", "check_grids_divide", "collate_mask_info",
    "collate_with_mask_info", "draw_masks", "mask_info", "sample_stage_masks", "select_grid", "token_grids",
    "uniform_mask_info", "voxel_loss_mask",
]
