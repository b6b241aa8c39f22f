"""Whole-volume prediction (`Predictor`), its window runners (PyTorch, onnxruntime, OpenVINO) and NIfTI input/output."""

from gmim_hub.inference.backends import OnnxBackend, TorchBackend, load_segmentation_model
from gmim_hub.inference.io import PredictionJob, load_nifti, plan_outputs
from gmim_hub.inference.openvino_backend import OpenVINOBackend
from gmim_hub.inference.predictor import PredictionResult, Predictor

__all__ = [
    "OnnxBackend", "OpenVINOBackend", "PredictionJob", "PredictionResult", "Predictor", "TorchBackend", "load_nifti",
    "load_segmentation_model", "plan_outputs",
]
