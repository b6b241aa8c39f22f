"""`gmim_hub.serving.geometry` (volume-mode preprocessing without MONAI) against MONAI itself: the same voxels, bit for
bit, as `Predictor`'s MONAI pipeline (Orientationd, Spacingd, intensity, Invertd) on a real MRI and on oblique,
anisotropic, flipped and already-on-grid volumes, for every intensity normalisation; and the same reading of NIfTI
files as `load_nifti` (MONAI's LoadImage)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from gmim_hub import PRESETS
from gmim_hub.errors import InputError
from gmim_hub.inference.io import load_nifti
from gmim_hub.inference.predictor import Predictor
from gmim_hub.serving import geometry

MRI = Path(nib.__file__).parent / "tests" / "data" / "anatomical.nii"  # 33x41x25, 2 mm, LAS


def _rotation(deg_x: float, deg_z: float) -> np.ndarray:
    a, b = np.radians(deg_x), np.radians(deg_z)
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    rz = np.array([[np.cos(b), -np.sin(b), 0], [np.sin(b), np.cos(b), 0], [0, 0, 1]])
    return rx @ rz


def _volume(kind: str) -> tuple[np.ndarray, np.ndarray]:
    if kind == "mri":
        return load_nifti(MRI)
    vol = np.random.default_rng(0).normal(100, 30, (1, 37, 41, 29)).astype(np.float32)
    vol[:, :5] = 0  # background for the non-zero z-score
    affine = np.eye(4)
    if kind == "oblique":  # rotated, anisotropic (0.9, 1.3, 2.5 mm), x flipped
        affine[:3, :3] = _rotation(20, -35) @ np.diag([-0.9, 1.3, 2.5])
        affine[:3, 3] = [10, -20, 5]
    elif kind == "on-grid":
        affine[:3, 3] = [3, 4, 5]
    else:  # "LPI": flipped axes, a spacing within MONAI's 1e-3 mm tolerance of 1 mm
        affine = np.diag([-1.0005, 1.0, -1.0, 1.0])
    return vol, affine


@pytest.mark.parametrize("kind", ["mri", "oblique", "on-grid", "LPI"])
@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (1.5, 1.5, 2.0), None])
@pytest.mark.parametrize("intensity", ["zscore_nonzero", "ct_window", "minmax"])
def test_preprocessing_and_its_inverse_equal_monai_bit_for_bit(kind, spacing, intensity):
    base = PRESETS["tiny"]
    config = dataclasses.replace(base, data=dataclasses.replace(base.data, intensity=intensity, spacing=spacing))
    predictor = Predictor(config, lambda w: w)
    image, affine = _volume(kind)
    ref = predictor.preprocess({"image": MetaTensor(torch.from_numpy(image.copy()), affine=torch.from_numpy(affine))})
    mine, grid = geometry.preprocess(image.copy(), affine, config.data)
    expected = ref["image"].as_tensor().numpy()
    assert mine.shape == expected.shape and mine.dtype == expected.dtype
    assert np.array_equal(mine, expected)
    assert np.array_equal(grid.affine, np.asarray(ref["image"].affine))
    labels = torch.from_numpy(np.random.default_rng(1).integers(0, 4, (1, *expected.shape[1:])).astype(np.float32))
    back = geometry.invert_labels(labels.numpy(), grid, affine)
    assert back.shape == (1, *image.shape[1:])
    assert np.array_equal(back, predictor._invert(labels, ref, nearest=True).numpy())


def test_read_volume_equals_monai_loading(tmp_path):
    scaled = nib.Nifti1Image(np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6), np.diag([2.0, -1.0, 3.0, 1.0]))
    scaled.header.set_slope_inter(0.5, -3.0)
    two_channels = nib.Nifti1Image(np.random.default_rng(0).normal(size=(6, 7, 8, 2)).astype(np.float32), np.eye(4))
    files = [MRI]
    for name, img in (("scaled.nii.gz", scaled), ("two_channels.nii", two_channels)):
        nib.save(img, tmp_path / name)
        files.append(tmp_path / name)
    for path in files:
        image, affine = geometry.read_volume(path)
        ref_image, ref_affine = load_nifti(path)
        assert image.dtype == ref_image.dtype and np.array_equal(image, ref_image), path
        assert np.array_equal(affine, ref_affine), path


@pytest.mark.parametrize(("content", "message"), [
    (b"not a nifti", "is not a readable NIfTI file"),
    (None, "is 2-D (shape 30x40); gmim predict needs a 3-D volume"),
])
def test_read_volume_errors_are_those_of_load_nifti(tmp_path, content, message):
    path = tmp_path / "bad.nii.gz"
    if content is None:
        nib.save(nib.Nifti1Image(np.zeros((30, 40), np.float32), np.eye(4)), path)
    else:
        path.write_bytes(content)
    for read in (geometry.read_volume, load_nifti):
        with pytest.raises(InputError, match=message.replace("(", r"\(").replace(")", r"\)")):
            read(path)
