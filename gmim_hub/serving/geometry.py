"""`Predictor`'s preprocessing and its inverse in numpy, nibabel and torch only, for `gmim infer --mode volume`.

Importing MONAI costs ~10 s (its package import loads every submodule), which a client that reads a NIfTI file,
sends it and writes the labels back should not pay. This module computes what `gmim_hub.inference.Predictor` does
with MONAI, in the same arithmetic, so a served prediction stays voxel for voxel that of `gmim predict`
(tests/test_geometry.py compares both on real and oblique volumes):

1. orientation to `data.orientation` (flips and axis swaps from nibabel's orientation algebra);
2. resampling to `data.spacing`: the output grid of MONAI's `Spacing` (rotation kept, zooms replaced; spacings within
   1e-3 mm of the target kept), sampled bilinearly in float64 with border padding (`grid_sample`, align_corners
   False); skipped when the grid does not change;
3. the config's intensity normalisation;

and, for labels coming back, the inverse: nearest-neighbour resampling to the oriented input grid, then the inverse
orientation.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F

from gmim_hub.config import DataConfig
from gmim_hub.errors import InputError, one_line
from gmim_hub.inference.formats import NIFTI_SUFFIXES, LoadedVolume, read_other_volume, strip_volume_suffix
from gmim_hub.intensity import normalise_intensity

AFFINE_TOL = 1e-3  # MONAI's tolerance for "the same grid" and "the same spacing"


@dataclass(frozen=True)
class Grid:
    """Where a preprocessed volume sits: the input's shape and affine after orientation, and after resampling."""

    oriented_shape: tuple[int, ...]
    oriented_affine: np.ndarray
    shape: tuple[int, ...]
    affine: np.ndarray


def read_volume(path: str | Path, series: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Any `gmim predict` input -> (image (C, X, Y, Z) float32, affine (4, 4) RAS); see `load_volume`."""
    loaded = load_volume(path, series)
    return loaded.image, loaded.affine


def load_volume(path: str | Path, series: str | None = None) -> LoadedVolume:
    """`gmim_hub.inference.io.load_volume` without MONAI: a NIfTI file as `load_nifti` reads it (`read_nifti`);
    NRRD, MetaImage and DICOM inputs by `gmim_hub.inference.formats` (MONAI-free too), so the client sends every
    format's volume the same way. `series` picks a SeriesInstanceUID in a DICOM folder holding several."""
    path = Path(path)
    if path.is_dir() or strip_volume_suffix(path.name, NIFTI_SUFFIXES) is None:
        if not path.exists():
            raise FileNotFoundError(f"input {path} does not exist; check the path")
        return read_other_volume(path, series)
    return LoadedVolume(*read_nifti(path))


def read_nifti(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """A NIfTI file -> (image (C, X, Y, Z) float32, affine (4, 4)), as `gmim_hub.inference.io.load_nifti` reads it
    with MONAI (scaled voxel values, channels last in the file moved first), with the same one-line errors."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"input {path} does not exist; check the path (a .nii/.nii.gz file)")
    try:
        img = nib.load(str(path))
        shape = img.shape  # type: ignore[attr-defined]
    except Exception as e:  # noqa: BLE001 - nibabel raises many unrelated types
        raise InputError(f"{path} is not a readable NIfTI file ({type(e).__name__}: {_detail(e)}); "
                         "check the file and its .nii/.nii.gz extension") from e
    if len(shape) < 3 or min(shape[:3]) < 2:
        raise InputError(f"{path} is 2-D (shape {'x'.join(map(str, shape))}); gmim predict needs a 3-D volume")
    try:
        data = np.asarray(img.dataobj).astype(np.float32)  # type: ignore[attr-defined]  # scaled (slope, inter)
    except Exception as e:  # noqa: BLE001 - truncated gzip streams raise EOFError, zlib.error, OSError, ...
        raise InputError(f"could not read the voxels of {path} ({type(e).__name__}: {_detail(e)}); the file is "
                         "truncated or corrupt: copy or export it again") from e
    image = data[None] if data.ndim == 3 else np.moveaxis(data, -1, 0)
    return np.ascontiguousarray(image), np.array(img.affine, dtype=np.float64)  # type: ignore[attr-defined]


def preprocess(image: np.ndarray, affine: np.ndarray, data: DataConfig) -> tuple[np.ndarray, Grid]:
    """image (C, X, Y, Z) float32 with its (4, 4) affine -> ((C, D, H, W) float32 model input, its `Grid`)."""
    img, oriented_affine = _orient(image, affine, data.orientation)
    target = _spacing_grid(oriented_affine, img.shape[1:], data.spacing) if data.spacing is not None else None
    grid = Grid(tuple(img.shape[1:]), oriented_affine, tuple(img.shape[1:]), oriented_affine)
    if target is not None and not _same_grid(oriented_affine, target[1], img.shape[1:], target[0]):
        img = _resample(img, oriented_affine, target[1], target[0], "bilinear")
        # the affine as MONAI composes it (input affine @ voxel transform, the product in torch float64), which the
        # inverse starts from; torch's and numpy's 4x4 products may round the last bit differently on some CPUs
        xform = torch.from_numpy(np.linalg.solve(oriented_affine, target[1]))
        grid = Grid(grid.oriented_shape, oriented_affine, target[0],
                    (torch.from_numpy(oriented_affine) @ xform).numpy())
    return normalise_intensity(img.astype(np.float32, copy=False), data), grid


def invert_labels(labels: np.ndarray, grid: Grid, affine: np.ndarray) -> np.ndarray:
    """labels (K, D, H, W) on the preprocessed grid -> (K, X, Y, Z) float32 on the input's grid (`affine`)."""
    out = labels.astype(np.float32, copy=False)
    if grid.shape != grid.oriented_shape or not np.array_equal(grid.affine, grid.oriented_affine):
        out = _resample(out, grid.affine, grid.oriented_affine, grid.oriented_shape, "nearest")
    back = nib.orientations.ornt_transform(nib.io_orientation(grid.oriented_affine),
                                           nib.orientations.axcodes2ornt(nib.aff2axcodes(affine)))
    return _apply_ornt(out, back)


# ------------------------------------------------------------------------------------------------------ helpers
def _orient(image: np.ndarray, affine: np.ndarray, axcodes: str) -> tuple[np.ndarray, np.ndarray]:
    ornt = nib.orientations.ornt_transform(nib.io_orientation(affine), nib.orientations.axcodes2ornt(axcodes))
    return _apply_ornt(image, ornt), affine @ nib.orientations.inv_ornt_aff(ornt, image.shape[1:])


def _apply_ornt(image: np.ndarray, ornt: np.ndarray) -> np.ndarray:
    """Flip, then transpose the spatial axes of a channel-first array as nibabel's `ornt` says."""
    flips = tuple(1 + i for i, f in enumerate(ornt[:, 1]) if f == -1)
    out = np.flip(image, flips) if flips else image
    order = [0, *(1 + int(i) for i in np.argsort(ornt[:, 0]))]
    return np.ascontiguousarray(out.transpose(order))


def _spacing_grid(affine: np.ndarray, shape: tuple[int, ...], pixdim: tuple[float, float, float]
                  ) -> tuple[tuple[int, ...], np.ndarray]:
    """(shape, affine) of the grid with voxels of `pixdim` mm, same rotation, covering the input's voxel centres."""
    target = np.array(pixdim, dtype=np.float64)
    current = np.sqrt(np.sum(affine[:3, :3] ** 2, axis=0))
    target = np.where(np.abs(current - target) <= AFFINE_TOL, current, target)
    rzs = affine[:3, :3]
    zs = np.linalg.cholesky(rzs.T @ rzs).T
    new = np.eye(4)
    new[:3, :3] = rzs @ np.linalg.inv(zs) @ np.diag(np.sign(np.diag(zs)) * np.abs(target))
    size = np.array(shape, dtype=float)
    corners = np.asarray(np.meshgrid(*[(0.0, d - 1.0) for d in size], indexing="ij")).reshape(3, -1)
    corners = np.concatenate((corners, np.ones_like(corners[:1])))
    out = np.linalg.solve(new, affine) @ corners
    world = affine @ corners
    dist = out[:-1].copy()
    out_shape = np.round(np.ptp(out[:-1] / out[-1], axis=1) + 1.0)
    offset = None
    for i in range(corners.shape[1]):  # the corner nearest the new origin, if one is
        if np.allclose(np.min(dist - dist[:, i : i + 1], 1), 0.0, rtol=AFFINE_TOL):
            offset = world[:-1, i]
            break
    if offset is None:  # else centre the new grid on the old one
        offset = affine[:-1, :-1] @ (size / 2.0) + affine[:-1, -1] - new[:-1, :-1] @ (out_shape / 2.0)
    new[:3, -1] = offset
    return tuple(int(s) for s in out_shape), new


def _same_grid(src: np.ndarray, dst: np.ndarray, src_shape: tuple[int, ...], dst_shape: tuple[int, ...]) -> bool:
    if tuple(src_shape) != tuple(dst_shape):
        return False
    xform = np.linalg.solve(src, dst)
    return bool(np.allclose(src, dst, atol=AFFINE_TOL) or np.allclose(xform, np.eye(4), atol=AFFINE_TOL))


def _resample(img: np.ndarray, src: np.ndarray, dst: np.ndarray, shape: tuple[int, ...], mode: str) -> np.ndarray:
    """(C, *in) on `src` -> (C, *shape) float32 on `dst`: grid_sample at the source voxel of every target voxel, in
    float64 with border padding; normalised coordinates as for align_corners=False."""
    xform = torch.from_numpy(np.linalg.solve(src, dst))[None]  # target voxel -> source voxel, (1, 4, 4)
    norm_src, norm_dst = _normaliser(img.shape[1:]), _normaliser(shape)
    theta = norm_src @ xform @ torch.from_numpy(np.linalg.inv(norm_dst.numpy()))  # batched, as MONAI multiplies
    rev = [2, 1, 0]  # grid_sample indexes (x, y, z) = (W, H, D)
    theta[:, :3] = theta[:, rev].clone()
    theta[:, :, :3] = theta[:, :, rev].clone()
    x = torch.from_numpy(np.ascontiguousarray(img)).to(torch.float64)[None]
    grid = F.affine_grid(theta[:, :3], size=[1, x.shape[1], *shape], align_corners=False)
    out = F.grid_sample(x, grid, mode=mode, padding_mode="border", align_corners=False)
    return out[0].to(torch.float32).numpy()


def _normaliser(shape: tuple[int, ...]) -> torch.Tensor:
    """Voxel index -> grid_sample's [-1, 1] coordinates (align_corners=False) as a (4, 4) float64 matrix."""
    size = torch.tensor([float(s) for s in shape], dtype=torch.float64)
    size[size <= 0.0] = 2.0
    norm = torch.diag(torch.cat((2.0 / size, torch.ones(1, dtype=torch.float64))))
    norm[:-1, -1] = 1.0 / size - 1.0
    return norm[None]


def _detail(e: BaseException) -> str:
    return one_line(e, empty="no message")
