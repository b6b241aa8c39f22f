"""Write a Triton model repository for one ONNX export, and validate the GPU config without a GPU.

For an export `export/<name>/` (model.onnx + manifest.json) it writes three models:

- `<name>`: `platform: "onnxruntime_onnx"` with KIND_GPU instances, dynamic batching, a warm-up sample and
  optionally the TensorRT execution accelerator. It is meant for NVIDIA's Triton container on a GPU host; the
  CPU-only server of `gmim serve` has only the python backend, so it is never loaded here (`gmim serve` loads
  python-backend models only, with explicit model control) and is checked by `validate_gpu_config` instead.
- `<name>_cpu`: the same window model in the python backend, running OpenVINO (default; bf16 where the CPU
  supports it) or onnxruntime on the CPU.
- `<name>_volume`: a python-backend model that stitches a whole volume on the server, calling a window model.
- with `openvino_model`: `<name>_openvino`, the window model for Triton's own `openvino` backend (the CPU backend
  of NVIDIA's container), as OpenVINO IR (`model.xml` + `model.bin`, converted here from the verified ONNX file
  with fp32 weights). The server of `gmim serve` has no openvino backend, so it is never loaded here.

The manifest is copied into each version folder; the python-backend models check the ONNX sha256 on load.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path
from typing import Any

from gmim_hub.atomic import atomic_write, write_text
from gmim_hub.errors import ServingError
from gmim_hub.inference import openvino_runtime
from gmim_hub.serving import pbtxt
from gmim_hub.serving.validate import check_export

log = logging.getLogger(__name__)

BACKEND_DIR = Path(__file__).parent / "backend"
OPENVINO_RUNTIME = Path(openvino_runtime.__file__)  # shared with the in-process OpenVINO backend
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def write_triton_repository(
    export_dir: str | Path,
    repo_dir: str | Path = Path("triton_models"),
    *,
    name: str | None = None,
    tensorrt: bool = False,
    max_batch: int | None = None,
    instance_count: int = 1,
    trt_cache_dir: str = "/tmp/gmim_trt_cache",
    cpu_runtime: str = "openvino",
    cpu_precision: str = "auto",
    threads: int = 0,
    openvino_model: bool = False,
    openvino_bf16: bool = False,
) -> list[Path]:
    """Write `<name>`, `<name>_cpu` and `<name>_volume` under `repo_dir` (replacing earlier versions of them), and
    `<name>_openvino` with `openvino_model` (`openvino_bf16`: its HINT_BF16 parameter).

    `cpu_runtime` ("openvino" or "onnxruntime"), `cpu_precision` ("auto": bf16 where the serving CPU supports it)
    and `threads` (0: the runtime's default) go into `<name>_cpu`'s parameters; `threads` also into the OpenVINO
    backend model's.

    `export_dir` holds `model.onnx` and `manifest.json` from `gmim export onnx`; the ONNX file must match the
    manifest's sha256. `max_batch` defaults to the manifest's `max_batch_size` (the largest batch whose parity was
    checked at export). Returns the written files.
    """
    manifest, onnx_path = check_export(Path(export_dir))
    name = name or str(manifest["name"])
    if not _NAME.match(name):
        raise ServingError(f"model name {name!r} must be letters, digits, '_', '.' or '-'; pass --name")
    max_batch = int(manifest["max_batch_size"]) if max_batch is None else max_batch
    if max_batch < 1:
        raise ServingError(f"max_batch must be >= 1, got {max_batch}")
    if max_batch > int(manifest["max_batch_size"]):
        log.warning("max_batch %d is larger than the batch %s checked at export", max_batch, manifest["max_batch_size"])
    if instance_count < 1:
        raise ServingError(f"instance_count must be >= 1, got {instance_count}")
    repo = Path(repo_dir)
    models = [
        (name, "gpu", pbtxt.gpu_config(manifest, name, max_batch, instance_count, tensorrt, f"{trt_cache_dir}/{name}")),
        (f"{name}_cpu", "cpu", pbtxt.cpu_config(manifest, f"{name}_cpu", max_batch, instance_count,
                                                runtime=cpu_runtime, precision=cpu_precision, threads=threads)),
        (f"{name}_volume", "volume", pbtxt.volume_config(manifest, f"{name}_volume", f"{name}_cpu", max_batch)),
    ]
    if openvino_model:
        _require_openvino()
        models.append((f"{name}_openvino", "openvino", pbtxt.openvino_config(
            manifest, f"{name}_openvino", max_batch, instance_count, bf16=openvino_bf16, threads=threads)))
    written: list[Path] = []
    for model, kind, text in models:
        written += _write_model(repo / model, kind, text, manifest, onnx_path)
    log.info("wrote Triton models %s under %s", ", ".join(m[0] for m in models), repo)
    return written


_SOURCES = {"gpu": {}, "openvino": {}, "cpu": {"model.py": "window_model.py", "gmim_openvino.py": OPENVINO_RUNTIME},
            "volume": {"model.py": "volume_model.py", "gmim_sliding.py": "sliding.py"}}
IR_FILES = ("model.xml", "model.bin")  # the file names Triton's openvino backend reads by default


def _require_openvino() -> None:
    import importlib.util

    if importlib.util.find_spec("openvino") is None:
        raise ServingError("the openvino backend model is converted with the openvino package: pip install openvino "
                           "(or gmim-hub[cpu]), or leave out --openvino")


def write_openvino_ir(onnx_path: Path, version_dir: Path) -> list[Path]:
    """Convert the ONNX file to OpenVINO IR in `version_dir` (model.xml + model.bin, weights kept fp32), both files
    written beside their final names first and then moved into place."""
    import tempfile

    import openvino as ov

    with tempfile.TemporaryDirectory(dir=version_dir, prefix=".ir-") as tmp:
        # read_model, as the in-process backend does: convert_model's shape transformations fail on this graph
        ov.save_model(ov.Core().read_model(str(onnx_path)), str(Path(tmp) / IR_FILES[0]), compress_to_fp16=False)
        for f in IR_FILES:
            (Path(tmp) / f).replace(version_dir / f)
    return [version_dir / f for f in IR_FILES]


def _write_model(model_dir: Path, kind: str, config: str, manifest: dict[str, Any], onnx_path: Path) -> list[Path]:
    """One model folder: config.pbtxt, and 1/ with the manifest and the model's files."""
    if model_dir.exists():
        shutil.rmtree(model_dir)
    version = model_dir / "1"
    version.mkdir(parents=True)
    files = [write_text(model_dir / "config.pbtxt", config),
             write_text(version / "manifest.json", json.dumps(manifest, indent=2) + "\n")]
    copies = {version / dest: BACKEND_DIR / src for dest, src in _SOURCES[kind].items()}  # an absolute src stays
    if kind in ("gpu", "cpu"):
        copies[version / "model.onnx"] = onnx_path
    for dest, src in copies.items():
        with atomic_write(dest) as tmp:
            shutil.copyfile(src, tmp)
        files.append(dest)
    if kind == "openvino":
        files += write_openvino_ir(onnx_path, version)
    return files
