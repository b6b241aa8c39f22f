"""Window runners for sliding-window prediction: PyTorch (fp32 or bf16 autocast) and onnxruntime.

A runner is a callable `(B, C, D, H, W) float32 tensor -> (B, K, D, H, W) float32 CPU tensor` for windows of the
model's ROI; MONAI's `SlidingWindowInferer` calls it with up to `sw_batch_size` windows at a time and stitches.
"""

from __future__ import annotations

import logging
from typing import Literal, get_args

import torch
from torch import Tensor

from gmim_hub.errors import ConfigError
from gmim_hub.export.onnx import OnnxWindowModel, load_segmentation_model, select_providers
from gmim_hub.inference.openvino_backend import openvino_available, openvino_bf16_supported

logger = logging.getLogger(__name__)

Precision = Literal["fp32", "bf16"]
BackendName = Literal["auto", "torch", "fast", "onnx", "openvino"]
PrecisionName = Literal["auto", "fp32", "bf16"]
BACKENDS: tuple[str, ...] = get_args(BackendName)
PRECISIONS: tuple[str, ...] = get_args(PrecisionName)
__all__ = ["BACKENDS", "PRECISIONS", "BackendName", "OnnxBackend", "PrecisionName", "TorchBackend", "bf16_supported", "choose_backend",
           "load_segmentation_model", "resolve_device", "select_providers"]


def resolve_device(device: str | torch.device | None) -> torch.device:
    """None picks CUDA when torch sees a GPU, else CPU; asking for CUDA without one is a one-line error."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:  # torch's message lists twenty device types over several lines
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"device must be 'cpu' or 'cuda', got {device!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' requested but torch sees no GPU (torch.cuda.is_available() is False); "
                          "use --device cpu")
    return dev


def bf16_supported(device: torch.device) -> bool:
    """Whether bf16 matrix work is native here (CUDA compute capability >= 8, or a CPU with AVX512-BF16/AMX).
    Without it, autocast still runs but emulates bf16, which is slower than fp32."""
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    try:  # no public API for the CPU check in torch 2.x; the oneDNN query is what autocast itself relies on
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # pragma: no cover - depends on the torch build
        return False


def choose_backend(backend: str, precision: str, device: str | torch.device | None, *,
                   export: bool = False) -> tuple[str, Precision]:
    """Resolve "auto" choices to (backend, precision) for a device (None = CUDA when available, else CPU). The one
    place the backend is chosen, for `Predictor.from_pretrained` and so for `gmim predict`.

    export: an ONNX export was given (`onnx_path`, --onnx): it runs on OpenVINO or onnxruntime, so "torch" /
    "fast" are an error.

    backend "auto": "torch" on CUDA. On the CPU, "openvino" when the openvino package is installed (the `cpu`
    extra), else "fast" (`FastCPUBackend`; "onnx" for an export). The rule comes from measurements of one
    feature_size-48 window on every CPU we met (README, Performance): OpenVINO was the fastest runner on each, in
    bf16 (1.17 s vs the fast backend's 3.15 s on an AMX Xeon; 1.20 s vs 1.87 s on an AVX512-BF16 AMD EPYC) and in
    fp32, the path of CPUs without native bf16 (2.47 s vs 3.64 s for the fast backend in fp32 and 3.22 s for
    onnxruntime on that EPYC).
    precision "auto": bf16 for the fast and openvino backends where the CPU does bf16 natively (AVX512-BF16 or AMX;
    ~0.5% of labels may flip against fp32), fp32 otherwise and for the torch and onnx backends. Unknown names and
    impossible pairs are one-line errors."""
    if backend not in BACKENDS:
        raise ConfigError(f"backend must be one of {', '.join(BACKENDS)}; got {backend!r}")
    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}; got {precision!r}")
    if export:
        if backend not in ("auto", "onnx", "openvino"):
            raise ConfigError(f"--onnx runs the export on onnxruntime or OpenVINO, so it cannot go with --backend "
                              f"{backend}; drop one of them")
        if backend == "auto":
            backend = "openvino" if openvino_available() and resolve_device(device).type == "cpu" else "onnx"
    if backend == "onnx":
        if precision == "bf16":
            raise ConfigError("precision 'bf16' applies to the torch, fast and openvino backends only; the onnx "
                              "backend runs the export in fp32 (drop --precision or use --backend openvino)")
        return "onnx", "fp32"
    dev = resolve_device(device)
    if backend == "auto":
        backend = "torch" if dev.type == "cuda" else "openvino" if openvino_available() else "fast"
    if backend in ("fast", "openvino") and dev.type != "cpu":
        raise ConfigError(f"the {backend} backend runs on the CPU only, not {dev.type}; use --backend torch on a GPU")
    if precision == "auto":
        if backend == "openvino":
            precision = "bf16" if openvino_available() and openvino_bf16_supported() else "fp32"
        else:
            precision = "bf16" if backend == "fast" and bf16_supported(dev) else "fp32"
    return backend, precision  # type: ignore[return-value]


class TorchBackend:
    """Runs a PyTorch model on `device` under `torch.inference_mode`, with bf16 autocast for `precision="bf16"`.
    Windows come in on the CPU, go to the device, and come back as float32 on the CPU (stitching stays on the host,
    so a whole-volume logit buffer never has to fit in GPU memory)."""

    def __init__(self, model: torch.nn.Module, *, precision: Precision = "fp32",
                 device: str | torch.device | None = None) -> None:
        if precision not in ("fp32", "bf16"):
            raise ConfigError(f"precision must be 'fp32' or 'bf16', got {precision!r}")
        self.device = resolve_device(device)
        self.precision = precision
        if precision == "bf16" and not bf16_supported(self.device):
            logger.warning("bf16 is not native on this %s; autocast will emulate it (slower than fp32)",
                           self.device.type)
        self.model = model.to(self.device).float().eval()

    def __call__(self, x: Tensor) -> Tensor:
        with torch.inference_mode(), torch.autocast(self.device.type, dtype=torch.bfloat16,
                                                    enabled=self.precision == "bf16"):
            out = self.model(x.to(self.device, torch.float32))
        return out.float().cpu()


class OnnxBackend:
    """Runs an `OnnxWindowModel`, at most `max_batch` windows per onnxruntime call (the export's verified batch)."""

    precision: Precision = "fp32"

    def __init__(self, window_model: OnnxWindowModel, *, max_batch: int = 4) -> None:
        if max_batch < 1:
            raise ConfigError(f"max_batch must be >= 1, got {max_batch!r}")
        self.window_model = window_model
        self.max_batch = int(max_batch)

    def __call__(self, x: Tensor) -> Tensor:
        arr = x.detach().to("cpu", torch.float32).numpy()
        outs = [torch.from_numpy(self.window_model(arr[i:i + self.max_batch]))
                for i in range(0, arr.shape[0], self.max_batch)]
        return torch.cat(outs, dim=0)
