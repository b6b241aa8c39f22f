"""The presets: complete model recipes, written as the `config.json` fields that differ from the `GMIMConfig`
defaults (every other field, and what it means, is in `gmim_hub/config.py`).

Plain data, on purpose: `gmim_hub.config` builds `PRESETS` from `RECIPES` with the same strict reader as a
`config.json` (`GMIMConfig.from_dict(..., partial=True)`), so a recipe with a misspelt or invalid key fails at
import, and this module imports nothing from the package. Use `gmim_hub.PRESETS` / `get_preset(name)`.
"""

from __future__ import annotations

from typing import Any

__all__ = ["AMOS_ORGANS", "RECIPES"]

# AMOS_ORGANS is the AMOS 2022 label map, labels 1-15 in index order, with the names exactly as the dataset's published
# dataset.json spells them (checked against the `labels` of dataset_ct.json in the AMOS organisers' public repository,
# and against independent AMOS conversion scripts that copy the release's map): "gall bladder", "arota" (sic: the
# aorta) and "postcava" (the inferior vena cava). They are kept verbatim so that the preset's class names and indices
# equal those `gmim train` reads from an AMOS dataset.json.
AMOS_ORGANS = ("spleen", "right kidney", "left kidney", "gall bladder", "esophagus", "liver", "stomach", "arota",
               "postcava", "pancreas", "right adrenal gland", "left adrenal gland", "duodenum", "bladder",
               "prostate/uterus")

RECIPES: dict[str, dict[str, Any]] = {
    # fast CPU tests and the demo: ~0.6 M encoder parameters, 64^3 windows
    "tiny": {
        "in_channels": 1, "out_channels": 2, "feature_size": 12, "depths": (2, 1, 1, 1), "num_heads": (3, 6, 12, 24),
        "window_size": 7, "roi_size": (64, 64, 64), "projector_dim": 64,
        "masking": {"grids": (2, 4, 8)},  # grids must divide the 64-voxel ROI
    },
    # the paper: Swin UNETR base (feature_size 48), 128^3 pre-training crops, CT (1 channel)
    "base": {
        "in_channels": 1, "out_channels": 2, "feature_size": 48, "roi_size": (128, 128, 128),
        "data": {"modality": "CT", "channel_names": ("CT",), "intensity": "ct_window"},
    },
    # The paper's two recipes (Qi et al. 2024, experiments: BraTS 2021 and AMOS 2022 fine-tuning). Both keep the
    # paper's Swin UNETR base (feature_size 48, depths 2-2-2-2, heads 3-6-12-24; original code's default), its masking
    # (grids 4/8/16, r0 0.5, scale 0.3, h 0.5, p 0.3; the original code's README run) and its loss weights
    # (MaskingConfig and LossConfig defaults). Only what differs per dataset is set here: channels, classes, ROI,
    # spacing, intensity and, through `data.multi_label`, the fine-tuning loss (sigmoid Dice + BCE, or softmax
    # Dice + CE; `gmim train --loss`).
    #
    # BraTS 2021: 4 MR channels in, 3 overlapping regions out (TC = labels 1+4, WT = 1+2+4, ET = 4).
    "brats21": {
        "in_channels": 4, "out_channels": 3, "feature_size": 48,
        "roi_size": (128, 128, 128),  # pre-training crops and the fine-tuning / inference window: original default
        "data": {
            "modality": "MRI",
            "channel_names": ("FLAIR", "T1", "T1ce", "T2"),  # the order the original pre-training stacked (sorted)
            "intensity": "zscore_nonzero",  # channel-wise z-score over non-zero voxels: original code's default
            "spacing": (1.0, 1.0, 1.0),  # BraTS ships 1 mm isotropic volumes; the original never resampled them
            "label_names": ("TC", "WT", "ET"),  # converted from the BraTS codes 1/2/4 by the data pipeline
            "multi_label": True,  # sigmoid per region, as the original (its loss: sigmoid Dice; ours adds BCE)
        },
    },
    # Abdominal CT in the BTCV / AMOS style: 1 channel, background + the 15 organs of the AMOS 2022 label map in its
    # index order and spelling (AMOS_ORGANS; a BTCV dataset.json's 13 organs replace them under `gmim train --preset
    # ct_abdomen`).
    "ct_abdomen": {
        "in_channels": 1, "out_channels": 1 + len(AMOS_ORGANS), "feature_size": 48,
        "roi_size": (128, 128, 128),  # original code's default for AMOS 2022
        "data": {
            "modality": "CT", "channel_names": ("CT",),
            "intensity": "ct_window",
            "ct_window": (-175.0, 250.0),  # abdominal soft-tissue HU window to [0, 1]: original code's AMOS default
            # 1.5 x 1.5 x 2 mm from each file's real affine: Swin UNETR's BTCV recipe (Tang et al., CVPR 2022). The
            # original asked for (2, 2, 1.5) on arrays without geometry: a fixed zoom (docs/method.md, deviation 10).
            "spacing": (1.5, 1.5, 2.0),
            "label_names": ("background", *AMOS_ORGANS),
            "multi_label": False,  # one organ per voxel: softmax + Dice/CE (the original: sigmoid Dice, argmax later)
        },
    },
}
