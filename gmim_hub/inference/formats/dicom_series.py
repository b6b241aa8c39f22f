"""A DICOM series (a folder of single-frame slices, or one enhanced multi-frame object) as one 3-D volume.

pydicom reads the headers and pixels; the geometry is checked here before any pixel is decoded:

* one series per folder (several: a one-line error listing SeriesInstanceUID, description and modality, pick one
  with `series=`), image objects only, one orientation and one frame size (a localizer among the slices is named);
* slices sorted by their position along the slice normal (file names and InstanceNumber are not trusted);
* spacing from the positions, never SliceThickness; a gap (missing slice), uneven spacing, several frames at one
  position, or positions that drift sideways (gantry tilt, shear) are refused with one line;
* stored values go through the modality transform (RescaleSlope/Intercept, per frame for enhanced objects).

The volume is (X, Y, Z) = (columns, rows, slices in sorted order) with a RAS affine, the layout `nibabel` and
dcm2niix use; `DicomSource.frames` keeps which source frame each Z index came from, for writing DICOM SEG.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.pixels import apply_modality_lut

from gmim_hub.errors import InputError, one_line
from gmim_hub.inference.formats.dicom_files import dicom_files

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
ORIENTATION_TOL = 1e-4  # direction cosines: same plane
SPACING_RTOL = 0.01  # relative spread of slice steps accepted as uniform
SHEAR_TOL_MM = 0.01  # sideways drift of slice positions (gantry tilt) accepted per slice


@dataclass(frozen=True)
class Frame:
    """One 2-D image: `path` (and `index` within a multi-frame object, else None) and its plane geometry in LPS."""

    path: Path
    index: int | None
    position: np.ndarray  # (3,) ImagePositionPatient, mm
    orientation: np.ndarray  # (6,) ImageOrientationPatient: row then column direction cosines
    spacing: tuple[float, float]  # PixelSpacing: (between rows, between columns), mm
    shape: tuple[int, int]  # (Rows, Columns)


@dataclass(frozen=True)
class DicomSource:
    """What a DICOM SEG needs to reference the series: the source files and which frame each slice Z came from."""

    paths: tuple[Path, ...]  # the instances, in slice order for single-frame series
    frames: tuple[Frame, ...]  # frames[z] is slice z of the volume
    series_uid: str
    multiframe: bool


def read_dicom_volume(path: str | Path, series: str | None = None) -> tuple[np.ndarray, np.ndarray, DicomSource]:
    """A series folder (or one multi-frame file) -> (image (1, X, Y, Z) float32, affine (4, 4) RAS, source)."""
    path = Path(path)
    chosen, frames, step = _checked_frames(path, series)
    image = _pixels(frames)
    affine = LPS_TO_RAS @ _lps_affine(frames[0], step)
    multi = len(chosen) == 1 and frames[0].index is not None
    source = DicomSource(tuple(dict.fromkeys(f.path for f in frames)), tuple(frames),
                         str(chosen[0].SeriesInstanceUID), multi)
    return image[None], affine, source


def dicom_volume_shape(path: str | Path, series: str | None = None) -> tuple[int, int, int, int]:
    """(1, X, Y, Z) of the series from its headers (every check of `read_dicom_volume` but pixel decoding)."""
    return dicom_volume_geometry(path, series)[0]


def dicom_volume_geometry(path: str | Path,
                          series: str | None = None) -> tuple[tuple[int, int, int, int], np.ndarray]:
    """((1, X, Y, Z), affine (4, 4) RAS) of the series from its headers, as `read_dicom_volume` gives them."""
    _, frames, step = _checked_frames(Path(path), series)
    return (1, frames[0].shape[1], frames[0].shape[0], len(frames)), LPS_TO_RAS @ _lps_affine(frames[0], step)


def _checked_frames(path: Path, series: str | None) -> tuple[list[Any], list[Frame], np.ndarray]:
    """-> (the series' headers, its frames in slice order, the step between slices in LPS mm)."""
    files = [path] if path.is_file() else dicom_files(path)
    if not files:
        raise InputError(f"{path} holds no DICOM files (none starts with the DICM marker); pass a series folder")
    headers = [_read_header(p) for p in files]
    chosen = _pick_series(path, headers, series)
    _check_images(chosen)
    frames = _frames(chosen)
    order, step = _slice_order(path, frames)
    return chosen, [frames[i] for i in order], step


def _read_header(path: Path) -> Any:
    try:
        return pydicom.dcmread(path, stop_before_pixels=True)
    except Exception as e:  # noqa: BLE001 - pydicom raises many types for damaged files
        raise InputError(f"{path} is not a readable DICOM file ({type(e).__name__}: "
                         f"{one_line(e, empty='no message')}); copy or export it again") from e


def _pick_series(path: Path, headers: list[Any], series: str | None) -> list[Any]:
    groups: dict[str, list[Any]] = defaultdict(list)
    for ds in headers:
        groups[str(ds.get("SeriesInstanceUID", "?"))].append(ds)
    if series is not None:
        if series not in groups:
            raise InputError(f"{path} has no series {series}; it holds {_list_series(groups)}")
        return groups[series]
    if len(groups) > 1:
        raise InputError(f"{path} holds {len(groups)} DICOM series: {_list_series(groups)}; pick one with "
                         "--series UID (series= in Python) or give each series its own folder")
    return next(iter(groups.values()))


def _list_series(groups: dict[str, list[Any]]) -> str:
    return "; ".join(f"{uid} ({g[0].get('Modality', '?')} '{g[0].get('SeriesDescription', '')}', "
                     f"{len(g)} file(s))" for uid, g in sorted(groups.items()))


def _check_images(headers: list[Any]) -> None:
    for ds in headers:
        if "Rows" not in ds:  # headers are read without pixels; every image IOD has Rows
            name = getattr(ds.SOPClassUID, "name", str(ds.get("SOPClassUID", "?")))
            raise InputError(f"{ds.filename} is a DICOM {name} object, not an image; remove it or pass the folder of "
                             "the image series")
        if int(ds.get("SamplesPerPixel", 1)) != 1:
            raise InputError(f"{ds.filename} is a colour image ({ds.get('PhotometricInterpretation')}); gmim predict "
                             "needs a greyscale CT or MR series")
    multi = [ds for ds in headers if int(ds.get("NumberOfFrames", 1) or 1) > 1]
    if multi and len(headers) > 1:
        raise InputError(f"the series mixes {len(multi)} multi-frame object(s) with {len(headers) - len(multi)} other "
                         f"file(s) ({multi[0].filename}); pass one enhanced multi-frame file on its own")


def _frames(headers: list[Any]) -> list[Frame]:
    if len(headers) == 1 and int(headers[0].get("NumberOfFrames", 1) or 1) > 1:
        return _enhanced_frames(headers[0])
    frames = []
    for ds in headers:
        missing = [k for k in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing") if k not in ds]
        if missing:
            raise InputError(f"{ds.filename} has no {', '.join(missing)}, so its place in space is unknown; "
                             "gmim predict needs a series with patient geometry (CT, MR, PET)")
        frames.append(Frame(Path(ds.filename), None, np.asarray(ds.ImagePositionPatient, float),
                            np.asarray(ds.ImageOrientationPatient, float),
                            (float(ds.PixelSpacing[0]), float(ds.PixelSpacing[1])), (int(ds.Rows), int(ds.Columns))))
    _check_same_plane(frames, headers)
    return frames


def _enhanced_frames(ds: Any) -> list[Frame]:
    """Per-frame geometry of an enhanced multi-frame object (functional groups, per frame or shared)."""
    n = int(ds.NumberOfFrames)
    shared = ds.get("SharedFunctionalGroupsSequence", [None])[0]
    per_frame = ds.get("PerFrameFunctionalGroupsSequence", [])
    if len(per_frame) != n:
        raise InputError(f"{ds.filename} has {n} frames but {len(per_frame)} per-frame functional groups; the "
                         "object is incomplete: export it again")
    frames = []
    for i, groups in enumerate(per_frame):
        pos = _group_value(groups, shared, "PlanePositionSequence", "ImagePositionPatient")
        ori = _group_value(groups, shared, "PlaneOrientationSequence", "ImageOrientationPatient")
        spacing = _group_value(groups, shared, "PixelMeasuresSequence", "PixelSpacing")
        if pos is None or ori is None or spacing is None:
            raise InputError(f"frame {i + 1} of {ds.filename} has no plane position, orientation or pixel spacing; "
                             "gmim predict needs frames with patient geometry")
        frames.append(Frame(Path(ds.filename), i, np.asarray(pos, float), np.asarray(ori, float),
                            (float(spacing[0]), float(spacing[1])), (int(ds.Rows), int(ds.Columns))))
    _check_same_plane(frames, [ds] * n)
    return frames


def _group_value(groups: Any, shared: Any, sequence: str, keyword: str) -> Any:
    for source in (groups, shared):
        if source is not None and sequence in source and len(source[sequence].value) and \
                keyword in source[sequence][0]:
            return source[sequence][0][keyword].value
    return None


def _check_same_plane(frames: list[Frame], headers: Sequence[Any]) -> None:
    """All frames share orientation, size and pixel spacing; the odd one out (e.g. a localizer) is named."""
    counts: dict[tuple, int] = defaultdict(int)
    keys = [(tuple(np.round(f.orientation, 3)), f.shape, tuple(np.round(f.spacing, 4))) for f in frames]
    for k in keys:
        counts[k] += 1
    common = max(counts, key=lambda k: counts[k])
    for f, k, ds in zip(frames, keys, headers, strict=True):
        if k != common or not np.allclose(f.orientation, frames[0].orientation, atol=ORIENTATION_TOL):
            what = f"frame {f.index + 1} of {f.path}" if f.index is not None else str(f.path)
            kind = "a localizer" if "LOCALIZER" in [str(v).upper() for v in ds.get("ImageType", [])] else "an image"
            raise InputError(f"{what} is {kind} with another orientation or size than the other slices of the series "
                             f"(orientation {_fmt(f.orientation)}, {f.shape[0]}x{f.shape[1]}); remove it from the "
                             "folder")


def _slice_order(path: Path, frames: list[Frame]) -> tuple[np.ndarray, np.ndarray]:
    """Sort frames along the slice normal -> (order, step vector between consecutive slices in LPS mm)."""
    if len(frames) < 2:
        raise InputError(f"{path} has a single slice; gmim predict needs a 3-D series (at least 2 slices)")
    normal = np.cross(frames[0].orientation[:3], frames[0].orientation[3:])
    positions = np.stack([f.position for f in frames])
    dist = positions @ normal
    order = np.argsort(dist, kind="stable")
    steps = np.diff(dist[order])
    if np.any(steps < SHEAR_TOL_MM):
        raise InputError(f"{path} has {int(np.sum(steps < SHEAR_TOL_MM)) + 1} slices at one position (several "
                         "volumes in one series: echoes, phases or time points); split the series, one volume each")
    median = float(np.median(steps))
    worst = int(np.argmax(np.abs(steps - median)))
    if abs(steps[worst] - median) > SPACING_RTOL * median:
        ratio = steps[worst] / median
        if round(ratio) >= 2 and abs(ratio - round(ratio)) < 0.05:
            before, after = (_name(frames[i]) for i in order[worst:worst + 2])
            raise InputError(f"{path}: {round(ratio) - 1} slice(s) missing between {before} and {after} (gap "
                             f"{steps[worst]:.2f} mm where slices are {median:.2f} mm apart); export the complete "
                             "series again")
        raise InputError(f"{path} has uneven slice spacing ({steps.min():.2f} to {steps.max():.2f} mm); gmim "
                         "predict does not resample such series: resample it to even spacing first")
    ordered = positions[order]
    step = (ordered[-1] - ordered[0]) / (len(frames) - 1)
    drift = ordered - (ordered[0] + np.arange(len(frames))[:, None] * step)
    sideways = step - (step @ normal) * normal
    if np.linalg.norm(sideways) > SHEAR_TOL_MM or np.abs(drift).max() > SPACING_RTOL * median + SHEAR_TOL_MM:
        tilt = float(np.degrees(np.arctan2(np.linalg.norm(sideways), step @ normal)))
        raise InputError(f"{path}: the slices are sheared ({tilt:.1f} degrees between the slice normal and the line "
                         "through the slice positions, e.g. gantry tilt); not supported: correct the tilt first "
                         "(e.g. dcm2niix writes a tilt-corrected NIfTI)")
    return order, step


def _lps_affine(first: Frame, step: np.ndarray) -> np.ndarray:
    """Voxel (column, row, slice) -> LPS mm."""
    affine = np.eye(4)
    affine[:3, 0] = first.orientation[:3] * first.spacing[1]
    affine[:3, 1] = first.orientation[3:] * first.spacing[0]
    affine[:3, 2] = step
    affine[:3, 3] = first.position
    return affine


def _pixels(frames: list[Frame]) -> np.ndarray:
    """(X, Y, Z) float32 in modality units: the modality LUT or rescale slope/intercept applied, per frame for
    enhanced objects (their Pixel Value Transformation may differ from frame to frame)."""
    rows, cols = frames[0].shape
    out = np.empty((cols, rows, len(frames)), np.float32)
    loaded: tuple[Path, Any, np.ndarray] | None = None
    for z, f in enumerate(frames):
        if loaded is None or loaded[0] != f.path:  # one file in memory at a time
            try:
                ds = pydicom.dcmread(f.path)
                loaded = (f.path, ds, ds.pixel_array)
            except Exception as e:  # noqa: BLE001 - decoders raise many types
                raise InputError(f"could not decode the pixels of {f.path} ({type(e).__name__}: "
                                 f"{one_line(e, empty='no message')}); the file is damaged or uses a compression no "
                                 "installed decoder reads") from e
        _, ds, arr = loaded
        if f.index is None:
            out[:, :, z] = apply_modality_lut(arr, ds).T
        else:
            slope, intercept = _frame_rescale(ds, f.index)
            out[:, :, z] = (arr[f.index].astype(np.float64) * slope + intercept).T
    return out


def _frame_rescale(ds: Any, index: int) -> tuple[float, float]:
    groups = ds.PerFrameFunctionalGroupsSequence[index]
    shared = ds.get("SharedFunctionalGroupsSequence", [None])[0]
    slope = _group_value(groups, shared, "PixelValueTransformationSequence", "RescaleSlope")
    intercept = _group_value(groups, shared, "PixelValueTransformationSequence", "RescaleIntercept")
    return (float(ds.get("RescaleSlope", 1.0)) if slope is None else float(slope),
            float(ds.get("RescaleIntercept", 0.0)) if intercept is None else float(intercept))


def _name(frame: Frame) -> str:
    return frame.path.name if frame.index is None else f"frame {frame.index + 1}"


def _fmt(v: np.ndarray) -> str:
    return "[" + ", ".join(f"{x:.3g}" for x in v) + "]"
