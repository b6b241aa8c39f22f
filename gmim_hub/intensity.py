"""Intensity statistics of training images (`IntensityReference`, recorded by `gmim train`), and the comparison
prediction makes with them: a CT sent to an MRI model (or the reverse) gives confident nonsense, so it gets a word.

Two statistics decide "far outside", both robust to the arbitrary scale of MRI intensities:

* the fraction of negative voxels as stored (CT air is about -1000 HU; MRI magnitudes are >= 0): far outside when
  it differs from the training data's by more than `NEGATIVE_TOLERANCE`;
* the 1st-99th percentile range of the foreground after the model's normalisation (what the network sees): far
  outside when an end lies beyond the training range widened by its own width on each side.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from gmim_hub.config import DataConfig, IntensityReference
from gmim_hub.errors import InputError

NEGATIVE_TOLERANCE = 0.2
SAMPLE_VOXELS = 1_000_000  # voxels per channel and volume behind the statistics (a regular stride: deterministic)


def normalise_intensity(img: np.ndarray, data: DataConfig) -> np.ndarray:
    """image (C, X, Y, Z) as stored -> the config's intensity normalisation, in float32: the arithmetic of
    `gmim_hub.data.transforms.intensity_transform` (MONAI) in torch alone, so clients need not import MONAI."""
    t = torch.from_numpy(np.ascontiguousarray(img, dtype=np.float32))
    if data.intensity == "ct_window":
        lo, hi = data.ct_window
        return torch.clamp((t - lo) / (hi - lo) * (1.0 - 0.0) + 0.0, 0.0, 1.0).numpy()
    out = t.clone()
    for c in range(t.shape[0]):
        x = t[c]
        if data.intensity == "zscore_nonzero":
            keep = x != 0
            if not keep.any():
                continue
            vals = x[keep]
            mean, std = torch.mean(vals.float()).item(), torch.std(vals.float(), unbiased=False).item()
            out[c][keep] = (vals - mean) / (std if std != 0.0 else 1.0)
        else:  # minmax
            low, high = x.min(), x.max()
            out[c] = (x - low) / (high - low) if high - low != 0 else x * 0.0
    return out.numpy()


def _subsample(image: np.ndarray) -> np.ndarray:
    """(C, X, Y, Z) -> the same with a regular spatial stride, at most about `SAMPLE_VOXELS` voxels per channel."""
    step = max(1, math.ceil((math.prod(image.shape[1:]) / SAMPLE_VOXELS) ** (1 / 3)))
    return np.ascontiguousarray(image[:, ::step, ::step, ::step], dtype=np.float32)


def describe(images: Sequence[np.ndarray], data: DataConfig) -> IntensityReference:
    """Volumes (C, X, Y, Z) as stored -> their statistics together (sub-sampled voxels pooled; the normalisation
    of a sub-sample is that of the volume to within sampling error)."""
    subs = [_subsample(im) for im in images]
    raw = np.concatenate([s.reshape(-1) for s in subs]).astype(np.float64)
    fg = np.concatenate([normalise_intensity(s, data)[s != 0] for s in subs]).astype(np.float64)
    fg = fg if fg.size else np.zeros(1)
    return IntensityReference(
        volumes=len(images), negative_fraction=round(float(np.mean(raw < 0)), 4),
        foreground_fraction=round(float(np.mean(raw != 0)), 4),
        raw_percentiles=tuple(round(float(v), 4) for v in np.percentile(raw, [1, 50, 99])),  # type: ignore[arg-type]
        percentiles=tuple(round(float(v), 4) for v in np.percentile(fg, [1, 50, 99])),  # type: ignore[arg-type]
        mean=round(float(fg.mean()), 4), std=round(float(fg.std()), 4),
    )


def training_reference(paths: Sequence[str | Path], data: DataConfig, *, max_volumes: int = 16) -> IntensityReference:
    """The statistics of up to `max_volumes` training images (evenly spread over the list), read from disk."""
    chosen = list(paths)[:: max(1, -(-len(paths) // max_volumes))]
    images = []
    for p in chosen:
        raw = np.asarray(nib.load(str(p)).dataobj, dtype=np.float32)  # type: ignore[attr-defined]
        images.append(raw[None] if raw.ndim == 3 else np.moveaxis(raw.reshape(*raw.shape[:3], -1), -1, 0))
    return describe(images, data)


def compare(reference: IntensityReference, seen: IntensityReference, modality: str) -> str | None:
    """One line saying how `seen` (one input) is far outside `reference` (the training data), or None."""
    problems = []
    if abs(seen.negative_fraction - reference.negative_fraction) > NEGATIVE_TOLERANCE:
        problems.append(f"{reference.negative_fraction:.0%} of voxels negative expected, "
                        f"{seen.negative_fraction:.0%} seen")
    lo, hi = reference.percentiles[0], reference.percentiles[2]
    width = max(hi - lo, 1e-6)
    if seen.percentiles[0] < lo - width or seen.percentiles[2] > hi + width:
        problems.append(f"normalised 1st-99th percentiles {lo:.2f}..{hi:.2f} expected, "
                        f"{seen.percentiles[0]:.2f}..{seen.percentiles[2]:.2f} seen")
    if not problems:
        return None
    return (f"does not look like the model's training data ({modality}, {reference.volumes} volume(s)): "
            + "; ".join(problems))


def check_intensities(vol: np.ndarray, data: DataConfig, name: str, *, strict: bool,
                      warn: Callable[[str], None]) -> None:
    """Warn (or, with `strict`, refuse) when `vol` (C, X, Y, Z, as stored) is far outside the training data that
    `data.reference` describes; models without a reference are not checked."""
    if data.reference is None:
        return
    problem = compare(data.reference, describe([vol], data), data.modality)
    if problem is None:
        return
    if strict:
        raise InputError(f"{name} {problem}; pass a {data.modality} volume like the training data, or drop "
                         "--strict-input to predict anyway")
    warn(f"{name} {problem}; the labels may be meaningless (--strict-input makes this an error)")
