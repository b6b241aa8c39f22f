"""MONAI transform pipelines that keep the real geometry: load with the affine, reorient, resample, normalise.

The original read volumes with SimpleITK and threw the affine away, so `Orientationd` was a no-op and "spacing" a
fixed zoom. Here every pipeline starts from `LoadImaged` (nibabel, metadata kept), so
`sample["image"]` is a `MetaTensor` whose `.affine` is the true voxel-to-world (RAS mm) map after every spatial step.

Pipelines (all dict -> dict, or dict -> list of dicts for multi-crop fine-tuning; `Compose` objects):

* `pretrain_transforms`: the GMIM two-view sampler. One outer crop of `roi + margin` (with `random_size=False`, so
  the two views are guaranteed to overlap, which the original did not guarantee), then two `roi`
  crops inside it: `"image"` is the online view x, `"target"` the target view y with the per-sample intensity
  augmentation (the original drew it once per batch and also at validation).
* `finetune_transforms`: labelled crops for training, full volumes for validation.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import (
    Compose,
    ConvertToMultiChannelBasedOnBratsClassesd,
    EnsureChannelFirstd,
    EnsureTyped,
    LoadImaged,
    MapTransform,
    NormalizeIntensityd,
    Orientationd,
    RandAdjustContrastd,
    RandCropByPosNegLabeld,
    RandFlipd,
    RandGaussianNoised,
    Randomizable,
    RandScaleIntensityd,
    RandShiftIntensityd,
    RandSpatialCropd,
    RandSpatialCropSamplesd,
    ScaleIntensityd,
    ScaleIntensityRanged,
    Spacingd,
    SpatialPadd,
)
from monai.utils import MAX_SEED

from gmim_hub.config import DataConfig, GMIMConfig
from gmim_hub.errors import ConfigError

BRATS_LABEL_NAMES = ("TC", "WT", "ET")


def intensity_transform(data_cfg: DataConfig, keys: KeysCollection) -> MapTransform:
    """The intensity normalisation named by `data_cfg.intensity`.

    * `ct_window`: HU in `data_cfg.ct_window` mapped linearly to [0, 1] and clipped (the original used [-1000, 1000]).
    * `zscore_nonzero`: per channel, (x - mean) / std over the non-zero voxels; zeros (background, skull-stripped
      or padded voxels) stay 0 (the original's MRI normalisation).
    * `minmax`: per channel, rescaled to [0, 1].
    """
    if data_cfg.intensity == "ct_window":
        lo, hi = data_cfg.ct_window
        return ScaleIntensityRanged(keys, a_min=lo, a_max=hi, b_min=0.0, b_max=1.0, clip=True)
    if data_cfg.intensity == "zscore_nonzero":
        return NormalizeIntensityd(keys, nonzero=True, channel_wise=True)
    if data_cfg.intensity == "minmax":
        return ScaleIntensityd(keys, minv=0.0, maxv=1.0, channel_wise=True)
    raise ConfigError(f"data.intensity must be 'ct_window', 'zscore_nonzero' or 'minmax', got {data_cfg.intensity!r}")


def base_transforms(
    cfg: GMIMConfig,
    keys: Sequence[str] = ("image",),
    label_key: str | None = None,
    *,
    label_transform: Callable[[Any], Any] | None = None,
) -> list[Callable[[Any], Any]]:
    """Deterministic preprocessing: load (nibabel, metadata kept) -> channel first -> orientation -> spacing ->
    intensity -> tensors. Returned as a list so callers build one flat `Compose` (which lets `CacheDataset` cache
    this whole prefix).

    Images (`keys`) are resampled bilinearly, the label nearest-neighbour. Labels: a single-channel integer map
    (int64) for softmax tasks; for `cfg.data.multi_label` a float32 multi-channel map, produced by `label_transform`
    when given, else by MONAI's `ConvertToMultiChannelBasedOnBratsClassesd` when `label_names == ("TC", "WT", "ET")`
    (BraTS 2021 codes 1 NCR, 2 ED, 4 ET), else the label file must already hold one channel per class.

    The current voxel-to-world affine is `sample["image"].affine` (also in `sample["image_meta_dict"]["affine"]`);
    the file's own is `sample["image"].meta["original_affine"]` (for writing predictions back in native space).
    """
    keys = [keys] if isinstance(keys, str) else list(keys)
    all_keys = keys + ([label_key] if label_key else [])
    d = cfg.data
    steps: list[Callable[[Any], Any]] = [
        LoadImaged(all_keys, reader="NibabelReader", image_only=False),
        EnsureChannelFirstd(all_keys),
        Orientationd(all_keys, axcodes=d.orientation, labels=None),  # labels from the MetaTensor space (RAS)
    ]
    if d.spacing is not None:
        modes = ["bilinear"] * len(keys) + (["nearest"] if label_key else [])
        steps.append(Spacingd(all_keys, pixdim=d.spacing, mode=modes))
    if label_key and label_transform is not None:
        steps.append(label_transform)
    elif label_key and d.multi_label and tuple(d.label_names) == BRATS_LABEL_NAMES:
        steps.append(ConvertToMultiChannelBasedOnBratsClassesd(label_key))
    steps.append(intensity_transform(d, keys))
    label_dtype = torch.float32 if d.multi_label else torch.int64
    dtypes = [torch.float32] * len(keys) + ([label_dtype] if label_key else [])
    steps.append(EnsureTyped(all_keys, dtype=dtypes, track_meta=True))
    return steps


def target_view_augment(key: str = "target") -> Compose:
    """Spec 4.3's target-view intensity augmentation, applied to one sample (C, D, H, W) with its own draws:
    gamma contrast (p 0.7, gamma in [0.7, 1.5]), shift by U(-0.4, 0.4) (p 0.4), Gaussian noise N(0.05, s^2) with
    s ~ U(0, 0.05) (p 0.5)."""
    return Compose([
        RandAdjustContrastd(key, prob=0.7, gamma=(0.7, 1.5)),
        RandShiftIntensityd(key, offsets=0.4, prob=0.4),
        RandGaussianNoised(key, prob=0.5, mean=0.05, std=0.05),
    ])


class TwoViewCropd(Randomizable, MapTransform):
    """Two `roi_size` crops of `sample[image_key]` (MONAI `RandSpatialCropSamplesd`, `random_size=False`) merged into
    ONE dict: `image_key` holds view x (online), `target_key` view y (target), each (C, *roi_size) with its own
    affine. `target_transform` (e.g. `target_view_augment()`) then runs on the merged dict, so it sees one sample.

    Why one wrapped transform rather than `RandSpatialCropSamplesd` followed by a merge step: the pipeline stays a
    flat dict -> dict `Compose`, so `extra` transforms (masking) receive one dict and `CacheDataset` can cache the
    deterministic prefix. `set_random_state` reseeds the wrapped sampler and the augmentation from this transform's
    own stream, so `monai.data.DataLoader`'s per-worker seeding reaches them.
    """

    def __init__(
        self,
        image_key: str,
        roi_size: Sequence[int],
        *,
        target_key: str = "target",
        target_transform: Callable[[Any], Any] | None = None,
    ) -> None:
        MapTransform.__init__(self, [image_key])
        self.image_key, self.target_key = image_key, target_key
        self.sampler = RandSpatialCropSamplesd([image_key], roi_size=roi_size, num_samples=2, random_size=False)
        self.target_transform = target_transform

    def set_random_state(self, seed: int | None = None, state: np.random.RandomState | None = None) -> TwoViewCropd:
        super().set_random_state(seed, state)
        self.sampler.set_random_state(seed=int(self.R.randint(MAX_SEED, dtype="uint32")))
        if isinstance(self.target_transform, Randomizable):
            self.target_transform.set_random_state(seed=int(self.R.randint(MAX_SEED, dtype="uint32")))
        return self

    def randomize(self, data: Any = None) -> None:
        """The draws belong to the wrapped sampler and augmentation (seeded in `set_random_state`)."""

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        view_x, view_y = self.sampler(data)
        out = dict(view_x)
        out[self.target_key] = view_y[self.image_key]
        return self.target_transform(out) if self.target_transform is not None else out


def pretrain_transforms(
    cfg: GMIMConfig,
    *,
    margin: int = 32,
    train: bool = True,
    target_aug: bool | None = None,
    extra: Sequence[Callable[[Any], Any]] = (),
) -> Compose:
    """GMIM pre-training pipeline: a path dict `{"image": ...}` -> `{"image": x, "target": y, ...}`, x and y
    `MetaTensor`s of shape (C, *cfg.roi_size).

    base -> (train: `RandFlipd` p=0.5 per axis) -> `SpatialPadd(roi + margin)` -> `RandSpatialCropd(roi + margin,
    random_size=False)` -> `TwoViewCropd(roi)` -> `extra` (e.g. the masking `GridChoiced`).

    Both views share the flip and the outer crop; each view's offset inside the outer crop is drawn independently
    (at most `margin` voxels apart per axis, so they always overlap by >= roi - margin). `target_aug` (default: on
    when `train`) applies `target_view_augment` to y only, per sample.
    """
    if not (isinstance(margin, int) and margin >= 0):
        raise ConfigError(f"margin must be an int >= 0, got {margin!r}")
    roi = [int(r) for r in cfg.roi_size]
    outer = [r + margin for r in roi]
    steps = base_transforms(cfg, ["image"])
    if train:
        steps += [RandFlipd("image", prob=0.5, spatial_axis=axis) for axis in range(3)]
    steps += [
        SpatialPadd("image", spatial_size=outer),
        RandSpatialCropd("image", roi_size=outer, random_size=False),
    ]
    use_aug = train if target_aug is None else target_aug
    steps.append(TwoViewCropd("image", roi, target_transform=target_view_augment("target") if use_aug else None))
    steps += list(extra)
    return Compose(steps)


def finetune_transforms(
    cfg: GMIMConfig,
    train: bool,
    *,
    num_samples: int = 2,
    label_transform: Callable[[Any], Any] | None = None,
) -> Compose:
    """Segmentation pipeline on `{"image": ..., "label": ...}`.

    train: base -> `SpatialPadd(roi)` -> `RandCropByPosNegLabeld(roi, pos=1, neg=1, num_samples)` (a list of
    `num_samples` dicts per volume; `list_data_collate` flattens them into the batch) -> flips p=0.5 per axis ->
    `RandScaleIntensityd(0.1, p=0.1)` -> `RandShiftIntensityd(0.1, p=0.1)`.
    validation: base only; full volumes (batch size 1; infer with a sliding window).
    """
    keys = ["image", "label"]
    steps = base_transforms(cfg, ["image"], "label", label_transform=label_transform)
    if train:
        roi = [int(r) for r in cfg.roi_size]
        steps += [
            SpatialPadd(keys, spatial_size=roi),
            RandCropByPosNegLabeld(keys, label_key="label", spatial_size=roi, pos=1, neg=1, num_samples=num_samples),
            *[RandFlipd(keys, prob=0.5, spatial_axis=axis) for axis in range(3)],
            RandScaleIntensityd("image", factors=0.1, prob=0.1),
            RandShiftIntensityd("image", offsets=0.1, prob=0.1),
        ]
    return Compose(steps)
