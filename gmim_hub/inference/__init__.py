"""Whole-volume prediction (`Predictor`), its window runners (PyTorch, onnxruntime, OpenVINO) and file input/output
(NIfTI, NRRD, MetaImage, DICOM series in and DICOM SEG out: `gmim_hub.inference.formats`).

Imports are lazy: `Predictor` needs MONAI (~10 s to import), which `gmim_hub.inference.io` alone does not."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gmim_hub.inference.backends import OnnxBackend, TorchBackend, load_segmentation_model
    from gmim_hub.inference.io import PredictionJob, load_nifti, load_volume, plan_outputs
    from gmim_hub.inference.openvino_backend import OpenVINOBackend
    from gmim_hub.inference.predictor import PredictionResult, Predictor

__all__ = [
    "OnnxBackend", "OpenVINOBackend", "PredictionJob", "PredictionResult", "Predictor", "TorchBackend", "load_nifti",
    "load_segmentation_model", "load_volume", "plan_outputs",
]

_WHERE = {"OnnxBackend": "backends", "TorchBackend": "backends", "load_segmentation_model": "backends",
          "PredictionJob": "io", "load_nifti": "io", "load_volume": "io", "plan_outputs": "io",
          "PredictionResult": "predictor", "Predictor": "predictor", "OpenVINOBackend": "openvino_backend"}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(f"gmim_hub.inference.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'gmim_hub.inference' has no attribute {name!r}")
