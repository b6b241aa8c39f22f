"""Volumes in and out for prediction: checked reading (one-line errors naming the file), output planning, and atomic
writes (temporary file in the destination folder, then `os.replace`), so a failure never leaves a partial file.
NIfTI is handled here; NRRD, MetaImage and DICOM (series in, SEG out) in `gmim_hub.inference.formats`."""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from gmim_hub.errors import InputError
from gmim_hub.inference.formats import (
    FORMATS,
    DicomSource,
    LoadedVolume,
    SegInfo,
    check_format,
    input_stem,
    is_dicom_input,
    list_inputs,
    output_format,
    read_other_volume,
    strip_volume_suffix,
    write_other_output,
)

logger = logging.getLogger(__name__)

NIFTI_SUFFIXES = (".nii.gz", ".nii")


@dataclass(frozen=True)
class PredictionJob:
    """One input volume and where its label map (and optionally probabilities) go."""

    input: Path
    labels: Path
    probabilities: Path | None
    series: str | None = None  # SeriesInstanceUID to read from a DICOM folder holding several


def strip_nifti_suffix(name: str) -> str | None:
    """'ct.nii.gz' -> 'ct'; None when the name is not a NIfTI file name."""
    for suffix in NIFTI_SUFFIXES:
        if name.lower().endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return None


def probabilities_path(labels_path: Path) -> Path:
    """'x_seg.nii.gz' -> 'x_prob.nii.gz'; 'x.nii' -> 'x_prob.nii.gz'; 'x.nrrd' -> 'x_prob.nrrd'; a DICOM SEG's
    probabilities go to NIfTI ('x.dcm' -> 'x_prob.nii.gz')."""
    fmt = output_format(labels_path)
    stem = strip_volume_suffix(labels_path.name, (".nii.gz", ".nii", ".nrrd", ".mha", ".dcm")) or labels_path.name
    stem = stem[: -len("_seg")] if stem.endswith("_seg") else stem
    suffix = FORMATS[fmt] if fmt in ("nrrd", "mha") else ".nii.gz"
    return labels_path.with_name(stem + "_prob" + suffix)


def plan_outputs(input_path: str | Path, output: str | Path, *, probabilities: bool = False,
                 overwrite: bool = False, out_format: str | None = None,
                 series: str | None = None) -> list[PredictionJob]:
    """Map INPUT (a volume file, a DICOM series folder, or a folder of these) to output files, refusing existing
    outputs unless `overwrite`.

    A folder of inputs maps to a folder: `<stem>_seg.nii.gz` (or the suffix of `out_format`: nifti, nrrd, mha,
    dicom-seg) per input. One input maps to OUTPUT, whose name picks the format, or into OUTPUT when it is an
    existing folder. Checked before any work, so a long run cannot fail at the end.
    """
    src, dst = Path(input_path), Path(output)
    check_format(out_format)
    if not src.exists():
        raise FileNotFoundError(f"input {src} does not exist; check the path (a .nii/.nii.gz, .nrrd, .mha/.mhd file, "
                                "a DICOM series folder, or a folder of them)")
    suffix = "_seg" + FORMATS[out_format or "nifti"]
    if src.is_dir() and not is_dicom_input(src):
        inputs = list_inputs(src)
        if not inputs:
            raise InputError(f"no .nii, .nii.gz, .nrrd, .mha, .mhd files or DICOM series folders in {src}")
        if dst.exists() and not dst.is_dir():
            raise InputError(f"INPUT {src} is a folder, so OUTPUT must be a folder, but {dst} is a file")
        labels = [dst / f"{input_stem(p)}{suffix}" for p in inputs]
    else:
        inputs = [src]
        if dst.is_dir():
            labels = [dst / f"{input_stem(src)}{suffix}"]
        elif output_format(dst) is None:
            raise InputError(f"output {dst} must end in .nii.gz, .nii, .nrrd, .mha or .dcm (DICOM SEG) (or be an "
                             "existing folder)")
        elif out_format is not None and output_format(dst) != out_format:
            raise InputError(f"output {dst} is not a {out_format} file name; end it in {FORMATS[out_format]} or drop "
                             "--format")
        else:
            labels = [dst]
    jobs = [PredictionJob(i, lab, probabilities_path(lab) if probabilities else None, series)
            for i, lab in zip(inputs, labels, strict=True)]
    _check_dicom_outputs(jobs)
    if not overwrite:
        check_outputs_free(jobs)
    return jobs


def _check_dicom_outputs(jobs: list[PredictionJob]) -> None:
    """DICOM SEG needs a DICOM source; no output may land inside a DICOM input folder (it would join the series)."""
    for job in jobs:
        dicom = is_dicom_input(job.input)
        if output_format(job.labels) == "dicom-seg" and not dicom:
            raise InputError(f"DICOM SEG output ({job.labels.name}) needs a DICOM series input, but {job.input} is "
                             "not DICOM; write .nii.gz, .nrrd or .mha instead")
        if dicom and job.input.is_dir() and job.input.resolve() in job.labels.resolve().parents:
            raise InputError(f"output {job.labels} is inside the input series folder {job.input}; write it elsewhere "
                             "(a file there would become part of the series)")


def check_outputs_free(jobs: list[PredictionJob]) -> None:
    for job in jobs:
        for path in (job.labels, job.probabilities):
            if path is not None and path.exists():
                raise InputError(f"output {path} already exists; pass --overwrite (overwrite=True) to replace it")


def load_nifti(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Read a NIfTI volume with MONAI's `LoadImage` (nibabel reader) -> (image (C, X, Y, Z) float32, affine (4, 4)).

    nibabel signals bad files with many exception types (ImageFileError, EOFError, zlib/gzip errors, OSError...);
    each becomes one `InputError` naming the file.
    """
    from monai.transforms import EnsureChannelFirst, LoadImage

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"input {path} does not exist; check the path (a .nii/.nii.gz file)")
    try:
        # header only: a clear error for files that are not NIfTI at all
        header_shape = nib.load(str(path)).shape  # type: ignore[attr-defined]
    except Exception as e:  # noqa: BLE001 - nibabel raises many unrelated types
        raise InputError(f"{path} is not a readable NIfTI file ({type(e).__name__}: {_first_line(e)}); "
                         "check the file and its .nii/.nii.gz extension") from e
    spatial = header_shape[:3]
    if len(spatial) < 3 or min(spatial) < 2:
        raise InputError(f"{path} is 2-D (shape {'x'.join(map(str, header_shape))}); gmim predict needs a 3-D volume")
    try:
        image = LoadImage(reader="NibabelReader", image_only=True, dtype=np.float32)(str(path))
        image = EnsureChannelFirst()(image)
    except Exception as e:  # noqa: BLE001 - truncated gzip streams raise EOFError, zlib.error, OSError, ...
        raise InputError(f"could not read the voxels of {path} ({type(e).__name__}: {_first_line(e)}); the file is "
                         "truncated or corrupt: copy or export it again") from e
    affine = np.asarray(image.affine, dtype=np.float64)  # type: ignore[attr-defined]  # a MetaTensor
    return image.as_tensor().numpy(), affine  # type: ignore[attr-defined]


def load_volume(path: str | Path, series: str | None = None) -> LoadedVolume:
    """Any supported input (NIfTI, NRRD, MetaImage, DICOM series folder or file) -> `LoadedVolume`."""
    path = Path(path)
    if path.is_file() and strip_nifti_suffix(path.name) is not None:
        return LoadedVolume(*load_nifti(path))
    if not path.exists():
        raise FileNotFoundError(f"input {path} does not exist; check the path")
    return read_other_volume(path, series)


def check_volume(image: np.ndarray | torch.Tensor, in_channels: int, *, name: str = "image") -> np.ndarray:
    """(X, Y, Z) or (C, X, Y, Z) -> (C, X, Y, Z) float32, or `InputError`: 2-D, wrong channels, NaN/Inf."""
    arr = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    if arr.ndim == 3:
        arr = arr[None]
    if arr.ndim != 4 or min(arr.shape[1:]) < 2:
        raise InputError(f"{name} has shape {arr.shape}; expected a 3-D volume (X, Y, Z) or (C, X, Y, Z) "
                         "(2-D images are not supported)")
    if arr.shape[0] != in_channels:
        raise InputError(f"{name} has {arr.shape[0]} channel(s) but the model expects {in_channels}; pass a "
                         f"{in_channels}-channel volume (a 4-D NIfTI stores channels last)")
    arr = arr.astype(np.float32, copy=False)
    bad = int(arr.size - np.count_nonzero(np.isfinite(arr)))
    if bad:
        raise InputError(f"{name} contains {bad} non-finite voxels (NaN or Inf); fix or replace them "
                         "(e.g. numpy.nan_to_num) before prediction")
    return arr


def save_niftis_atomic(items: list[tuple[Path, np.ndarray]], affine: np.ndarray, *, overwrite: bool = False,
                       dicom: tuple[DicomSource, SegInfo] | None = None) -> None:
    """Write each (path, array) with `affine` in the format its name asks for (NIfTI, NRRD, MetaImage, or DICOM SEG
    on the frames of `dicom`'s source series): all to temporary files first, then `os.replace` each, so an error
    (disk full, bad array) leaves neither a partial file nor a label map without its probabilities."""
    tmps: list[tuple[str, Path]] = []
    try:
        for path, array in items:
            if path.exists() and not overwrite:
                raise InputError(f"output {path} already exists; pass --overwrite (overwrite=True) to replace it")
            path.parent.mkdir(parents=True, exist_ok=True)
            suffix = ".nii.gz" if path.name.lower().endswith(".gz") else ".nii"
            fmt = output_format(path)
            suffix = FORMATS[fmt] if fmt not in (None, "nifti") else suffix
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + suffix, dir=path.parent)
            os.close(fd)
            tmps.append((tmp, path))
            if write_other_output(Path(tmp), path, array, affine, dicom):  # NRRD, MetaImage, DICOM SEG
                continue
            img = nib.Nifti1Image(array, affine)
            img.header.set_xyzt_units("mm", "sec")
            nib.save(img, tmp)
        for tmp, path in tmps:
            os.replace(tmp, path)
    finally:
        for tmp, _ in tmps:
            Path(tmp).unlink(missing_ok=True)


def _first_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[0] if lines else "no message"
