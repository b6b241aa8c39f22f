"""Sources copied into the Triton model repository (python backend). They import only numpy, onnxruntime and
Triton's `triton_python_backend_utils` (and `sliding`, numpy only), so the server's Python needs no gmim-hub, torch
or MONAI. Nothing here is imported by the library at run time; `repository.py` copies the files.
"""
