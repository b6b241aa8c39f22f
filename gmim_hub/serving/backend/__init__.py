"""Sources copied into the Triton model repository (python backend). They import only numpy, openvino or
onnxruntime and Triton's `triton_python_backend_utils` (and `sliding`, numpy only), so the server's Python needs
no gmim-hub, torch or MONAI. `repository.py` copies the files, and also `gmim_hub/inference/openvino_runtime.py`
(openvino only), which the in-process OpenVINO backend imports too, so both compile the same way.
"""
