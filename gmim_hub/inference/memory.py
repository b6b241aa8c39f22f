"""How much memory predicting a volume will take, estimated from its NIfTI header before any voxel is read.

A header whose voxel sizes are off by a factor of ten (cm written as mm) makes the resampled volume 1000 times
larger; without this check PyTorch would try to allocate tens of GB after the model had loaded. The estimate counts
the large arrays of one prediction: on the resampled grid the image (twice: oriented, then resampled), the
stitched logits and the inferer's weight map, the labels; on the input grid the image and the inverted labels (and
the probabilities when asked for).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from gmim_hub.config import GMIMConfig
from gmim_hub.errors import ConfigError, InputError
from gmim_hub.inference.io import PredictionJob, read_volume_header

MEMORY_ENV = "GMIM_MAX_MEMORY_GB"
DEFAULT_FRACTION = 0.8  # of the machine's physical memory


@dataclass(frozen=True)
class MemoryEstimate:
    """bytes: the estimate; shape: the input grid (X, Y, Z); resampled: the grid the network sees."""

    bytes: int
    shape: tuple[int, int, int]
    voxel_mm: tuple[float, float, float]
    resampled: tuple[int, int, int]


def voxel_sizes(header: nib.Nifti1Header, path: str | Path) -> tuple[float, float, float]:
    """Voxel sizes (mm) from the header's best affine; `InputError` when they are not finite and positive."""
    with np.errstate(all="ignore"):
        sizes = tuple(float(v) for v in nib.affines.voxel_sizes(header.get_best_affine())[:3])
    if not all(math.isfinite(v) and v > 0 for v in sizes):
        raise InputError(f"{path}: the header gives voxel sizes {_fmt(sizes)} mm; they must be finite and > 0: "
                         "fix pixdim (or the qform/sform) in the header")
    return sizes  # type: ignore[return-value]


def estimate_memory(header: nib.Nifti1Header, config: GMIMConfig, path: str | Path, *,
                    probabilities: bool = False) -> MemoryEstimate:
    """The estimate for predicting the volume `header` describes with a model of `config`."""
    shape = tuple(int(n) for n in header.get_data_shape()[:3])
    sizes = voxel_sizes(header, path)
    ornt = np.nan_to_num(nib.orientations.io_orientation(header.get_best_affine())[:, 0], nan=-1.0)
    out_axis = [int(a) for a in ornt]
    resampled = [0, 0, 0]
    for i, (n, v) in enumerate(zip(shape, sizes, strict=True)):
        axis = out_axis[i] if 0 <= out_axis[i] < 3 else i
        target = v if config.data.spacing is None else float(config.data.spacing[axis])
        resampled[axis] = max(math.ceil(n * v / target), config.roi_size[axis])
    c, k = config.in_channels, config.out_channels
    on_grid = math.prod(resampled) * 4 * (2 * c + 2 * k + 2 + (k if probabilities else 0))
    on_input = math.prod(shape) * 4 * (c + 1 + (k if probabilities else 0))
    return MemoryEstimate(int(on_grid + on_input), shape, sizes, tuple(resampled))  # type: ignore[arg-type]


def memory_limit(max_memory_gb: float | None = None) -> tuple[float, str]:
    """(limit in bytes, where it came from): the option, else $GMIM_MAX_MEMORY_GB, else 80% of physical memory."""
    if max_memory_gb is None and os.environ.get(MEMORY_ENV):
        try:
            max_memory_gb = float(os.environ[MEMORY_ENV])
        except ValueError:
            raise ConfigError(f"{MEMORY_ENV} must be a number of GB, got {os.environ[MEMORY_ENV]!r}") from None
        source = MEMORY_ENV
    else:
        source = "--max-memory-gb"
    if max_memory_gb is not None:
        if not (math.isfinite(max_memory_gb) and max_memory_gb > 0):
            raise ConfigError(f"{source} must be a positive number of GB, got {max_memory_gb!r}")
        return max_memory_gb * 1e9, source
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return DEFAULT_FRACTION * total, f"{DEFAULT_FRACTION:.0%} of this machine's memory"


def check_memory(path: str | Path, header: nib.Nifti1Header, config: GMIMConfig, *, probabilities: bool = False,
                 max_memory_gb: float | None = None) -> MemoryEstimate:
    """`InputError` with the estimate, the limit and how to raise it when the volume would not fit."""
    est = estimate_memory(header, config, path, probabilities=probabilities)
    limit, source = memory_limit(max_memory_gb)
    if est.bytes > limit:
        spacing = "its own grid" if config.data.spacing is None else f"{_fmt(config.data.spacing)} mm"
        raise InputError(
            f"{path}: predicting it needs about {est.bytes / 1e9:.1f} GB ({_fmt(est.shape, 'x')} voxels of "
            f"{_fmt(est.voxel_mm)} mm resampled to {spacing} is {_fmt(est.resampled, 'x')}), more than the limit of "
            f"{limit / 1e9:.1f} GB ({source}); check the voxel sizes in its header (pixdim: cm written as mm?), or "
            f"raise the limit with --max-memory-gb N (or {MEMORY_ENV}=N)")
    return est


def _fmt(values: Sequence[float], sep: str = " x ") -> str:
    return sep.join(f"{v:g}" for v in values)


def check_jobs(jobs: Sequence[PredictionJob], config: GMIMConfig, *, max_memory_gb: float | None = None) -> None:
    """Every input's header (NIfTI, or NRRD, MetaImage, DICOM described as NIfTI) is readable and its prediction
    with a model of `config` fits in memory."""
    for job in jobs:
        check_memory(job.input, read_volume_header(job.input, job.series), config, probabilities=job.probabilities is not None,
                     max_memory_gb=max_memory_gb)
