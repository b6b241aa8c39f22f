"""Write a Triton model repository for one ONNX export, and validate the GPU config without a GPU.

For an export `export/<name>/` (model.onnx + manifest.json) it writes three models:

- `<name>`: `platform: "onnxruntime_onnx"` with KIND_GPU instances, dynamic batching, a warm-up sample and
  optionally the TensorRT execution accelerator. It is meant for NVIDIA's Triton container on a GPU host; the
  CPU-only server of `gmim serve` has only the python backend, so it is never loaded here (`gmim serve` loads
  python-backend models only, with explicit model control) and is checked by `validate_gpu_config` instead.
- `<name>_cpu`: the same window model in the python backend, running onnxruntime on the CPU.
- `<name>_volume`: a python-backend model that stitches a whole volume on the server, calling a window model.

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
from gmim_hub.serving import pbtxt
from gmim_hub.serving.validate import check_export

log = logging.getLogger(__name__)

BACKEND_DIR = Path(__file__).parent / "backend"
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
) -> list[Path]:
    """Write `<name>`, `<name>_cpu` and `<name>_volume` under `repo_dir` (replacing earlier versions of them).

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
        (f"{name}_cpu", "cpu", pbtxt.cpu_config(manifest, f"{name}_cpu", max_batch, instance_count)),
        (f"{name}_volume", "volume", pbtxt.volume_config(manifest, f"{name}_volume", f"{name}_cpu", max_batch)),
    ]
    written: list[Path] = []
    for model, kind, text in models:
        written += _write_model(repo / model, kind, text, manifest, onnx_path)
    log.info("wrote Triton models %s under %s", ", ".join(m[0] for m in models), repo)
    return written


_SOURCES = {"gpu": {}, "cpu": {"model.py": "window_model.py"},
            "volume": {"model.py": "volume_model.py", "gmim_sliding.py": "sliding.py"}}


def _write_model(model_dir: Path, kind: str, config: str, manifest: dict[str, Any], onnx_path: Path) -> list[Path]:
    """One model folder: config.pbtxt, and 1/ with the manifest and the model's files."""
    if model_dir.exists():
        shutil.rmtree(model_dir)
    version = model_dir / "1"
    version.mkdir(parents=True)
    files = [write_text(model_dir / "config.pbtxt", config),
             write_text(version / "manifest.json", json.dumps(manifest, indent=2) + "\n")]
    copies = {version / dest: BACKEND_DIR / src for dest, src in _SOURCES[kind].items()}
    if kind != "volume":
        copies[version / "model.onnx"] = onnx_path
    for dest, src in copies.items():
        with atomic_write(dest) as tmp:
            shutil.copyfile(src, tmp)
        files.append(dest)
    return files
