"""Deployment exports: ONNX (`gmim_hub.export.onnx`); the Triton model repository builds on its manifest."""

from gmim_hub.export.onnx import (
    MANIFEST_KEYS,
    ExportResult,
    OnnxWindowModel,
    export_onnx,
    load_manifest,
    select_providers,
    sha256_file,
    verify_onnx_sha256,
)

__all__ = [
    "MANIFEST_KEYS", "ExportResult", "OnnxWindowModel", "export_onnx", "load_manifest", "select_providers",
    "sha256_file", "verify_onnx_sha256",
]
