"""Triton serving: the model repository (`repository`), a CPU-only server from the nvidia-pytriton binary
(`server`) running in its own Python environment (`env`), and the client behind `gmim infer` (`client`, `infer`).
Server and client imports are lazy: tritonclient is the `serve` extra; the server's packages live in that environment only."""

from __future__ import annotations

from typing import Any

from gmim_hub.serving.repository import write_triton_repository
from gmim_hub.serving.validate import validate_gpu_config, validate_openvino_config

__all__ = [
    "InferReport", "ModelSpec", "TritonClient", "TritonServer", "infer_files", "serve", "validate_gpu_config",
    "validate_openvino_config", "write_triton_repository",
]

_WHERE = {
    "TritonServer": "server",
    "serve": "server", "TritonClient": "client", "ModelSpec": "client", "infer_files": "infer", "InferReport": "infer",
}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(f"gmim_hub.serving.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'gmim_hub.serving' has no attribute {name!r}")
