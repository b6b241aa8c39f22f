"""GMIM's adaptive, hierarchical grid masking (docs/method.md): pure, seeded functions.

Pipeline: `select_grid` + `cell_mask_ratios` per sample (CPU, in data workers via `GridChoiced`), then
`sample_stage_masks` for the batch with a seeded `torch.Generator` (in the workers too, via `MaskSeedd` and
`MaskingCollate`), then `voxel_loss_mask` for the loss in the training step.
Masks are bool tensors, True = masked.
"""

from gmim_hub.masking.entropy import (
    GridChoice,
    cell_entropies,
    cell_entropy,
    cell_mask_ratios,
    check_grids_divide,
    select_grid,
)
from gmim_hub.masking.masks import sample_stage_masks, token_grids, voxel_loss_mask
from gmim_hub.masking.transforms import (
    GridChoiced,
    MaskingCollate,
    MaskSeedd,
    collate_mask_info,
    collate_with_mask_info,
    uniform_mask_info,
)

__all__ = [
    "GridChoice", "GridChoiced", "MaskSeedd", "MaskingCollate", "cell_entropies", "cell_entropy", "cell_mask_ratios", "check_grids_divide",
    "collate_mask_info", "collate_with_mask_info", "sample_stage_masks", "select_grid", "token_grids",
    "uniform_mask_info", "voxel_loss_mask",
]
