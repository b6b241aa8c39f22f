"""Label maps as DICOM Segmentation objects (highdicom), on exactly the frames of the source series.

One segment per class (class 0, the background, is not a segment; a multi-label model gets one segment per
channel), named after the model's `label_names`, each with the algorithm that made it: the model's name and
revision and the gmim-hub version. The SEG references every source frame, shares the series' frame of reference
and patient/study, and stores one binary frame per (source frame, segment).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom

from gmim_hub.errors import InputError
from gmim_hub.inference.formats.dicom_series import DicomSource

SEGMENT_LABEL_MAX = 64  # LO value representation


@dataclass(frozen=True)
class SegInfo:
    """Who made the segmentation: `model` (folder or Hub repo id), `revision` (commit or None), the label names
    (one per output channel, background first for softmax models) and whether labels are multi-label channels."""

    model: str
    revision: str | None
    label_names: tuple[str, ...]
    multi_label: bool
    version: str


def segment_names(info: SegInfo, channels: int) -> list[str]:
    """Names of the segments, 1-based: classes 1..K-1 (softmax) or channels 0..K-1 (multi-label)."""
    names = list(info.label_names) or [f"class {i}" for i in range(channels)]
    kept = names if info.multi_label else names[1:]
    return [n[:SEGMENT_LABEL_MAX] for n in kept]


def write_dicom_seg(path: str | Path, labels: np.ndarray, source: DicomSource, info: SegInfo) -> None:
    """labels: (X, Y, Z) class indices or (X, Y, Z, K) 0/1 on the source volume's grid (as read by
    `read_dicom_volume`); written as a BINARY SEG to `path`."""
    import highdicom as hd  # imported on use: only SEG outputs need it

    datasets = [pydicom.dcmread(p, stop_before_pixels=True) for p in source.paths]
    frames = _source_frame_order(labels, source)
    channels = labels.shape[3] if labels.ndim == 4 else (len(info.label_names) or int(labels.max()) + 1)
    names = segment_names(info, max(channels, 2))
    pixel = frames if info.multi_label else frames.astype(np.uint16 if len(names) > 255 else np.uint8)
    seg = hd.seg.Segmentation(
        source_images=datasets, pixel_array=pixel, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=_descriptions(hd, names, info), series_instance_uid=hd.UID(),
        series_number=_series_number(datasets[0]), sop_instance_uid=hd.UID(), instance_number=1,
        manufacturer="gmim-hub", manufacturer_model_name=_lo(Path(info.model.rstrip("/")).name or info.model),
        software_versions=info.version, device_serial_number=(info.revision or "local")[:64],
        series_description=_lo(f"gmim-hub segmentation ({Path(info.model.rstrip('/')).name})"),
        content_label="GMIM", content_description=_lo(f"gmim-hub {info.version} labels"),
        omit_empty_frames=False,
    )
    seg.save_as(str(path), enforce_file_format=True)


def _source_frame_order(labels: np.ndarray, source: DicomSource) -> np.ndarray:
    """(X, Y, Z[, K]) on the sorted volume -> (frames, rows, columns[, K]) in the order highdicom expects: the
    order of `source.paths` for single-frame series, the stored frame order of a multi-frame object."""
    n = len(source.frames)
    if labels.shape[2] != n:
        raise InputError(f"labels have {labels.shape[2]} slices but the DICOM series has {n}; pass the labels "
                         "predicted for this series")
    per_slice = np.moveaxis(labels, 2, 0)  # (Z, X, Y[, K])
    per_slice = np.swapaxes(per_slice, 1, 2)  # (Z, rows, columns[, K])
    if source.multiframe:
        order = np.argsort([f.index or 0 for f in source.frames])  # multi-frame: every index is set
    else:
        position = {p: i for i, p in enumerate(source.paths)}
        order = np.argsort([position[f.path] for f in source.frames])
    return np.ascontiguousarray(per_slice[order])


def _descriptions(hd: Any, names: list[str], info: SegInfo) -> list[Any]:
    from pydicom.sr.codedict import codes

    params = {"model": info.model[:64], "revision": info.revision or "none", "gmim-hub": info.version}
    algorithm = hd.AlgorithmIdentificationSequence(
        name=_lo(Path(info.model.rstrip("/")).name or info.model), family=codes.cid7162.ArtificialIntelligence,
        version=(info.revision or f"gmim-hub {info.version}")[:64], source="gmim-hub", parameters=params)
    return [hd.seg.SegmentDescription(
        segment_number=i, segment_label=name, segmented_property_category=codes.SCT.Tissue,
        segmented_property_type=codes.SCT.Tissue, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm, tracking_id=name, tracking_uid=hd.UID())
        for i, name in enumerate(names, start=1)]


def _series_number(ds: Any) -> int:
    number = ds.get("SeriesNumber")
    return int(number) + 1000 if number not in (None, "") else 1000


def _lo(text: str) -> str:
    return text[:SEGMENT_LABEL_MAX]
