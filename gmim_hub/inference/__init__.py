"""Whole-volume prediction (`Predictor`), its window runners (PyTorch, onnxruntime) and file input/output
(NIfTI, NRRD, MetaImage, DICOM series in and DICOM SEG out: `gmim_hub.inference.formats`)."""

from gmim_hub.inference.backends import OnnxBackend, TorchBackend, load_segmentation_model
from gmim_hub.inference.io import PredictionJob, load_nifti, load_volume, plan_outputs
from gmim_hub.inference.predictor import PredictionResult, Predictor

__all__ = [
    "OnnxBackend", "PredictionJob", "PredictionResult", "Predictor", "TorchBackend", "load_nifti",
    "load_segmentation_model", "load_volume", "plan_outputs",
]
