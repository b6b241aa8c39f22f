"""OpenVINO window runner: an ONNX export compiled for the CPU by OpenVINO, bf16 where the CPU plugin supports it.

Why: on a CPU with AMX, OpenVINO's CPU plugin runs a feature_size-48 Swin UNETR window ~2.7x faster than the
project's own bf16 path (`FastCPUBackend`), because it compiles the whole graph (fused convolutions, normalisations
and attention, AMX bf16 kernels) instead of running PyTorch operators one at a time.

Where the graph comes from: an export written by `gmim export onnx` (its manifest's sha256 is checked first), or,
for a model folder or Hub repo id, an export that this module writes once into the cache (`onnx/<key>/`, keyed by
the weights, the config and the torch/MONAI/gmim-hub versions that shape the graph) with the same export function.

Caching: OpenVINO writes the compiled model into `openvino/` under the cache folder (its `CACHE_DIR` setting), so a
second run with the same graph, precision and threads loads it instead of compiling again. The cache folder is
`$GMIM_CACHE_DIR`, else `$XDG_CACHE_HOME/gmim-hub`, else `~/.cache/gmim-hub`; deleting it is always safe.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from gmim_hub._version import __version__
from gmim_hub.config import GMIMConfig
from gmim_hub.errors import ConfigError, InputError
from gmim_hub.export.onnx import MANIFEST_FILE, export_onnx, load_manifest, verify_onnx_sha256
from gmim_hub.inference import openvino_runtime as ovr

if TYPE_CHECKING:
    from gmim_hub.models.hub_models import GMIMForSegmentation

logger = logging.getLogger(__name__)

__all__ = ["OpenVINOBackend", "amx_supported", "cache_root", "check_threads", "export_for_openvino",
           "openvino_available", "openvino_bf16_supported"]

def cache_root() -> Path:
    """`$GMIM_CACHE_DIR`, else `$XDG_CACHE_HOME/gmim-hub`, else `~/.cache/gmim-hub` (not created here)."""
    if os.environ.get("GMIM_CACHE_DIR"):
        return Path(os.environ["GMIM_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "gmim-hub"


def openvino_available() -> bool:
    """Whether the `openvino` package is installed (without importing it)."""
    return importlib.util.find_spec("openvino") is not None


def amx_supported() -> bool:
    """Whether the CPU has AMX tiles (Intel Sapphire Rapids and later), where OpenVINO bf16 is the fastest runner."""
    try:  # torch's cpuinfo query; no public API in torch 2.x
        return bool(torch.cpu._is_amx_tile_supported())
    except (AttributeError, RuntimeError):  # pragma: no cover - depends on the torch build
        return False


def openvino_bf16_supported() -> bool:
    """Whether OpenVINO's CPU plugin lists BF16 among its OPTIMIZATION_CAPABILITIES on this CPU."""
    import openvino as ov

    return bool(ovr.bf16_supported(ov.Core()))


def _require_openvino() -> Any:
    try:
        import openvino as ov
    except ImportError as e:
        raise ConfigError("the openvino backend needs the openvino package: pip install openvino (or install "
                          "gmim-hub with the cpu extra), or use --backend fast") from e
    return ov


def _model_key(model: torch.nn.Module) -> str:
    """sha256 of what decides the exported graph: config, every tensor of the state dict, and the versions of the
    code that traces it (MONAI changed PatchMerging's function in 1.5, so a new MONAI must not reuse an old file)."""
    import monai

    config: GMIMConfig = model.config  # type: ignore[assignment]
    h = hashlib.sha256()
    head = {"config": config.to_dict(), "torch": torch.__version__, "monai": monai.__version__, "gmim_hub": __version__}
    h.update(json.dumps(head, sort_keys=True).encode())
    for name, t in sorted(model.state_dict().items()):
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def export_for_openvino(model: GMIMForSegmentation, root: Path | None = None) -> Path:
    """The ONNX export of `model` under `root/onnx/<key>/` (default root: `cache_root()`), written on first use by
    `export_onnx` (batch 1: windows run one at a time) and reused while its sha256 matches. Returns the folder."""
    root = cache_root() if root is None else Path(root)
    name = "m-" + _model_key(model)[:24]
    folder = root / "onnx" / name
    if (folder / MANIFEST_FILE).is_file():
        try:
            verify_onnx_sha256(load_manifest(folder), folder / "model.onnx")
            logger.info("reusing the cached ONNX export %s", folder)
            return folder
        except (OSError, ValueError) as e:  # a damaged cache entry is rebuilt, never trusted
            logger.warning("cached ONNX export %s is unusable (%s); exporting again", folder, e)
    t0 = time.perf_counter()
    export_onnx(model, root / "onnx", name=name, max_batch=1, overwrite=True)
    logger.info("exported %s for OpenVINO in %.1f s", folder, time.perf_counter() - t0)
    return folder


class OpenVINOBackend:
    """Runs an ONNX window model compiled by OpenVINO for the CPU, one window per call into the compiled model
    (static batch 1: the fastest compiled form, and one window's activations in memory at a time).

    precision: "bf16" (INFERENCE_PRECISION_HINT=bf16; needs BF16 in the CPU plugin's OPTIMIZATION_CAPABILITIES) or
    "fp32". threads: INFERENCE_NUM_THREADS (None: OpenVINO's default, one per physical core). cache_dir: where
    OpenVINO keeps compiled models, in one subfolder per precision and thread count (None: `cache_root() /
    "openvino"`). `loaded_from_cache` says whether this compile was served from it."""

    def __init__(self, onnx_path: str | Path, *, precision: str = "bf16", threads: int | None = None,
                 cache_dir: str | Path | None = None, verify: bool = True) -> None:
        ov = _require_openvino()
        if precision not in ovr.PRECISIONS:
            raise ConfigError(f"precision must be 'fp32' or 'bf16' for the openvino backend, got {precision!r}")
        check_threads(threads)
        core = ov.Core()
        try:  # the choice shared with the Triton `_cpu` model (gmim_hub/inference/openvino_runtime.py)
            ovr.choose_precision(core, precision)
        except ValueError as e:
            raise ConfigError(str(e).replace("use precision fp32", "use --precision fp32")) from None
        path = Path(onnx_path)
        folder = path if path.is_dir() else path.parent
        self.manifest = load_manifest(folder / MANIFEST_FILE)
        self.onnx_path = path if path.suffix == ".onnx" else folder / self.manifest["onnx_file"]
        if verify:
            verify_onnx_sha256(self.manifest, self.onnx_path)
        self.precision, self.threads = precision, threads
        self.in_channels = int(self.manifest["in_channels"])
        self.window_size = tuple(int(s) for s in self.manifest["window_size"])
        root = Path(cache_dir) if cache_dir is not None else cache_root() / "openvino"
        self.cache_dir = Path(ovr.cache_subdir(root, precision, threads))
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        self.compiled = ovr.compile_window_model(core, self.onnx_path, (self.in_channels, *self.window_size),
                                                 precision, threads, self.cache_dir)
        self.compile_seconds = time.perf_counter() - t0
        self.loaded_from_cache = bool(self.compiled.get_property("LOADED_FROM_CACHE"))
        self._request = self.compiled.create_infer_request()
        logger.info("OpenVINO %s model %s in %.1f s (%s)", precision, "loaded from cache" if self.loaded_from_cache
                    else "compiled", self.compile_seconds, self.cache_dir)

    def __call__(self, x: Tensor) -> Tensor:
        """x: (B, C, *window) -> logits (B, K, *window) float32 on the CPU."""
        arr = x.detach().to("cpu", torch.float32).numpy()
        if arr.ndim != 5 or arr.shape[1] != self.in_channels or tuple(arr.shape[2:]) != self.window_size:
            want = ", ".join(map(str, (self.in_channels, *self.window_size)))
            raise InputError(f"the OpenVINO model takes windows (B, {want}); got shape {tuple(arr.shape)}: use "
                             "sliding-window prediction (gmim predict)")
        return torch.from_numpy(ovr.run_windows(self._request, arr))


def check_threads(threads: int | None) -> None:
    """None (the runtime's default) or a positive count."""
    if threads is not None and int(threads) < 1:
        raise ConfigError(f"threads must be >= 1, got {threads!r}; omit --threads to use every core")

