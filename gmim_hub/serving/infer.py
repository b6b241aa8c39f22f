"""`gmim infer`: a volume (NIfTI, NRRD, MetaImage, DICOM) through a Triton server, labels back on its grid.

The preprocessing (orientation, spacing, intensity) and its inverse are `gmim_hub.inference.Predictor`'s, so a
served prediction is made exactly like `gmim predict`'s; only the model runs remotely:

- window mode: the client runs MONAI's Gaussian-weighted sliding window and sends the windows to the window model
  (`<name>_cpu` here, `<name>` on a GPU host), `batch_size` windows per request and `concurrency` requests in
  flight, so the server's dynamic batcher fills. Logits come back: K x 4 bytes per voxel per window.
- volume mode: one request with the preprocessed volume to `<name>_volume`, which stitches on the server and
  returns bit-packed labels; the labels are then inverted to the input's grid here. This mode never imports MONAI
  (~10 s): the preprocessing and its inverse are `gmim_hub.serving.geometry`'s, the same arithmetic as `Predictor`.

Before sending, the server's config for the model is checked against the export manifest (embedded in the config
by `gmim export triton`, and compared with a local manifest when one is given).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from torch import Tensor

from gmim_hub._version import __version__
from gmim_hub.config import GMIMConfig
from gmim_hub.errors import InputError, ServingError
from gmim_hub.export.onnx import load_manifest
from gmim_hub.inference.io import (
    PredictionJob,
    check_not_inputs,
    check_outputs_free,
    check_volume,
    nifti_like,
    plan_outputs,
    read_volume_header,
    save_niftis_atomic,
)
from gmim_hub.inference.memory import check_jobs, check_memory, memory_limit
from gmim_hub.intensity import check_intensities
from gmim_hub.serving import geometry
from gmim_hub.serving.backend.sliding import label_bits, unpack_labels
from gmim_hub.serving.client import ModelSpec, Protocol, TritonClient

if TYPE_CHECKING:
    from gmim_hub.inference.formats import SegInfo
    from gmim_hub.inference.predictor import Predictor

log = logging.getLogger(__name__)

Mode = Literal["volume", "window"]


def expected_tensors(manifest: dict[str, Any], mode: Mode) -> tuple[dict[str, tuple[str, list[int]]], ...]:
    """(inputs, outputs) a model serving this export must declare, as {name: (TYPE_*, dims without batch)}."""
    if mode == "window":
        return ({manifest["input"]["name"]: ("TYPE_FP32", list(manifest["input"]["shape"][1:]))},
                {manifest["output"]["name"]: ("TYPE_FP32", list(manifest["output"]["shape"][1:]))})
    labels = [int(manifest["out_channels"]), -1, -1, -1] if manifest["multi_label"] else [-1, -1, -1]
    return ({"image": ("TYPE_FP32", [int(manifest["in_channels"]), -1, -1, -1])}, {"labels": ("TYPE_UINT8", labels)})


def check_model(spec: ModelSpec, manifest: dict[str, Any], mode: Mode) -> None:
    """ServingError naming every difference between the server's model and what the manifest says it must be."""
    inputs, outputs = expected_tensors(manifest, mode)
    problems = [f"{kind} {name!r}: server has {got.get(name, 'nothing')}, the export needs {want}"
                for kind, got, exp in (("input", spec.inputs, inputs), ("output", spec.outputs, outputs))
                for name, want in exp.items() if tuple(got.get(name, ())) != want]
    if mode == "window" and spec.max_batch_size < 1:
        problems.append("window models must be batched (max_batch_size >= 1)")
    if mode == "volume" and spec.max_batch_size != 0:
        problems.append(f"volume models take one unbatched volume (max_batch_size 0), got {spec.max_batch_size}")
    if problems:
        raise ServingError(f"model {spec.name!r} does not match export {manifest['name']!r} in {mode} mode: "
                           + "; ".join(problems) + " (check --model and --mode)")


def resolve_model(client: TritonClient, name: str, mode: Mode) -> str:
    """The served model for an export name: `<name>_volume` (volume mode), `<name>` or `<name>_cpu` (window)."""
    if name.endswith(("_volume", "_cpu")):
        candidates = [name]
    else:
        candidates = [f"{name}_volume", name] if mode == "volume" else [name, f"{name}_cpu"]
    for candidate in candidates:
        if client.is_model_ready(candidate):
            return candidate
    client.check_ready(candidates[0])  # raises with the list of loaded models
    return candidates[0]  # pragma: no cover


def model_manifest(spec: ModelSpec, local: str | Path | None) -> dict[str, Any]:
    """The manifest to preprocess with: the server's, checked against a local one when given."""
    mine = load_manifest(local) if local is not None else None
    if spec.manifest is None and mine is None:
        raise ServingError(f"model {spec.name!r} carries no export manifest (not written by gmim export triton); "
                           "pass --manifest export/<name>/manifest.json")
    if spec.manifest is not None and mine is not None and spec.manifest["sha256"] != mine["sha256"]:
        raise ServingError(f"the server's {spec.name!r} serves ONNX sha256 {spec.manifest['sha256'][:16]}..., not "
                           f"the local export's {mine['sha256'][:16]}...; re-run gmim export triton and restart")
    return spec.manifest if spec.manifest is not None else mine  # type: ignore[return-value]


class TritonWindowRunner:
    """A `Predictor` window runner: (n, C, D, H, W) windows -> (n, K, D, H, W) logits, sent as requests of
    `batch_size` windows with up to `concurrency` of them in flight."""

    def __init__(self, client: TritonClient, model: str, *, batch_size: int, concurrency: int) -> None:
        self.client, self.model, self.batch_size, self.concurrency = client, model, batch_size, concurrency

    def __call__(self, windows: Tensor) -> Tensor:
        arr = windows.detach().cpu().float().numpy()
        chunks = [arr[i : i + self.batch_size] for i in range(0, len(arr), self.batch_size)]
        logits = self.client.infer_many(self.model, chunks, "logits", concurrency=self.concurrency)
        return torch.from_numpy(np.concatenate(logits)).to(windows.device)


class RemoteVolume:
    """Volume mode: preprocessing and its inverse here (`gmim_hub.serving.geometry`: what `Predictor` does, without
    MONAI), the whole sliding window on the server's volume model; labels come back, never logits, so
    probabilities are not available in this mode."""

    def __init__(self, config: GMIMConfig, client: TritonClient, model: str, *, overlap: float) -> None:
        self.config, self.client, self.model, self.overlap = config, client, model, float(overlap)
        self.max_memory_gb: float | None = None  # as `Predictor`'s: see gmim_hub.inference.memory
        self.strict_input = False
        self.on_warning: Callable[[str], None] = log.warning
        self.model_name: str | None = None  # the export's source model, recorded in DICOM SEG outputs
        self.model_revision: str | None = None

    def check_inputs(self, jobs: list[PredictionJob]) -> None:
        """Before any request: every input's header is readable and its preprocessing fits in memory."""
        check_jobs(jobs, self.config, max_memory_gb=self.max_memory_gb)

    def predict_file(self, in_path: str | Path, out_path: str | Path, *, overwrite: bool = False,
                     progress: Callable[[int, int], None] | None = None, series: str | None = None) -> list[Path]:
        """Segment one input (NIfTI, NRRD, MetaImage, a DICOM series folder or file; `series` picks a
        SeriesInstanceUID) on the server; writes `out_path` with the input's shape and affine (a DICOM SEG on the
        source frames when it ends in .dcm)."""
        out_path = Path(out_path)
        job = PredictionJob(Path(in_path), out_path, None, series)
        if not overwrite:
            check_outputs_free([job])
        check_not_inputs([job], Path(in_path))
        header = read_volume_header(in_path, series)
        check_memory(in_path, header, self.config, probabilities=False, max_memory_gb=self.max_memory_gb)
        loaded = geometry.load_volume(in_path, series)
        image, affine = loaded.image, loaded.affine
        vol = check_volume(image, self.config.in_channels, name=str(in_path))
        check_intensities(vol, self.config.data, str(in_path), strict=self.strict_input, warn=self.on_warning)
        if not np.all(np.isfinite(affine)):
            raise InputError(f"affine must be a finite 4x4 matrix, got {affine.tolist()}")
        x, grid = geometry.preprocess(vol, affine, self.config.data)
        labels = self._labels(x)
        if progress is not None:
            progress(1, 1)
        out = geometry.invert_labels(labels, grid, affine)
        dtype = np.uint8 if self.config.out_channels <= 255 else np.uint16
        arr = np.clip(np.round(out), 0, None).astype(dtype)
        dicom = (loaded.dicom, self.seg_info()) if loaded.dicom is not None else None
        save_niftis_atomic([(out_path, np.moveaxis(arr, 0, -1) if self.config.data.multi_label else arr[0])],
                           affine, overwrite=overwrite, like=nifti_like(in_path, header), dicom=dicom)
        return [out_path]

    def seg_info(self) -> SegInfo:
        """The served model's identity and label names, as DICOM SEG outputs record them (as `Predictor.seg_info`)."""
        from gmim_hub.inference.formats.dicom_seg import SegInfo

        d = self.config.data
        return SegInfo(self.model_name or self.model, self.model_revision, tuple(d.label_names), d.multi_label,
                       __version__)

    def _labels(self, x: np.ndarray) -> np.ndarray:
        """(C, D, H, W) preprocessed volume -> (1, D, H, W) class indices or (K, D, H, W) 0/1 labels."""
        multi = self.config.data.multi_label
        packed = self.client.infer(self.model, x, "labels_packed", parameters={"overlap": self.overlap})
        shape = ((self.config.out_channels,) if multi else ()) + tuple(x.shape[1:])
        try:
            labels = unpack_labels(packed, label_bits(self.config.out_channels, multi), shape)
        except ValueError as e:
            raise ServingError(f"{self.model}: packed labels do not match the volume {tuple(x.shape[1:])} ({e}); "
                               "is the model repository from this version of gmim export triton?") from None
        return labels if multi else labels[None]


@dataclass(frozen=True)
class InferReport:
    outputs: list[Path]
    model: str
    mode: Mode
    requests: int
    bytes_sent: int
    bytes_received: int
    seconds: float


def remote_predictor(client: TritonClient, spec: ModelSpec, manifest: dict[str, Any], mode: Mode, *,
                     overlap: float, concurrency: int, batch_size: int | None) -> RemoteVolume | Predictor:
    """A predictor with the export's preprocessing whose model runs on the server (`predict_file` in both modes)."""
    config = GMIMConfig.from_dict(manifest["config"])
    if mode == "volume":
        volume = RemoteVolume(config, client, spec.name, overlap=overlap)
        origin = manifest.get("source") or {}
        volume.model_name = origin.get("model") or manifest.get("name")
        volume.model_revision = origin.get("revision")
        return volume
    from gmim_hub.inference.predictor import Predictor  # MONAI: window mode stitches here with its inferer

    per_request = batch_size or max(1, spec.max_batch_size // 2)
    if per_request > spec.max_batch_size:
        raise ServingError(f"batch_size must be at most {spec.max_batch_size} (the model's max_batch_size), "
                           f"got {per_request}")
    runner = TritonWindowRunner(client, spec.name, batch_size=per_request, concurrency=concurrency)
    return Predictor(config, runner, sw_batch_size=per_request * concurrency, overlap=overlap)


def _check_options(mode: str, overlap: float, concurrency: int, batch_size: int | None) -> None:
    if mode not in ("volume", "window"):
        raise ServingError(f"mode must be 'volume' or 'window', got {mode!r}")
    if not 0.0 <= overlap < 1.0:
        raise ServingError(f"overlap must be in [0, 1), got {overlap!r}")
    if concurrency < 1:
        raise ServingError(f"concurrency must be >= 1, got {concurrency!r}")
    if batch_size is not None and batch_size < 1:
        raise ServingError(f"batch_size must be >= 1, got {batch_size!r}")


def infer_files(
    input_path: str | Path,
    output: str | Path,
    *,
    model: str,
    url: str = "127.0.0.1:8000",
    protocol: Protocol = "http",
    mode: Mode = "volume",
    concurrency: int = 4,
    timeout: float = 60.0,
    retries: int = 3,
    overlap: float = 0.5,
    batch_size: int | None = None,
    manifest: str | Path | None = None,
    overwrite: bool = False,
    progress: Callable[[int, int], None] | None = None,
    max_memory_gb: float | None = None,
    strict_input: bool = False,
    on_warning: Callable[[str], None] | None = None,
    out_format: str | None = None,
    series: str | None = None,
) -> InferReport:
    """Segment a volume (any `gmim predict` input, or a folder of them) on a Triton server; outputs have the
    input's shape and affine, in the format OUTPUT's name (or `out_format`) asks for.

    `model` is an export name (resolved to `<name>_volume`, or `<name>` / `<name>_cpu` in window mode) or a full
    model name. Paths are planned as in `gmim predict` (a folder maps to `<stem>_seg.nii.gz` files).
    """
    _check_options(mode, overlap, concurrency, batch_size)
    memory_limit(max_memory_gb)
    jobs = plan_outputs(input_path, output, overwrite=overwrite, out_format=out_format, series=series)
    t0 = time.monotonic()
    with TritonClient(url, protocol=protocol, timeout=timeout, retries=retries) as client:
        name = resolve_model(client, model, mode)
        spec = client.model_spec(name)
        m = model_manifest(spec, manifest)
        check_model(spec, m, mode)
        predictor = remote_predictor(client, spec, m, mode, overlap=overlap, concurrency=concurrency,
                                     batch_size=batch_size)
        predictor.max_memory_gb, predictor.strict_input = max_memory_gb, strict_input
        if on_warning is not None:
            predictor.on_warning = on_warning
        predictor.check_inputs(jobs)
        outputs: list[Path] = []
        for job in jobs:
            outputs += predictor.predict_file(job.input, job.labels, overwrite=overwrite, progress=progress,
                                              series=job.series)
        return InferReport(outputs, name, mode, client.requests, client.bytes_sent, client.bytes_received,
                           time.monotonic() - t0)
