"""NIfTI in and out for prediction: checked reading (one-line errors naming the file), output planning that refuses
an output which is (or would become) an input, and atomic writes (`gmim_hub.atomic`) that keep the input's header
codes and units, so a failure never leaves a partial file."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from gmim_hub.atomic import atomic_writes
from gmim_hub.errors import InputError, OutputError

logger = logging.getLogger(__name__)

NIFTI_SUFFIXES = (".nii.gz", ".nii")
LABEL_SUFFIX = "_seg.nii.gz"
PROB_SUFFIX = "_prob.nii.gz"


@dataclass(frozen=True)
class PredictionJob:
    """One input volume and where its label map (and optionally probabilities) go."""

    input: Path
    labels: Path
    probabilities: Path | None


def strip_nifti_suffix(name: str) -> str | None:
    """'ct.nii.gz' -> 'ct'; None when the name is not a NIfTI file name."""
    for suffix in NIFTI_SUFFIXES:
        if name.lower().endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return None


def probabilities_path(labels_path: Path) -> Path:
    """'x_seg.nii.gz' -> 'x_prob.nii.gz'; 'x.nii' -> 'x_prob.nii.gz'."""
    stem = strip_nifti_suffix(labels_path.name) or labels_path.name
    stem = stem[: -len("_seg")] if stem.endswith("_seg") else stem
    return labels_path.with_name(stem + PROB_SUFFIX)


def plan_outputs(input_path: str | Path, output: str | Path, *, probabilities: bool = False,
                 overwrite: bool = False) -> list[PredictionJob]:
    """Map INPUT (a NIfTI file or a folder of them) to output files, refusing existing outputs unless `overwrite`.

    A folder maps to a folder: `<stem>_seg.nii.gz` (and `<stem>_prob.nii.gz`) per input. A file maps to OUTPUT, or
    into OUTPUT when it is an existing folder. Checked before any work, so a long run cannot fail at the end.
    """
    src, dst = Path(input_path), Path(output)
    if not src.exists():
        raise FileNotFoundError(f"input {src} does not exist; check the path (a .nii/.nii.gz file or a folder of them)")
    if src.is_dir():
        # hidden files are skipped: a killed writer's temporary file (".x_seg.nii.gz.tmp-...nii.gz") is not an input
        inputs = sorted(p for p in src.iterdir() if p.is_file() and not p.name.startswith(".")
                        and strip_nifti_suffix(p.name))
        if not inputs:
            raise InputError(f"no .nii or .nii.gz files in {src}")
        if dst.exists() and not dst.is_dir():
            raise InputError(f"INPUT {src} is a folder, so OUTPUT must be a folder, but {dst} is a file")
        labels = [dst / f"{strip_nifti_suffix(p.name)}{LABEL_SUFFIX}" for p in inputs]
    else:
        inputs = [src]
        if dst.is_dir():
            labels = [dst / ((strip_nifti_suffix(src.name) or src.name) + LABEL_SUFFIX)]
        elif strip_nifti_suffix(dst.name) is None:
            raise InputError(f"output {dst} must end in .nii.gz or .nii (or be an existing folder)")
        else:
            labels = [dst]
    jobs = [PredictionJob(i, lab, probabilities_path(lab) if probabilities else None)
            for i, lab in zip(inputs, labels, strict=True)]
    check_not_inputs(jobs, src)
    for job in jobs:
        check_input_header(job.input)
        check_writable(job.labels)
    if not overwrite:
        check_outputs_free(jobs)
    return jobs


def check_not_inputs(jobs: list[PredictionJob], src: Path) -> None:
    """OutputError when an output is an input (same file after resolving symlinks and hard links), when a folder
    is predicted into itself (the outputs would be read as inputs next time), or when two outputs coincide."""
    if src.is_dir() and jobs and jobs[0].labels.parent.exists() and os.path.samefile(jobs[0].labels.parent, src):
        raise OutputError(f"the output folder {jobs[0].labels.parent} is the input folder; the label maps would be "
                          "read as inputs by the next run: choose another output folder")
    inputs = {_file_id(job.input): job.input for job in jobs}
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
    check_input_header(path)
    try:
        image = LoadImage(reader="NibabelReader", image_only=True, dtype=np.float32)(str(path))
        image = EnsureChannelFirst()(image)
    except Exception as e:  # noqa: BLE001 - truncated gzip streams raise EOFError, zlib.error, OSError, ...
        raise InputError(f"could not read the voxels of {path} ({type(e).__name__}: {_first_line(e)}); the file is "
                         "truncated or corrupt: copy or export it again") from e
    affine = np.asarray(image.affine, dtype=np.float64)  # type: ignore[attr-defined]  # a MetaTensor
    return image.as_tensor().numpy(), affine  # type: ignore[attr-defined]


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


def check_input_header(path: str | Path) -> nib.Nifti1Header:
    """The header of a readable 3-D (or 4-D, channels last) NIfTI volume, or `InputError`: read before any voxel,
    so a wrong file fails before a model is loaded."""
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
        raise InputError(f"{path} is not a readable NIfTI file ({type(e).__name__}: {_first_line(e)}); "
                         "check the file and its .nii/.nii.gz extension") from e
    if not isinstance(header, nib.Nifti1Header):
        raise InputError(f"{path} is not a NIfTI file ({type(header).__name__}); convert it to .nii.gz first")
    return header


def save_niftis_atomic(items: list[tuple[Path, np.ndarray]], affine: np.ndarray, *, overwrite: bool = False,
                       like: nib.Nifti1Header | None = None) -> None:
    """Write each (path, array) as NIfTI with `affine`, all together (`gmim_hub.atomic.atomic_writes`): an error
    (disk full, bad array) leaves neither a partial file nor a label map without its probabilities.

    like: the input's header, whose qform/sform codes and units (xyzt_units) the outputs keep, so a pipeline that
    trusts sform_code 1 (scanner) sees the same on the output; without it: codes (1, 1) and mm."""
    for path, _ in items:
        if path.exists() and not overwrite:
            raise InputError(f"output {path} already exists; pass --overwrite (overwrite=True) to replace it")
        path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_writes([path for path, _ in items]) as tmps:
        for tmp, (_, array) in zip(tmps, items, strict=True):
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


def _first_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[0] if lines else "no message"
