"""Triton serving: the model repository (`repository`), a CPU-only server from the nvidia-pytriton binary
(`server`) running in its own Python environment (`env`), and the client behind `gmim infer` (`client`, `infer`).
Imports are lazy: tritonclient is the `serve` extra; the server's packages live in that environment only."""

from __future__ import annotations

from typing import Any

__all__ = [
    "InferReport", "ModelSpec", "TritonClient", "TritonServer", "infer_files", "serve", "validate_gpu_config",
    "validate_openvino_config", "write_triton_repository",
]

_WHERE = {
    "write_triton_repository": "repository", "validate_gpu_config": "validate",
    "validate_openvino_config": "validate", "TritonServer": "server",
    "serve": "server", "TritonClient": "client", "ModelSpec": "client", "infer_files": "infer", "InferReport": "infer",
}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(f"gmim_hub.serving.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'gmim_hub.serving' has no attribute {name!r}")
