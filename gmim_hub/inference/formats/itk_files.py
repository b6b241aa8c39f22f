"""NRRD and MetaImage (.mha, .mhd + raw) volumes through SimpleITK.

ITK keeps geometry as origin, spacing and a direction matrix in LPS; the rest of gmim-hub uses a 4x4 RAS affine
(as NIfTI does). Both are converted here, so a volume read from .nrrd and one read from the same data as .nii.gz
have the same array (X, Y, Z) and the same affine.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from gmim_hub.errors import InputError, one_line

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def read_itk_volume(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """-> (image (C, X, Y, Z) float32, affine (4, 4) RAS). A vector image's components become channels."""
    import SimpleITK as sitk

    path = Path(path)
    try:
        img = sitk.ReadImage(str(path))
    except Exception as e:  # noqa: BLE001 - SimpleITK raises RuntimeError with multi-line ITK messages
        raise InputError(f"{path} is not a readable {path.suffix.lstrip('.').upper()} file ({one_line(e, last=True)}); "
                         "check the file (for .mhd, its raw data file must sit beside it)") from e
    if img.GetDimension() != 3:
        size = "x".join(map(str, img.GetSize()))
        raise InputError(f"{path} is {img.GetDimension()}-D (shape {size}); gmim predict needs a 3-D volume")
    arr = sitk.GetArrayFromImage(img)  # (Z, Y, X) or (Z, Y, X, C)
    arr = arr[..., None] if arr.ndim == 3 else arr
    image = np.ascontiguousarray(np.transpose(arr, (3, 2, 1, 0)), dtype=np.float32)
    return image, itk_to_affine(img.GetOrigin(), img.GetSpacing(), img.GetDirection())


def itk_volume_shape(path: str | Path) -> tuple[int, int, int, int]:
    """(C, X, Y, Z) from the file's header only."""
    return itk_volume_geometry(path)[0]


def itk_volume_geometry(path: str | Path) -> tuple[tuple[int, int, int, int], np.ndarray]:
    """((C, X, Y, Z), affine (4, 4) RAS) from the file's header only."""
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except Exception as e:  # noqa: BLE001 - SimpleITK raises RuntimeError with multi-line ITK messages
        raise InputError(f"{path} is not a readable {Path(path).suffix.lstrip('.').upper()} file ({one_line(e, last=True)}); "
                         "check the file (for .mhd, its raw data file must sit beside it)") from e
    size = reader.GetSize()
    if len(size) != 3:
        raise InputError(f"{path} is {len(size)}-D (shape {'x'.join(map(str, size))}); gmim predict needs a 3-D volume")
    shape = int(reader.GetNumberOfComponents()), int(size[0]), int(size[1]), int(size[2])
    return shape, itk_to_affine(reader.GetOrigin(), reader.GetSpacing(), reader.GetDirection())


def write_itk_volume(path: str | Path, array: np.ndarray, affine: np.ndarray) -> None:
    """Write (X, Y, Z) or (X, Y, Z, K) with a RAS affine; the format follows the file name (.nrrd, .mha)."""
    import SimpleITK as sitk

    arr = np.asarray(array)
    zyx = np.transpose(arr, (2, 1, 0) if arr.ndim == 3 else (2, 1, 0, 3))
    img = sitk.GetImageFromArray(np.ascontiguousarray(zyx), isVector=arr.ndim == 4)
    origin, spacing, direction = affine_to_itk(affine)
    img.SetOrigin(origin)
    img.SetSpacing(spacing)
    img.SetDirection(direction)
    sitk.WriteImage(img, str(path), useCompression=True)


def itk_to_affine(origin: Any, spacing: Any, direction: Any) -> np.ndarray:
    lps = np.eye(4)
    lps[:3, :3] = np.asarray(direction, float).reshape(3, 3) * np.asarray(spacing, float)[None, :]
    lps[:3, 3] = origin
    return LPS_TO_RAS @ lps


def affine_to_itk(affine: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...], tuple[float, ...]]:
    lps = LPS_TO_RAS @ np.asarray(affine, float)
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    direction = lps[:3, :3] / spacing[None, :]
    return tuple(lps[:3, 3]), tuple(spacing), tuple(direction.ravel())
