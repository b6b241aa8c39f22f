"""ONNX export of a segmentation model for ONE window size, its manifest, and an onnxruntime window runner.

Why one window size: MONAI's Swin UNETR computes its shifted-window attention mask and padding from Python ints, so
the traced spatial size is frozen into the graph. Dynamic spatial axes export without error and then fail inside
onnxruntime at a Reshape. So the graph has a dynamic batch axis only, and whole volumes go through
a sliding window outside the graph (`gmim predict`, or Triton's volume model).

An export folder `export/<name>/` holds exactly two files:

* `model.onnx`: one file (no external data; the TorchScript exporter, opset 17), input `image` (B, C, D, H, W)
  float32, output `logits` (B, K, D, H, W) float32;
* `manifest.json`: what the file is (sha256, window, channels, labels, preprocessing, source, versions and the
  measured PyTorch/onnxruntime parity). Its keys are `MANIFEST_KEYS`, exactly: the Triton tools read it.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import logging
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from gmim_hub._version import __version__
from gmim_hub.atomic import atomic_writes, sha256_file
from gmim_hub.config import GMIMConfig
from gmim_hub.errors import ConfigError, GMIMError, InputError, WeightsError

if TYPE_CHECKING:
    from gmim_hub.models.hub_models import GMIMForSegmentation

logger = logging.getLogger(__name__)

FORMAT = "gmim-hub-onnx"
FORMAT_VERSION = 1
ONNX_FILE = "model.onnx"
MANIFEST_FILE = "manifest.json"
INPUT_NAME = "image"
OUTPUT_NAME = "logits"
EXPORTER = "torch.onnx (torchscript)"
MANIFEST_KEYS = (
    "format", "format_version", "name", "onnx_file", "sha256", "input", "output", "window_size", "max_batch_size",
    "in_channels", "out_channels", "label_names", "multi_label", "data", "config", "source", "opset", "exporter",
    "versions", "parity", "created",
)
# onnxruntime execution providers in order of preference; CPU is always last and always present.
PROVIDER_ORDER = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")  # also a valid Triton model name


@dataclass(frozen=True)
class ExportResult:
    onnx_path: Path
    manifest_path: Path
    manifest: dict[str, Any]


# ------------------------------------------------------------------------------------------------------ export
def export_onnx(
    model_or_source: torch.nn.Module | str | Path,
    out_dir: str | Path = Path("export"),
    *,
    name: str | None = None,
    max_batch: int = 4,
    opset: int = 17,
    revision: str | None = None,
    roi: Sequence[int] | None = None,
    atol: float = 1e-4,
    overwrite: bool = False,
) -> ExportResult:
    """Export a segmentation model (a `SegmentationNetwork`, a folder written by `save_pretrained`, or a Hub repo id) to
    `out_dir/<name>/model.onnx` + `manifest.json`, for windows of `roi` (default: the config's `roi_size`).

    The file is checked with onnxruntime (CPU) against PyTorch on seeded random windows at batch 1 and at
    `max_batch`; a max abs difference above `atol` raises `GMIMError` and leaves no file behind. Both files are
    written to temporary names and moved into place (`os.replace`), so a crash never leaves a half-written export.
    """
    if max_batch < 1:
        raise ConfigError(f"max_batch must be >= 1, got {max_batch!r}")
    if opset < 17:
        raise ConfigError(f"opset must be >= 17 (LayerNormalization), got {opset!r}")
    name = _check_name(name or _default_name(model_or_source))
    target = Path(out_dir) / name
    if (target / ONNX_FILE).exists() and not overwrite:
        raise GMIMError(f"{target / ONNX_FILE} already exists; pass overwrite=True (--overwrite) or another --name")
    model, source = _resolve_model(model_or_source, revision)
    cfg: GMIMConfig = model.config  # type: ignore[assignment]
    if roi is not None:
        cfg = dataclasses.replace(cfg, roi_size=tuple(int(r) for r in roi))  # type: ignore[arg-type]  # validated
    target.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=target.parent))
    try:
        tmp_onnx = tmp_dir / ONNX_FILE
        _torch_export(model, cfg, tmp_onnx, opset)
        parity = _check_parity(model, cfg, tmp_onnx, max_batch, atol)
        manifest = _build_manifest(name, cfg, source, sha256_file(tmp_onnx), max_batch, opset, parity)
        with atomic_writes([target / ONNX_FILE, target / MANIFEST_FILE]) as (final_onnx, final_manifest):
            os.replace(tmp_onnx, final_onnx)  # the exporter's own file (created with the umask's mode)
            final_manifest.write_text(json.dumps(manifest, indent=2) + "\n")
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    logger.info("exported %s (sha256 %s, parity %.2e)", target / ONNX_FILE, manifest["sha256"][:12],
                max(parity["max_abs_diff_batch1"], parity["max_abs_diff_batch_max"]))
    return ExportResult(target / ONNX_FILE, target / MANIFEST_FILE, manifest)


def _default_name(src: Any) -> str:
    """The model folder's or repo's last path component (a Triton model name must not contain '/')."""
    source = getattr(src, "hub_source", None) if isinstance(src, torch.nn.Module) else str(src)
    return Path(str(source).rstrip("/")).name if source else "gmim_segmenter"


def _resolve_model(src: Any, revision: str | None) -> tuple[torch.nn.Module, dict[str, Any]]:
    """(model in eval mode on CPU in fp32, {"model": source or None, "revision": commit or None})."""
    if isinstance(src, torch.nn.Module):
        if not isinstance(getattr(src, "config", None), GMIMConfig):
            raise ConfigError("the model must carry a GMIMConfig as .config (a SegmentationNetwork / GMIMForSegmentation)")
        model = src
    else:
        model = load_segmentation_model(src, revision=revision)
    source = getattr(model, "hub_source", None) or (None if isinstance(src, torch.nn.Module) else str(src))
    rev = getattr(model, "hub_revision", None) or revision
    model = model.to("cpu").float().eval()
    return model, {"model": str(source) if source else None, "revision": rev}


def load_segmentation_model(source: str | Path, *, revision: str | None = None) -> GMIMForSegmentation:
    """A `GMIMForSegmentation` from a folder written by `save_pretrained` or a Hub repo id (strict load), in eval
    mode on the CPU, with `hub_source` / `hub_revision` recorded."""
    from gmim_hub.models.hub_models import GMIMForSegmentation  # MONAI: only when a model is loaded

    return GMIMForSegmentation.from_pretrained(source, revision=revision).eval()  # type: ignore[union-attr]


def _check_name(name: str) -> str:
    if not _NAME_RE.match(name):
        raise ConfigError(f"export name must be letters, digits, '_', '.', '-' (a Triton model name), got {name!r}")
    return name


def _torch_export(model: torch.nn.Module, cfg: GMIMConfig, path: Path, opset: int) -> None:
    """TorchScript exporter (opset 17, one file); dynamic batch axis only (see the module docstring)."""
    x = torch.zeros(1, cfg.in_channels, *cfg.roi_size)
    axes = {INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}}
    with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
        # MONAI's shape arithmetic on Python ints triggers TracerWarnings: expected, that is why the size is fixed
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", DeprecationWarning)  # the legacy exporter is chosen on purpose (opset 17)
        warnings.filterwarnings("ignore", message=".*instance_norm.*", category=UserWarning)
        torch.onnx.export(model, (x,), str(path), dynamo=False, opset_version=opset, input_names=[INPUT_NAME],
                          output_names=[OUTPUT_NAME], dynamic_axes=axes, do_constant_folding=True)
    extra = sorted(p.name for p in path.parent.iterdir() if p.name != path.name)
    if extra:  # external-data files would make the export two files; the manifest's sha256 covers only one
        raise WeightsError(f"the ONNX exporter wrote external data files {extra}; the model is too large (>2 GB) "
                           "for a single-file export")
    import onnx

    onnx.checker.check_model(str(path))


def _check_parity(model: torch.nn.Module, cfg: GMIMConfig, path: Path, max_batch: int, atol: float) -> dict:
    """Max abs difference between PyTorch and onnxruntime (CPU) logits at batch 1 and `max_batch`."""
    runner = OnnxWindowModel(path, providers=["CPUExecutionProvider"])
    gen = torch.Generator().manual_seed(0)
    diffs = {}
    for key, batch in (("max_abs_diff_batch1", 1), ("max_abs_diff_batch_max", max_batch)):
        x = torch.randn(batch, cfg.in_channels, *cfg.roi_size, generator=gen)
        with torch.inference_mode():
            ref = model(x).float().numpy()
        diffs[key] = float(np.max(np.abs(runner(x.numpy()) - ref)))
    if max(diffs.values()) > atol:
        raise GMIMError(f"ONNX export does not match PyTorch: max abs diff {diffs['max_abs_diff_batch1']:.3g} at "
                        f"batch 1 and {diffs['max_abs_diff_batch_max']:.3g} at batch {max_batch} > atol {atol:g}; "
                        "check for non-deterministic or training-mode layers (model.eval()) or raise --atol")
    return {**diffs, "atol": float(atol)}


def _build_manifest(name: str, cfg: GMIMConfig, source: dict, sha: str, max_batch: int, opset: int,
                    parity: dict) -> dict[str, Any]:
    import monai
    import onnx
    import onnxruntime

    c, k, win = cfg.in_channels, cfg.out_channels, [int(r) for r in cfg.roi_size]
    cfg_dict = cfg.to_dict()
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION, "name": name, "onnx_file": ONNX_FILE, "sha256": sha,
        "input": {"name": INPUT_NAME, "dtype": "float32", "shape": [-1, c, *win]},
        "output": {"name": OUTPUT_NAME, "dtype": "float32", "shape": [-1, k, *win]},
        "window_size": win, "max_batch_size": int(max_batch), "in_channels": c, "out_channels": k,
        "label_names": list(cfg.data.label_names), "multi_label": bool(cfg.data.multi_label),
        "data": cfg_dict["data"], "config": cfg_dict, "source": source, "opset": int(opset), "exporter": EXPORTER,
        "versions": {"torch": torch.__version__, "monai": monai.__version__, "onnx": onnx.__version__,
                     "onnxruntime": onnxruntime.__version__, "gmim_hub": __version__},
        "parity": parity,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


# ---------------------------------------------------------------------------------------------------- manifest
def load_manifest(path: str | Path) -> dict[str, Any]:
    """Read and validate `manifest.json` (or the export folder holding it): exactly `MANIFEST_KEYS`, this format."""
    path = Path(path)
    if path.is_dir():
        path = path / MANIFEST_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no ONNX export manifest at {path}; export one with `gmim export onnx MODEL`")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise WeightsError(f"{path} is not valid JSON ({e}); re-export with gmim export onnx") from e
    if not isinstance(data, dict):
        raise WeightsError(f"{path} must hold a JSON object, got {type(data).__name__}")
    missing = [k for k in MANIFEST_KEYS if k not in data]
    unknown = sorted(set(data) - set(MANIFEST_KEYS))
    if missing or unknown:
        raise WeightsError(f"{path} is not a gmim-hub ONNX manifest (missing keys: {', '.join(missing) or 'none'}; "
                           f"unknown keys: {', '.join(unknown) or 'none'}); re-export with gmim export onnx")
    if data["format"] != FORMAT or data["format_version"] != FORMAT_VERSION:
        raise WeightsError(f"{path} has format {data['format']!r} v{data['format_version']!r}; this gmim-hub reads "
                           f"{FORMAT!r} v{FORMAT_VERSION}: re-export with this version's gmim export onnx")
    return data


def verify_onnx_sha256(manifest: dict[str, Any], onnx_path: str | Path) -> str:
    """Raise `WeightsError` unless the file's sha256 is the manifest's; returns the digest."""
    actual = sha256_file(onnx_path)
    if actual != manifest["sha256"]:
        raise WeightsError(f"{onnx_path} has sha256 {actual[:16]}... but its manifest says "
                           f"{str(manifest['sha256'])[:16]}...: the file was modified after export; "
                           "re-export with gmim export onnx")
    return actual


# ---------------------------------------------------------------------------------------------- window runner
def select_providers(device: str | None = None, available: Sequence[str] | None = None) -> list[str]:
    """onnxruntime providers in preference order TensorRT, CUDA, CPU among those installed.

    `device="cpu"` forces CPU; `"cuda"` requires a GPU provider (onnxruntime-gpu installed); None takes the best.
    """
    if available is None:
        import onnxruntime

        available = onnxruntime.get_available_providers()
    if device not in (None, "cpu", "cuda"):
        raise ConfigError(f"device must be 'cpu', 'cuda' or None (auto), got {device!r}")
    if device == "cpu":
        return ["CPUExecutionProvider"]
    chosen = [p for p in PROVIDER_ORDER if p in available or p == "CPUExecutionProvider"]
    if device == "cuda" and chosen == ["CPUExecutionProvider"]:
        raise ConfigError(f"device 'cuda' needs onnxruntime's CUDA or TensorRT provider, but only "
                          f"{', '.join(available)} are installed; install onnxruntime-gpu (instead of onnxruntime, "
                          "never both) or use --device cpu")
    return chosen


class OnnxWindowModel:
    """An onnxruntime session for one exported window model: `model(x)` with x (B, C, D, H, W) float32 numpy ->
    logits (B, K, D, H, W) float32. Inputs are checked before onnxruntime sees them, because a wrong window size
    fails deep inside the graph with an unreadable Reshape error."""

    def __init__(self, onnx_path: str | Path, providers: Sequence[str] | None = None,
                 threads: int | None = None) -> None:
        import onnxruntime as ort

        self.onnx_path = Path(onnx_path)
        if not self.onnx_path.is_file():
            raise FileNotFoundError(f"no ONNX file at {self.onnx_path}; export one with `gmim export onnx MODEL`")
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = int(threads)
        opts.log_severity_level = 3  # errors only: the CUDA provider's fallback notice is not a failure here
        self.session = ort.InferenceSession(str(self.onnx_path), sess_options=opts,
                                            providers=list(providers or select_providers()))
        inp, out = self.session.get_inputs()[0], self.session.get_outputs()[0]
        shape = inp.shape
        if len(shape) != 5 or not all(isinstance(s, int) for s in shape[1:]):
            raise WeightsError(f"{self.onnx_path}: input {inp.name} has shape {shape}; expected (batch, C, D, H, W) "
                               "with fixed C, D, H, W: re-export with gmim export onnx")
        self.input_name, self.output_name = inp.name, out.name
        self.in_channels, self.window_size = int(shape[1]), tuple(int(s) for s in shape[2:])
        self.out_channels = int(out.shape[1]) if isinstance(out.shape[1], int) else None
        self.manifest: dict[str, Any] | None = None

    @classmethod
    def from_export(cls, path: str | Path, providers: Sequence[str] | None = None, threads: int | None = None,
                    verify: bool = True) -> OnnxWindowModel:
        """Open an export: its folder, its `model.onnx` or its `manifest.json`; checks the sha256 first."""
        path = Path(path)
        folder = path if path.is_dir() else path.parent
        manifest = load_manifest(folder / MANIFEST_FILE)
        onnx_path = path if path.suffix == ".onnx" else folder / manifest["onnx_file"]
        if verify:
            verify_onnx_sha256(manifest, onnx_path)
        runner = cls(onnx_path, providers=providers, threads=threads)
        runner.manifest = manifest
        return runner

    @property
    def providers(self) -> list[str]:
        return list(self.session.get_providers())

    def check_input(self, x: Any) -> None:
        """Raise `InputError` naming the problem and the fix for anything but (B, C, *window) float32."""
        if not isinstance(x, np.ndarray):
            raise InputError(f"expected a numpy array (B, C, D, H, W), got {type(x).__name__}")
        if x.dtype != np.float32:
            raise InputError(f"expected float32 input, got {x.dtype}; cast with x.astype(np.float32)")
        win = "x".join(map(str, self.window_size))
        if x.ndim != 5:
            raise InputError(f"expected input (B, {self.in_channels}, {', '.join(map(str, self.window_size))}), got "
                             f"shape {x.shape}; add the batch and channel axes")
        if x.shape[1] != self.in_channels:
            raise InputError(f"this ONNX model takes {self.in_channels} channel(s); got {x.shape[1]} "
                             f"(input shape {x.shape})")
        if tuple(x.shape[2:]) != self.window_size:
            got = "x".join(map(str, x.shape[2:]))
            raise InputError(f"this ONNX model was exported for windows of {win}; got {got}: use sliding-window "
                             "prediction (gmim predict) or re-export with --roi")
        if x.shape[0] < 1:
            raise InputError("empty batch: the input needs at least one window")

    def __call__(self, x: np.ndarray) -> np.ndarray:
        self.check_input(x)
        return self.session.run([self.output_name], {self.input_name: np.ascontiguousarray(x)})[0]
