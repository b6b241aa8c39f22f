"""File formats for prediction: which inputs a path holds, how to read each, and how to write each output kind.

Inputs: NIfTI (.nii, .nii.gz, read by `gmim_hub.inference.io.load_nifti`), NRRD and MetaImage (.nrrd, .mha, .mhd),
a DICOM series folder, or one DICOM multi-frame file. Outputs, by the file name: NIfTI, NRRD, MetaImage (.mha)
or DICOM SEG (.dcm, DICOM inputs only). Every reader returns (C, X, Y, Z) float32 and a RAS affine.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from gmim_hub.errors import InputError
from gmim_hub.inference.formats.dicom_files import dicom_files, is_dicom_file
from gmim_hub.inference.formats.itk_files import itk_volume_geometry, read_itk_volume, write_itk_volume

if TYPE_CHECKING:
    from gmim_hub.inference.formats.dicom_seg import SegInfo
    from gmim_hub.inference.formats.dicom_series import DicomSource

# pydicom (~1 s to import) and SimpleITK load with the reader or writer that needs them, so NIfTI-only paths
# (`gmim infer --mode volume` with a .nii.gz) never pay for them.
__all__ = ["FORMATS", "DicomSource", "LoadedVolume", "SegInfo", "check_format", "dicom_files", "input_stem",
           "is_dicom_file", "is_dicom_input", "list_inputs", "other_volume_geometry", "other_volume_shape",
           "output_format", "read_other_volume", "strip_volume_suffix", "write_other_output"]

NIFTI_SUFFIXES = (".nii.gz", ".nii")
ITK_SUFFIXES = (".nrrd", ".mha", ".mhd")
INPUT_SUFFIXES = NIFTI_SUFFIXES + ITK_SUFFIXES
# output format -> file suffix of its label maps
FORMATS = {"nifti": ".nii.gz", "nrrd": ".nrrd", "mha": ".mha", "dicom-seg": ".dcm"}
OUTPUT_SUFFIXES = {".nii.gz": "nifti", ".nii": "nifti", ".nrrd": "nrrd", ".mha": "mha", ".dcm": "dicom-seg"}


@dataclass(frozen=True)
class LoadedVolume:
    """image (C, X, Y, Z) float32, affine (4, 4) voxel -> RAS mm; `dicom` when it came from a DICOM series."""

    image: np.ndarray
    affine: np.ndarray
    dicom: DicomSource | None = None


def strip_volume_suffix(name: str, suffixes: tuple[str, ...] = INPUT_SUFFIXES) -> str | None:
    """'ct.nii.gz' -> 'ct', 'ct.nrrd' -> 'ct'; None when the name has none of `suffixes`."""
    for suffix in suffixes:
        if name.lower().endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return None


def output_format(path: Path) -> str | None:
    """The output format a file name asks for ('nifti', 'nrrd', 'mha', 'dicom-seg'), None when none."""
    return next((fmt for suffix, fmt in OUTPUT_SUFFIXES.items() if path.name.lower().endswith(suffix)
                 and len(path.name) > len(suffix)), None)


def check_format(fmt: str | None) -> None:
    if fmt is not None and fmt not in FORMATS:
        raise InputError(f"format must be one of {', '.join(FORMATS)}; got {fmt!r}")


def is_dicom_input(path: Path) -> bool:
    """A folder that directly holds DICOM files (one series), or a DICOM file (e.g. an enhanced multi-frame)."""
    if path.is_dir():
        return bool(dicom_files(path))
    return path.is_file() and strip_volume_suffix(path.name) is None and is_dicom_file(path)


def input_stem(path: Path) -> str:
    """The name outputs are derived from: 'ct.nii.gz' -> 'ct', a series folder 'CT_0003' -> 'CT_0003'."""
    if path.is_dir():
        return path.name
    return strip_volume_suffix(path.name) or (path.stem if path.suffix.lower() == ".dcm" else path.name)


def list_inputs(folder: Path) -> list[Path]:
    """The inputs of a folder of inputs: volume files (NIfTI, NRRD, MetaImage) and DICOM series subfolders."""
    found = [p for p in folder.iterdir() if not p.name.startswith(".")
             and ((p.is_file() and strip_volume_suffix(p.name)) or (p.is_dir() and is_dicom_input(p)))]
    return sorted(found)


def read_other_volume(path: Path, series: str | None = None) -> LoadedVolume:
    """A non-NIfTI input: NRRD/MetaImage file, DICOM series folder or DICOM file."""
    if path.is_dir() or is_dicom_input(path):
        from gmim_hub.inference.formats.dicom_series import read_dicom_volume

        image, affine, source = read_dicom_volume(path, series)
        return LoadedVolume(image, affine, source)
    if strip_volume_suffix(path.name, ITK_SUFFIXES) is not None:
        image, affine = read_itk_volume(path)
        return LoadedVolume(image, affine)
    raise InputError(f"{path} is neither NIfTI (.nii, .nii.gz), NRRD (.nrrd), MetaImage (.mha, .mhd) nor DICOM; "
                     "convert it to one of these")


def other_volume_shape(path: Path, series: str | None = None) -> tuple[int, int, int, int]:
    """(C, X, Y, Z) of a non-NIfTI input from its headers only (no pixel decoding), for checks made before a model
    loads; the DICOM geometry checks of `read_other_volume` run here too."""
    return other_volume_geometry(path, series)[0]


def other_volume_geometry(path: Path, series: str | None = None) -> tuple[tuple[int, int, int, int], np.ndarray]:
    """((C, X, Y, Z), affine (4, 4) voxel -> RAS mm) of a non-NIfTI input from its headers only, as
    `read_other_volume` would give them."""
    if path.is_dir() or is_dicom_input(path):
        from gmim_hub.inference.formats.dicom_series import dicom_volume_geometry

        return dicom_volume_geometry(path, series)
    if strip_volume_suffix(path.name, ITK_SUFFIXES) is None:
        raise InputError(f"{path} is neither NIfTI (.nii, .nii.gz), NRRD (.nrrd), MetaImage (.mha, .mhd) nor DICOM; "
                         "convert it to one of these")
    return itk_volume_geometry(path)


def write_other_output(tmp: Path, path: Path, array: np.ndarray, affine: np.ndarray,
                       dicom: tuple[DicomSource, SegInfo] | None) -> bool:
    """Write `array` to `tmp` when `path` asks for NRRD, MetaImage or DICOM SEG (on `dicom`'s source frames) and
    return True; False for NIfTI, which `gmim_hub.inference.io` writes."""
    fmt = output_format(path)
    if fmt in ("nrrd", "mha"):
        write_itk_volume(tmp, array, affine)
        return True
    if fmt == "dicom-seg":
        if dicom is None:
            raise InputError(f"{path.name}: DICOM SEG output needs a DICOM series input")
        from gmim_hub.inference.formats.dicom_seg import write_dicom_seg

        write_dicom_seg(tmp, array, *dicom)
        return True
    return False


def __getattr__(name: str) -> Any:
    """`DicomSource` and `SegInfo`, imported on first use (their modules import pydicom)."""
    if name == "DicomSource":
        from gmim_hub.inference.formats.dicom_series import DicomSource

        return DicomSource
    if name == "SegInfo":
        from gmim_hub.inference.formats.dicom_seg import SegInfo

        return SegInfo
    raise AttributeError(f"module 'gmim_hub.inference.formats' has no attribute {name!r}")
