"""`gmim infer`: a NIfTI volume through a Triton server, label map back on the input's grid.

The preprocessing (orientation, spacing, intensity) and its inverse are `gmim_hub.inference.Predictor`'s, so a
served prediction is made exactly like `gmim predict`'s; only the model runs remotely:

- window mode: the client runs MONAI's Gaussian-weighted sliding window and sends the windows to the window model
  (`<name>_cpu` here, `<name>` on a GPU host), `batch_size` windows per request and `concurrency` requests in
  flight, so the server's dynamic batcher fills. Logits come back: K x 4 bytes per voxel per window.
- volume mode: one request with the preprocessed volume to `<name>_volume`, which stitches on the server and
  returns uint8 labels (1 byte per voxel); the labels are then inverted to the input's grid here.

Before sending, the server's config for the model is checked against the export manifest (embedded in the config
by `gmim export triton`, and compared with a local manifest when one is given).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from gmim_hub.config import GMIMConfig
from gmim_hub.errors import ServingError
from gmim_hub.inference import Predictor, plan_outputs
from gmim_hub.serving.backend.sliding import label_bits, unpack_labels
from gmim_hub.serving.client import ModelSpec, Protocol, TritonClient

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
    from gmim_hub.export.onnx import load_manifest

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


class RemoteVolumePredictor(Predictor):
    """`Predictor` whose whole sliding window runs on the server's volume model; labels come back instead of
    logits and are turned into logits with the same argmax (one-hot) or threshold (+-1), so `Predictor`'s inverse
    transforms and writers apply unchanged. Probabilities are not available in this mode."""

    def __init__(self, config: GMIMConfig, client: TritonClient, model: str, *, overlap: float) -> None:
        super().__init__(config, _no_windows, overlap=overlap)
        self.client, self.model = client, model

    def _sliding_window(self, image: Tensor, progress: Callable[[int, int], None] | None) -> Tensor:
        vol = image.detach().cpu().float().numpy()
        multi = self.config.data.multi_label
        packed = self.client.infer(self.model, vol, "labels_packed", parameters={"overlap": self.overlap})
        shape = ((self.config.out_channels,) if multi else ()) + tuple(vol.shape[1:])
        try:
            labels = unpack_labels(packed, label_bits(self.config.out_channels, multi), shape)
        except ValueError as e:
            raise ServingError(f"{self.model}: packed labels do not match the volume {tuple(vol.shape[1:])} ({e}); "
                               "is the model repository from this version of gmim export triton?") from None
        if progress is not None:
            progress(1, 1)
        lab = torch.from_numpy(labels.astype(np.int64))
        if self.config.data.multi_label:
            return lab.float() * 2.0 - 1.0  # (K, D, H, W): > 0 where the server's sigmoid was > 0.5
        return torch.nn.functional.one_hot(lab, self.config.out_channels).permute(3, 0, 1, 2).float()


def _no_windows(windows: Tensor) -> Tensor:  # pragma: no cover - RemoteVolumePredictor never runs windows
    raise AssertionError("volume mode stitches on the server")


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
                     overlap: float, concurrency: int, batch_size: int | None) -> Predictor:
    """A `Predictor` with the export's preprocessing whose model runs on the server."""
    config = GMIMConfig.from_dict(manifest["config"])
    if mode == "volume":
        return RemoteVolumePredictor(config, client, spec.name, overlap=overlap)
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
    out_format: str | None = None,
    series: str | None = None,
) -> InferReport:
    """Segment a volume (any `gmim predict` input, or a folder of them) on a Triton server; outputs have the
    input's shape and affine, in the format OUTPUT's name (or `out_format`) asks for.

    `model` is an export name (resolved to `<name>_volume`, or `<name>` / `<name>_cpu` in window mode) or a full
    model name. Paths are planned as in `gmim predict` (a folder maps to `<stem>_seg.nii.gz` files).
    """
    _check_options(mode, overlap, concurrency, batch_size)
    jobs = plan_outputs(input_path, output, overwrite=overwrite, out_format=out_format, series=series)
    t0 = time.monotonic()
    with TritonClient(url, protocol=protocol, timeout=timeout, retries=retries) as client:
        name = resolve_model(client, model, mode)
        spec = client.model_spec(name)
        m = model_manifest(spec, manifest)
        check_model(spec, m, mode)
        predictor = remote_predictor(client, spec, m, mode, overlap=overlap, concurrency=concurrency,
                                     batch_size=batch_size)
        outputs: list[Path] = []
        for job in jobs:
            outputs += predictor.predict_file(job.input, job.labels, overwrite=overwrite, progress=progress,
                                              series=job.series)
        return InferReport(outputs, name, mode, client.requests, client.bytes_sent, client.bytes_received,
                           time.monotonic() - t0)
