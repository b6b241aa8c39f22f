"""Sources copied into the Triton model repository (python backend). They import only numpy, openvino or
onnxruntime and Triton's `triton_python_backend_utils` (and `sliding`, numpy only; `openvino_runtime`, openvino
only), so the server's Python needs no gmim-hub, torch or MONAI. `repository.py` copies the files; of the library,
only the in-process OpenVINO backend imports one of them (`openvino_runtime`), so both compile the same way.
"""
