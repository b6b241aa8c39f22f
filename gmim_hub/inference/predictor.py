"""Whole-volume prediction: the config's preprocessing, a Gaussian-weighted sliding window, and the inverse of the
preprocessing, so label maps come back on the input's own grid (same shape, same affine).

Pipeline for one volume (C, X, Y, Z) with its affine:

1. `Orientationd` to `data.orientation`, `Spacingd` to `data.spacing` (bilinear; skipped when None), the config's
   intensity normalisation. MONAI records each spatial step on the `MetaTensor`.
2. `SlidingWindowInferer` with windows of `roi_size`, `sw_batch_size` windows per call, `overlap`, Gaussian
   blending; the importance map is computed once per `Predictor` (`cache_roi_weight_map`). Volumes smaller than a
   window are padded and cropped back by the inferer. A window whose every voxel holds one value per channel (air
   clipped by the CT window, the zero background of a skull-stripped or registered MRI) is run through the network
   once per volume and its logits are reused for the other windows of that value (`reuse_constant_windows`): the
   same input gives the same output, so no label can change; `window_stats` counts what was computed.
3. Softmax (argmax labels) or, for `data.multi_label`, sigmoid (labels = probability > 0.5 per channel).
4. `Invertd` undoes spacing and orientation: nearest-neighbour for labels, bilinear for probabilities.

Outputs: labels (X, Y, Z) uint8 (class index), or for multi-label models (X, Y, Z, K) uint8 with one 0/1 channel
per label (labels may overlap, so one combined map would lose information); probabilities (X, Y, Z, K) float32.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from monai.inferers import SlidingWindowInferer
from monai.transforms import Compose, Invertd, Orientationd, Spacingd
from torch import Tensor

from gmim_hub._version import __version__
from gmim_hub.config import GMIMConfig
from gmim_hub.data.transforms import intensity_transform
from gmim_hub.errors import ConfigError, InputError
from gmim_hub.export.onnx import OnnxWindowModel, load_manifest, select_providers
from gmim_hub.inference.backends import (
    BackendName,
    OnnxBackend,
    PrecisionName,
    TorchBackend,
    choose_backend,
    load_segmentation_model,
)
from gmim_hub.inference.fast import FastCPUBackend
from gmim_hub.inference.formats.dicom_seg import SegInfo
from gmim_hub.inference.io import (
    PredictionJob,
    check_not_inputs,
    check_outputs_free,
    check_volume,
    load_volume,
    nifti_like,
    probabilities_path,
    read_volume_header,
    save_niftis_atomic,
)
from gmim_hub.inference.memory import check_jobs, check_memory
from gmim_hub.inference.openvino_backend import OpenVINOBackend, export_for_openvino
from gmim_hub.intensity import check_intensities

logger = logging.getLogger(__name__)

WindowFn = Callable[[Tensor], Tensor]
ProgressFn = Callable[[int, int], None]  # (windows done, windows total)
CONSTANT_WINDOW_CACHE = 4  # distinct one-value windows whose logits are kept per volume (each K x ROI float32)


@dataclass(frozen=True)
class PredictionResult:
    """labels: (X, Y, Z) uint8 class indices, or (X, Y, Z, K) uint8 0/1 for multi-label models;
    probabilities: (X, Y, Z, K) float32 or None; affine: (4, 4), the input's."""

    labels: np.ndarray
    probabilities: np.ndarray | None
    affine: np.ndarray


def check_options(*, sw_batch_size: int = 4, overlap: float = 0.5, threads: int | None = None) -> None:
    """ConfigError for an option out of range (checked before a model is loaded)."""
    if sw_batch_size < 1:
        raise ConfigError(f"sw_batch_size must be >= 1, got {sw_batch_size!r}")
    if not 0.0 <= overlap < 1.0:
        raise ConfigError(f"overlap must be in [0, 1), got {overlap!r}")
    if threads is not None and threads < 1:
        raise ConfigError(f"threads must be >= 1 (CPU threads), got {threads!r}; leave it out to use every core")


def local_config(model: str | Path | None, onnx_path: str | Path | None) -> GMIMConfig | None:
    """The config of a local model folder or ONNX export, read without loading weights (so input checks can run
    before the model loads); None for a Hub repo id or when nothing is there yet."""
    if onnx_path is not None:
        folder = Path(onnx_path) if Path(onnx_path).is_dir() else Path(onnx_path).parent
        return GMIMConfig.from_dict(load_manifest(folder)["config"]) if (folder / "manifest.json").is_file() else None
    path = Path(model) / "config.json" if model is not None else None
    if path is None or not path.is_file():
        return None
    try:
        return GMIMConfig.from_json_file(path)
    except ConfigError as e:  # named as loading the model names it
        raise ConfigError(f"{path}: {e}") from e


class Predictor:
    """Sliding-window prediction of whole volumes with one window runner (see `gmim_hub.inference.backends`)."""

    def __init__(self, config: GMIMConfig, runner: WindowFn, *, sw_batch_size: int = 4,
                 overlap: float = 0.5, backend: str = "custom", precision: str | None = None) -> None:
        check_options(sw_batch_size=sw_batch_size, overlap=overlap)
        self.max_memory_gb: float | None = None  # see gmim_hub.inference.memory; None: $GMIM_MAX_MEMORY_GB or 80%
        self.strict_input = False  # True: an input far outside the training data's intensities is an InputError
        self.on_warning: Callable[[str], None] = logger.warning  # the CLI prints these
        self.config, self.runner = config, runner
        self.sw_batch_size, self.overlap = int(sw_batch_size), float(overlap)
        self.backend = backend  # for messages and logs: "torch", "fast", "onnx" or "custom"
        self.precision = precision or getattr(runner, "precision", "fp32")
        self.model_name: str | None = None  # folder or Hub repo id, recorded in DICOM SEG outputs
        self.model_revision: str | None = None  # its commit when it came from the Hub
        # a window of one value per channel is computed once per volume and its logits reused (exact); False runs
        # the network on every window (`gmim predict --compute-every-window`)
        self.reuse_constant_windows = True
        self.window_stats: dict[str, int] = {}  # of the last volume: windows, computed, reused
        d = config.data
        steps: list[Any] = [Orientationd("image", axcodes=d.orientation, labels=None)]
        if d.spacing is not None:
            steps.append(Spacingd("image", pixdim=d.spacing, mode="bilinear"))
        steps.append(intensity_transform(d, "image"))
        self.preprocess = Compose(steps)
        self._invert_nearest = Invertd("pred", self.preprocess, orig_keys="image", nearest_interp=True)
        self._invert_linear = Invertd("pred", self.preprocess, orig_keys="image", nearest_interp=False)
        self.inferer = SlidingWindowInferer(
            roi_size=config.roi_size, sw_batch_size=self.sw_batch_size, overlap=self.overlap, mode="gaussian",
            cache_roi_weight_map=True, sw_device="cpu", device="cpu",  # the runner moves windows to its device
        )

    @classmethod
    def from_pretrained(
        cls,
        source: str | Path | None,
        *,
        backend: BackendName = "auto",
        precision: PrecisionName = "auto",
        device: str | None = None,
        onnx_path: str | Path | None = None,
        revision: str | None = None,
        providers: Sequence[str] | None = None,
        threads: int | None = None,
        sw_batch_size: int = 4,
        overlap: float = 0.5,
    ) -> Predictor:
        """A predictor for a saved model (folder or Hub repo id) or an ONNX export, on OpenVINO, PyTorch or onnxruntime.

        backend: "torch" (the model as saved, fp32 or bf16 autocast, CPU or CUDA), "fast" (`FastCPUBackend`: the
        whole network in bf16 or fp32 with fused attention, CPU only, one window in memory at a time), "openvino"
        (`OpenVINOBackend`: an ONNX export compiled by OpenVINO for the CPU, bf16 or fp32), "onnx", or "auto"
        (on the CPU: openvino when the package is installed, else fast, or onnx when `onnx_path` is given; torch on CUDA;
        see `choose_backend`). precision "auto" is bf16 for the fast and openvino backends on CPUs with
        native bf16 and fp32 otherwise. threads: CPU threads of onnxruntime and OpenVINO (torch's are the caller's).

        For `backend="onnx"`, `onnx_path` (or else `source`) is the export folder, its `model.onnx` or its
        `manifest.json`; the config comes from the manifest and the file's sha256 is checked before use. For
        `backend="openvino"`, `onnx_path` is such an export; without it, the model (`source`) is exported once into
        the cache folder (see `gmim_hub.inference.openvino_backend`), where compiled models are cached too.
        """
        check_options(sw_batch_size=sw_batch_size, overlap=overlap, threads=threads)
        backend, precision = choose_backend(backend, precision, device,  # type: ignore[assignment]
                                            export=onnx_path is not None)
        if backend == "openvino":
            return cls._openvino(source, onnx_path, precision=precision, revision=revision, threads=threads,
                                 sw_batch_size=sw_batch_size, overlap=overlap)
        if backend in ("torch", "fast"):
            if source is None:
                raise ConfigError(f"the {backend} backend needs a model: pass a folder or Hub repo id (--model)")
            model = load_segmentation_model(source, revision=revision)
            runner: WindowFn
            if backend == "fast":
                runner = FastCPUBackend(model, precision=precision, inplace=True)  # the loaded copy is ours
            else:
                runner = TorchBackend(model, precision=precision, device=device)
            predictor = cls(model.config, runner, sw_batch_size=sw_batch_size, overlap=overlap, backend=backend,
                            precision=precision)
            predictor.model_name, predictor.model_revision = model.hub_source or str(source), model.hub_revision
            return predictor
        where = onnx_path if onnx_path is not None else source
        if where is None:
            raise ConfigError("the onnx backend needs an export: pass --onnx export/<name> (gmim export onnx)")
        if providers is None:
            providers = select_providers(device)
        window_model = OnnxWindowModel.from_export(where, providers=providers, threads=threads)
        manifest = window_model.manifest or {}
        config = GMIMConfig.from_dict(manifest["config"])
        runner = OnnxBackend(window_model, max_batch=manifest["max_batch_size"])
        predictor = cls(config, runner, sw_batch_size=sw_batch_size, overlap=overlap, backend="onnx", precision="fp32")
        origin = manifest.get("source") or {}
        predictor.model_name = origin.get("model") or manifest.get("name") or str(where)
        predictor.model_revision = origin.get("revision")
        return predictor

    @classmethod
    def _openvino(cls, source: str | Path | None, onnx_path: str | Path | None, *, precision: str,
                  revision: str | None, threads: int | None, sw_batch_size: int, overlap: float) -> Predictor:
        """An `OpenVINOBackend` predictor from an export (`onnx_path`) or a model (exported into the cache)."""
        if onnx_path is None:
            if source is None:
                raise ConfigError("the openvino backend needs a model (--model) or an ONNX export (--onnx)")
            onnx_path = export_for_openvino(load_segmentation_model(source, revision=revision))
        runner = OpenVINOBackend(onnx_path, precision=precision, threads=threads)
        config = GMIMConfig.from_dict(runner.manifest["config"])
        return cls(config, runner, sw_batch_size=sw_batch_size, overlap=overlap, backend="openvino",
                   precision=precision)

    # ---------------------------------------------------------------------------------------------------- API
    def count_windows(self, shape: Sequence[int]) -> int:
        """Windows the inferer will run for a preprocessed volume of spatial `shape` (for progress bars)."""
        n = 1
        for size, roi in zip(shape, self.config.roi_size, strict=True):
            size = max(int(size), roi)
            step = roi if size == roi else max(int(roi * (1 - self.overlap)), 1)
            n *= math.ceil((size - roi) / step) + 1
        return n

    def predict_volume(self, image: np.ndarray | Tensor, affine: np.ndarray | None = None, *,
                       probabilities: bool = False, progress: ProgressFn | None = None,
                       name: str = "image") -> PredictionResult:
        """image: (X, Y, Z) or (C, X, Y, Z) in the scanner's units (preprocessing is applied here); affine: (4, 4)
        voxel -> world (RAS mm), identity when None; `name` labels error messages. Returns arrays on the input's
        grid."""
        vol = check_volume(image, self.config.in_channels, name=name)
        affine = np.eye(4) if affine is None else np.asarray(affine, dtype=np.float64)
        if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
            raise InputError(f"affine must be a finite 4x4 matrix, got shape {affine.shape}")
        self._check_intensities(vol, name)
        data = self.preprocess({"image": MetaTensor(torch.from_numpy(vol), affine=torch.from_numpy(affine))})
        logits = self._sliding_window(data["image"].as_tensor(), progress)  # (K, D, H, W)
        # labels straight from the logits (argmax, or logit > 0 == sigmoid > 0.5): the (K, D, H, W) probabilities
        # are only computed when asked for
        multi = self.config.data.multi_label
        labels = (logits > 0).float() if multi else torch.argmax(logits, dim=0, keepdim=True).float()
        probs = None
        if probabilities:
            probs = torch.sigmoid(logits) if multi else torch.softmax(logits, dim=0)
        del logits
        labels = self._invert(labels, data, nearest=True)
        prob_out = None
        if probs is not None:
            prob_out = np.moveaxis(self._invert(probs, data, nearest=False).numpy(), 0, -1).astype(np.float32)
        return PredictionResult(self._label_array(labels), prob_out, affine)

    def check_inputs(self, jobs: Sequence[PredictionJob]) -> None:
        """Before any work: every input's header is readable and its prediction fits in memory."""
        check_jobs(jobs, self.config, max_memory_gb=self.max_memory_gb)

    def predict_file(self, in_path: str | Path, out_path: str | Path, *, probabilities: bool = False,
                     overwrite: bool = False, progress: ProgressFn | None = None,
                     series: str | None = None) -> list[Path]:
        """Predict one input (NIfTI, NRRD, MetaImage, a DICOM series folder or multi-frame file; `series` picks a
        SeriesInstanceUID in a folder holding several); writes `out_path` (labels; .nii.gz, .nii, .nrrd, .mha, or
        .dcm for a DICOM SEG of a DICOM input) and, with `probabilities`, `<stem>_prob.<suffix>` beside it, both on
        the input's grid (a NIfTI input's header codes and units kept). Returns the paths written."""
        out_path = Path(out_path)
        outputs = [out_path] + ([probabilities_path(out_path)] if probabilities else [])
        job = PredictionJob(Path(in_path), out_path, outputs[1] if probabilities else None, series)
        check_not_inputs([job], Path(in_path))
        if not overwrite:
            check_outputs_free([job])
        header = read_volume_header(in_path, series)
        check_memory(in_path, header, self.config, probabilities=probabilities, max_memory_gb=self.max_memory_gb)
        loaded = load_volume(in_path, series)
        result = self.predict_volume(loaded.image, loaded.affine, probabilities=probabilities, progress=progress,
                                     name=str(in_path))
        items = [(out_path, result.labels)]
        if result.probabilities is not None:
            items.append((outputs[1], result.probabilities))
        dicom = (loaded.dicom, self.seg_info()) if loaded.dicom is not None else None
        save_niftis_atomic(items, result.affine, overwrite=overwrite, like=nifti_like(in_path, header), dicom=dicom)
        return outputs

    def seg_info(self) -> SegInfo:
        """The model's identity and label names, as DICOM SEG outputs record them."""
        d = self.config.data
        return SegInfo(self.model_name or "custom", self.model_revision, tuple(d.label_names), d.multi_label,
                       __version__)

    # ------------------------------------------------------------------------------------------------ helpers
    def _check_intensities(self, vol: np.ndarray, name: str) -> None:
        check_intensities(vol, self.config.data, name, strict=self.strict_input, warn=self.on_warning)

    def _sliding_window(self, image: Tensor, progress: ProgressFn | None) -> Tensor:
        """image (C, D, H, W) preprocessed -> logits (K, D, H, W) float32 on the CPU."""
        total, done = self.count_windows(image.shape[1:]), 0
        cache: dict[tuple[float, ...], Tensor] = {}
        stats = {"windows": 0, "computed": 0, "reused": 0}

        def run(windows: Tensor) -> Tensor:
            nonlocal done
            if self.reuse_constant_windows:
                out, computed = run_reusing_constant_windows(self.runner, windows, cache)
            else:
                out, computed = self.runner(windows), int(windows.shape[0])
            stats["windows"] += int(windows.shape[0])
            stats["computed"] += computed
            done += int(windows.shape[0])
            if progress is not None:
                progress(min(done, total), total)
            return out

        with torch.inference_mode():
            logits = self.inferer(image[None].float(), run)[0].float()
        stats["reused"] = stats["windows"] - stats["computed"]
        self.window_stats = stats
        if stats["reused"]:
            logger.info("computed %d of %d windows; %d windows of one value reused the logits of an identical one",
                        stats["computed"], stats["windows"], stats["reused"])
        return logits

    def _invert(self, pred: Tensor, data: dict[str, Any], *, nearest: bool) -> Tensor:
        """Undo orientation and spacing on `pred` (K, D, H, W) using the operations recorded on data["image"]."""
        img = data["image"]
        d: dict[Any, Any] = {"image": img, "pred": MetaTensor(pred, meta=dict(img.meta),
                                              applied_operations=list(img.applied_operations))}
        inverter = self._invert_nearest if nearest else self._invert_linear
        return inverter(d)["pred"].as_tensor().float().cpu()

    def _label_array(self, labels: Tensor) -> np.ndarray:
        """(1 or K, X, Y, Z) float -> (X, Y, Z) or (X, Y, Z, K) unsigned ints (uint16 beyond 255 classes)."""
        dtype = np.uint8 if self.config.out_channels <= 255 else np.uint16
        arr = torch.round(labels).clamp_min(0).numpy().astype(dtype)
        return np.moveaxis(arr, 0, -1) if self.config.data.multi_label else arr[0]


def run_reusing_constant_windows(runner: WindowFn, windows: Tensor,
                                 cache: dict[tuple[float, ...], Tensor]) -> tuple[Tensor, int]:
    """Run `windows` (B, C, *roi) through `runner`, except windows holding a single value per channel whose logits
    are already in `cache` (keyed by those values) or were computed earlier in this batch: they get a copy of those
    logits. Returns (logits (B, K, *roi), windows the runner computed). Exact: such windows are identical inputs.
    Up to CONSTANT_WINDOW_CACHE values are kept in `cache`."""
    flat = windows.flatten(2)
    lo, hi = flat.amin(dim=2), flat.amax(dim=2)
    constant = (lo == hi).all(dim=1).tolist()
    if not any(constant):
        return runner(windows), int(windows.shape[0])
    keys = [tuple(lo[i].tolist()) if c else None for i, c in enumerate(constant)]
    first: dict[tuple[float, ...], int] = {}  # value -> the window of this batch that computes it
    todo = []
    for i, key in enumerate(keys):
        if key is None:
            todo.append(i)
        elif key not in cache and key not in first:
            first[key] = i
            todo.append(i)
    computed = runner(windows[todo]) if todo else None
    rows: list[Tensor | None] = [None] * len(keys)
    for j, i in enumerate(todo):
        rows[i] = computed[j]  # type: ignore[index]
        key = keys[i]
        if key is not None and len(cache) < CONSTANT_WINDOW_CACHE:
            cache[key] = computed[j].clone()  # type: ignore[index]
    for i, key in enumerate(keys):
        if rows[i] is None:
            rows[i] = cache[key] if key in cache else rows[first[key]]  # type: ignore[index]
    return torch.stack(rows), len(todo)  # type: ignore[arg-type]
