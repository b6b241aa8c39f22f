"""File formats for prediction: which inputs a path holds, how to read each, and how to write each output kind.

Inputs: NIfTI (.nii, .nii.gz, read by `gmim_hub.inference.io.load_nifti`), NRRD and MetaImage (.nrrd, .mha, .mhd),
a DICOM series folder, or one DICOM multi-frame file. Outputs, by the file name: NIfTI, NRRD, MetaImage (.mha)
or DICOM SEG (.dcm, DICOM inputs only). Every reader returns (C, X, Y, Z) float32 and a RAS affine.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gmim_hub.errors import InputError
from gmim_hub.inference.formats.dicom_seg import SegInfo, write_dicom_seg
from gmim_hub.inference.formats.dicom_series import (
    DicomSource,
    dicom_files,
    dicom_volume_shape,
    is_dicom_file,
    read_dicom_volume,
)
from gmim_hub.inference.formats.itk_files import itk_volume_shape, read_itk_volume, write_itk_volume

__all__ = ["FORMATS", "DicomSource", "LoadedVolume", "SegInfo", "check_format", "dicom_files", "input_stem",
           "is_dicom_input", "list_inputs", "other_volume_shape", "output_format", "read_other_volume",
           "strip_volume_suffix", "write_other_output"]

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
    if path.is_dir() or is_dicom_input(path):
        return dicom_volume_shape(path, series)
    return itk_volume_shape(path)


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
        write_dicom_seg(tmp, array, *dicom)
        return True
    return False
