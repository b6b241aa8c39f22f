"""Small synthetic NIfTI volumes and a tiny 64^3 config for the pre-training engine tests (fast on 2 CPU cores)."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np

from gmim_hub import PRESETS, GMIMConfig


def tiny_pretrain_config() -> GMIMConfig:
    """The tiny preset (ROI 64, grids 2/4/8) on the native voxel grid (no resampling: the volumes are synthetic)."""
    tiny = PRESETS["tiny"]
    return dataclasses.replace(tiny, data=dataclasses.replace(tiny.data, spacing=None))


def write_volumes(folder: Path, n: int = 4, shape: tuple[int, int, int] = (60, 56, 66), seed: int = 0) -> Path:
    """n noisy volumes with a bright box each (so the cell entropies differ and the grid choice is not trivial)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        a = rng.normal(100.0, 20.0, shape).astype(np.float32)
        lo = rng.integers(4, 20, size=3)
        a[lo[0]:lo[0] + 30, lo[1]:lo[1] + 24, lo[2]:lo[2] + 28] += 80.0
        nib.save(nib.Nifti1Image(a, np.diag([2.0, 2.0, 2.0, 1.0])), folder / f"vol{i}.nii.gz")
    return folder


def write_config(path: Path, config: GMIMConfig | None = None) -> Path:
    (config or tiny_pretrain_config()).to_json_file(path)
    return path


def pretrain_cmd(data: Path, config: Path, out: Path, steps: int, *extra: str) -> list[str]:
    """`gmim pretrain` as a subprocess command line, with fast test settings (override by appending options)."""
    return [sys.executable, "-m", "gmim_hub.cli.main", "pretrain", "--data", str(data), "--config", str(config),
            "-o", str(out), "--steps", str(steps), "--warmup", "2", "--batch-size", "1", "--num-workers", "0",
            "--seed", "7", "--log-every", "1", "--eval-every", "0", "--preview-every", "0", *extra]


def run_cli(cmd: Sequence[str], timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout)
