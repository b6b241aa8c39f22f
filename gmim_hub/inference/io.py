"""Volumes in and out for prediction: checked reading (one-line errors naming the file), output planning that refuses
an output which is (or would become) an input, and atomic writes (`gmim_hub.atomic`) that keep a NIfTI input's
header codes and units, so a failure never leaves a partial file. NIfTI is handled here; NRRD, MetaImage and DICOM
(series in, SEG out) in `gmim_hub.inference.formats`."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import nibabel as nib
import numpy as np
import torch

from gmim_hub.atomic import atomic_writes
from gmim_hub.errors import InputError, OutputError, one_line
from gmim_hub.inference.formats import (
    FORMATS,
    LoadedVolume,
    check_format,
    input_stem,
    is_dicom_input,
    list_inputs,
    other_volume_geometry,
    output_format,
    read_other_volume,
    strip_volume_suffix,
    write_other_output,
)

if TYPE_CHECKING:
    from gmim_hub.inference.formats import DicomSource, SegInfo

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
        # hidden files are skipped: a killed writer's temporary file (".x_seg.nii.gz.tmp-...nii.gz") is not an input
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
    check_not_inputs(jobs, src)
    _check_dicom_outputs(jobs)
    for job in jobs:
        check_input_header(job.input, job.series)
        check_writable(job.labels)
    if not overwrite:
        check_outputs_free(jobs)
    return jobs


def _check_dicom_outputs(jobs: list[PredictionJob]) -> None:
    """DICOM SEG needs a DICOM source."""
    for job in jobs:
        if output_format(job.labels) == "dicom-seg" and not is_dicom_input(job.input):
            raise InputError(f"DICOM SEG output ({job.labels.name}) needs a DICOM series input, but {job.input} is "
                             "not DICOM; write .nii.gz, .nrrd or .mha instead")


def check_not_inputs(jobs: list[PredictionJob], src: Path) -> None:
    """OutputError when an output is an input (same file after resolving symlinks and hard links), when a folder
    is predicted into itself (the outputs would be read as inputs next time), when an output lands inside a DICOM
    series folder that is an input (it would join the series), or when two outputs coincide."""
    folder_of_inputs = src.is_dir() and not is_dicom_input(src)  # a series folder is one input: checked below
    if folder_of_inputs and jobs and jobs[0].labels.parent.exists() and os.path.samefile(jobs[0].labels.parent, src):
        raise OutputError(f"the output folder {jobs[0].labels.parent} is the input folder; the label maps would be "
                          "read as inputs by the next run: choose another output folder")
    if folder_of_inputs and jobs and output_format(jobs[0].labels) == "dicom-seg" \
            and Path(os.path.realpath(jobs[0].labels.parent)).parent == Path(os.path.realpath(src)):
        raise OutputError(f"the output folder {jobs[0].labels.parent} is inside the input folder {src}; its DICOM "
                          "SEG files would be read as a DICOM series input by the next run: choose another output "
                          "folder")
    inputs = {_file_id(job.input): job.input for job in jobs}
    series_folders = [Path(os.path.realpath(job.input)) for job in jobs if job.input.is_dir()]
    seen: dict[Path, Path] = {}
    for job in jobs:
        for out in (job.labels, job.probabilities):
            if out is None:
                continue
            same = inputs.get(_file_id(out)) if out.exists() else None
            if same is not None:
                raise OutputError(f"output {out} is the input {same} (the same file); gmim never writes over its "
                                  "input, whatever --overwrite says: choose another output name")
            key = Path(os.path.realpath(out))
            folder = next((f for f in series_folders if f in key.parents), None)
            if folder is not None:
                raise OutputError(f"output {out} is inside the input series folder {folder}; write it elsewhere "
                                  "(a file there would become part of the series)")
            if key in seen:
                raise OutputError(f"inputs {seen[key]} and {job.input} would both be written to {out}; rename one "
                                  "of them or predict them separately")
            seen[key] = job.input


def check_writable(path: Path) -> None:
    """OutputError unless `path` can be created: its nearest existing ancestor must be a folder we may write."""
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise OutputError(f"cannot write {path}: {parent} is a file, not a folder; choose an output inside a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write into {parent} (no write permission, or a read-only file system); choose a "
                          "folder you can write to, or fix its permissions")


def _file_id(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_dev, st.st_ino


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
    check_nifti_header(path)
    try:
        image = LoadImage(reader="NibabelReader", image_only=True, dtype=np.float32)(str(path))
        image = EnsureChannelFirst()(image)
    except Exception as e:  # noqa: BLE001 - truncated gzip streams raise EOFError, zlib.error, OSError, ...
        raise InputError(f"could not read the voxels of {path} ({type(e).__name__}: {_detail(e)}); the file is "
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


def is_nifti_input(path: str | Path) -> bool:
    """A NIfTI file by its name (.nii, .nii.gz); every other input goes through `gmim_hub.inference.formats`."""
    return strip_nifti_suffix(Path(path).name) is not None and not Path(path).is_dir()


def check_input_header(path: str | Path, series: str | None = None) -> nib.Nifti1Header:
    """The header of a readable 3-D (or 4-D, channels last) volume, or `InputError`: read before any voxel, so a
    wrong file fails before a model is loaded. NRRD, MetaImage and DICOM inputs are checked from their own headers
    (for DICOM: one series, slice order and spacing, as reading does) and described by an equivalent NIfTI
    header (`read_volume_header`)."""
    if not is_nifti_input(path):
        return read_volume_header(path, series)
    return check_nifti_header(path)


def check_nifti_header(path: str | Path) -> nib.Nifti1Header:
    """`check_input_header` for a NIfTI file."""
    header = read_header(path)
    shape = header.get_data_shape()
    if len(shape) < 3 or min(shape[:3]) < 2:
        raise InputError(f"{path} is 2-D (shape {'x'.join(map(str, shape))}); gmim predict needs a 3-D volume")
    if len(shape) > 4 and any(int(n) > 1 for n in shape[4:]):
        raise InputError(f"{path} is {len(shape)}-D (shape {'x'.join(map(str, shape))}); gmim predict needs a 3-D "
                         "volume, or 4-D with the channels last")
    return header


def read_header(path: str | Path) -> nib.Nifti1Header:
    """The NIfTI header of `path` (no voxels read), or `InputError` naming the file."""
    try:
        header = nib.load(str(path)).header  # type: ignore[attr-defined]
    except Exception as e:  # noqa: BLE001 - nibabel raises many unrelated types
        raise InputError(f"{path} is not a readable NIfTI file ({type(e).__name__}: {_detail(e)}); "
                         "check the file and its .nii/.nii.gz extension") from e
    if not isinstance(header, nib.Nifti1Header):
        raise InputError(f"{path} is not a NIfTI file ({type(header).__name__}); convert it to .nii.gz first")
    return header


def read_volume_header(path: str | Path, series: str | None = None) -> nib.Nifti1Header:
    """The header of any input without its voxels: a NIfTI file's own; for NRRD, MetaImage and DICOM a NIfTI header
    with their shape (channels last) and voxel -> RAS affine, so the checks made before a model loads (memory)
    cover every format."""
    if is_nifti_input(path):
        return read_header(path)
    if not Path(path).exists():
        raise FileNotFoundError(f"input {path} does not exist; check the path")
    shape, affine = other_volume_geometry(Path(path), series)
    header = nib.Nifti1Header()
    header.set_data_shape(shape[1:] + ((shape[0],) if shape[0] > 1 else ()))
    header.set_qform(affine, code=1)
    header.set_sform(affine, code=1)
    header.set_xyzt_units("mm", "sec")
    return header


def nifti_like(path: str | Path, header: nib.Nifti1Header) -> nib.Nifti1Header | None:
    """The header whose codes and units NIfTI outputs keep (`save_niftis_atomic(like=...)`): a NIfTI input's own;
    None (the defaults) for other formats, whose headers have no such codes."""
    return header if is_nifti_input(path) else None


def save_niftis_atomic(items: list[tuple[Path, np.ndarray]], affine: np.ndarray, *, overwrite: bool = False,
                       like: nib.Nifti1Header | None = None,
                       dicom: tuple[DicomSource, SegInfo] | None = None) -> None:
    """Write each (path, array) with `affine` in the format its name asks for (NIfTI, NRRD, MetaImage, or DICOM SEG
    on the frames of `dicom`'s source series), all together (`gmim_hub.atomic.atomic_writes`): an error (disk full,
    bad array) leaves neither a partial file nor a label map without its probabilities.

    like: a NIfTI input's header, whose qform/sform codes and units (xyzt_units) NIfTI outputs keep, so a pipeline
    that trusts sform_code 1 (scanner) sees the same on the output; without it: nibabel's defaults and mm."""
    for path, _ in items:
        if path.exists() and not overwrite:
            raise InputError(f"output {path} already exists; pass --overwrite (overwrite=True) to replace it")
        path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_writes([path for path, _ in items]) as tmps:
        for tmp, (path, array) in zip(tmps, items, strict=True):
            if write_other_output(tmp, path, array, affine, dicom):  # NRRD, MetaImage, DICOM SEG
                continue
            nib.save(_nifti_like(array, affine, like), tmp)


def _nifti_like(array: np.ndarray, affine: np.ndarray, like: nib.Nifti1Header | None) -> nib.Nifti1Image:
    img = nib.Nifti1Image(array, affine)
    if like is None:  # nibabel's defaults: sform code 2 (aligned), qform code 0
        img.header.set_xyzt_units("mm", "sec")
        return img
    img.set_qform(affine, code=int(like["qform_code"]))
    img.set_sform(affine, code=int(like["sform_code"]))
    img.header["xyzt_units"] = like["xyzt_units"]
    return img


def _detail(e: BaseException) -> str:
    return one_line(e, empty="no message")
