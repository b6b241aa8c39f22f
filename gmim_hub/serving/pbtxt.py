"""Triton `config.pbtxt` text for the three models of one export (see `repository.py`).

Dims never include the batch axis (Triton adds it when `max_batch_size` > 0). Parameter names of the TensorRT
accelerator are those of Triton's onnxruntime backend (`precision_mode`, `trt_engine_cache_enable`,
`trt_profile_min_shapes`, ...), which maps them onto the ORT TensorRT execution provider's options.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

WARMUP_NAME = "zeros_batch1"
MANIFEST_PARAMETER = "gmim_manifest"  # the export's manifest as JSON: clients read it with the model config


def dims(shape: Sequence[int]) -> str:
    return "[ " + ", ".join(str(int(d)) for d in shape) + " ]"


def _io(direction: str, name: str, dtype: str, shape: Sequence[int]) -> str:
    return f'{direction} [\n  {{\n    name: "{name}"\n    data_type: {dtype}\n    dims: {dims(shape)}\n  }}\n]\n'


def _window_io(manifest: dict[str, Any]) -> str:
    return (_io("input", "image", "TYPE_FP32", manifest["input"]["shape"][1:])
            + _io("output", "logits", "TYPE_FP32", manifest["output"]["shape"][1:]))


def _dynamic_batching(max_batch: int, delay_us: int) -> str:
    preferred = sorted({b for b in (max_batch // 2, max_batch) if b >= 1})
    return (f"dynamic_batching {{\n  preferred_batch_size: {dims(preferred)}\n"
            f"  max_queue_delay_microseconds: {delay_us}\n}}\n")


def _parameters(values: dict[str, str]) -> str:
    from google.protobuf import text_encoding

    escaped = {k: text_encoding.CEscape(v, as_utf8=True) for k, v in values.items()}
    return "".join(f'parameters {{\n  key: "{k}"\n  value: {{ string_value: "{v}" }}\n}}\n' for k, v in escaped.items())


def _manifest(manifest: dict[str, Any]) -> str:
    return _parameters({MANIFEST_PARAMETER: json.dumps(manifest, ensure_ascii=False, separators=(",", ":"))})


def _tensorrt(manifest: dict[str, Any], max_batch: int, cache_dir: str) -> str:
    item = "x".join(str(int(d)) for d in manifest["input"]["shape"][1:])
    params = {
        "precision_mode": "FP16",
        "trt_layer_norm_fp32_fallback": "1",  # layer norm in fp16 overflows on Swin's attention blocks
        "max_workspace_size_bytes": str(4 << 30),
        "trt_engine_cache_enable": "1",
        "trt_engine_cache_path": cache_dir,
        "trt_timing_cache_enable": "1",
        "trt_timing_cache_path": cache_dir,
        "trt_profile_min_shapes": f"image:1x{item}",
        "trt_profile_opt_shapes": f"image:{max_batch}x{item}",
        "trt_profile_max_shapes": f"image:{max_batch}x{item}",
    }
    body = "".join(f'        parameters {{ key: "{k}" value: "{v}" }}\n' for k, v in params.items())
    return ("optimization {\n  execution_accelerators {\n    gpu_execution_accelerator: [\n      {\n"
            f'        name: "tensorrt"\n{body}      }}\n    ]\n  }}\n}}\n')


def gpu_config(
    manifest: dict[str, Any], name: str, max_batch: int, instance_count: int, tensorrt: bool, trt_cache_dir: str
) -> str:
    """The window model for NVIDIA's Triton container on a GPU host (onnxruntime backend, CUDA or TensorRT)."""
    warmup = (f'model_warmup [\n  {{\n    name: "{WARMUP_NAME}"\n    batch_size: 1\n    inputs {{\n      key: "image"\n'
              f"      value: {{\n        data_type: TYPE_FP32\n        dims: {dims(manifest['input']['shape'][1:])}\n"
              "        zero_data: true\n      }\n    }\n  }\n]\n")
    text = (f'name: "{name}"\nplatform: "onnxruntime_onnx"\ndefault_model_filename: "model.onnx"\n'
            f"max_batch_size: {max_batch}\n" + _window_io(manifest)
            + f"instance_group [\n  {{\n    kind: KIND_GPU\n    count: {instance_count}\n  }}\n]\n"
            + _dynamic_batching(max_batch, 1000) + warmup + _manifest(manifest))
    return text + (_tensorrt(manifest, max_batch, trt_cache_dir) if tensorrt else "")


def cpu_config(manifest: dict[str, Any], name: str, max_batch: int, instance_count: int) -> str:
    """The window model in the python backend (onnxruntime on the CPU); for CPU hosts and tests."""
    return (f'name: "{name}"\nbackend: "python"\nmax_batch_size: {max_batch}\n' + _window_io(manifest)
            + f"instance_group [\n  {{\n    kind: KIND_CPU\n    count: {instance_count}\n  }}\n]\n"
            + _dynamic_batching(max_batch, 5000)
            + _parameters({"intra_op_num_threads": "0"})  # 0: onnxruntime uses every core
            + _manifest(manifest))


def volume_config(manifest: dict[str, Any], name: str, window_model: str, sw_batch_size: int) -> str:
    """Whole-volume model: (C, X, Y, Z) float32 in, uint8 labels out ((X, Y, Z), or (K, X, Y, Z) multi-label), and
    the same labels bit-packed (`labels_packed`, 1-D)."""
    labels = [int(manifest["out_channels"]), -1, -1, -1] if manifest.get("multi_label") else [-1, -1, -1]
    return (f'name: "{name}"\nbackend: "python"\nmax_batch_size: 0\n'
            + _io("input", "image", "TYPE_FP32", [int(manifest["in_channels"]), -1, -1, -1])
            + _io("output", "labels", "TYPE_UINT8", labels)
            + _io("output", "labels_packed", "TYPE_UINT8", [-1])
            + "instance_group [\n  {\n    kind: KIND_CPU\n    count: 1\n  }\n]\n"
            + _parameters({"window_model": window_model, "overlap": "0.5", "sw_batch_size": str(sw_batch_size),
                           "sigma_scale": "0.125", "max_voxels": str(512**3)})
            + _manifest(manifest))
