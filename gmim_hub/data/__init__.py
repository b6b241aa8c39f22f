"""Data: datalists, MONAI pipelines that keep the real affine, the GMIM two-view sampler, seeded loaders, and the
embedded MNI152 demo dataset (`gmim_hub.data.demo`, needs the `demo` extra: nilearn, imported only when used)."""

from gmim_hub.data.datalist import load_datalist
from gmim_hub.data.demo import DemoPaths, build_demo_dataset, demo_config
from gmim_hub.data.loader import epoch_generator, flatten_crops, make_dataset, make_loader
from gmim_hub.data.transforms import (
    TwoViewCropd,
    base_transforms,
    finetune_transforms,
    intensity_transform,
    pretrain_transforms,
    target_view_augment,
)

__all__ = [
    "DemoPaths", "TwoViewCropd", "base_transforms", "build_demo_dataset", "demo_config", "epoch_generator",
    "finetune_transforms", "flatten_crops", "intensity_transform", "load_datalist", "make_dataset", "make_loader",
    "pretrain_transforms", "target_view_augment",
]
