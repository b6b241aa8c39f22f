"""Triton `config.pbtxt` for the models of one export (see `repository.py`), built as Triton's own
`model_config_pb2.ModelConfig` message (tritonclient's copy of the schema) and written with
`google.protobuf.text_format`, so a field name, enum value or nesting the schema does not have cannot be written.

Dims never include the batch axis (Triton adds it when `max_batch_size` > 0). Parameter names of the TensorRT
accelerator are those of Triton's onnxruntime backend (`precision_mode`, `trt_engine_cache_enable`,
`trt_profile_min_shapes`, ...), which maps them onto the ORT TensorRT execution provider's options. Those of the
`openvino` backend model are that backend's (`PERFORMANCE_HINT`, `NUM_STREAMS`, `INFERENCE_NUM_THREADS`,
`HINT_BF16`, `ENABLE_BATCH_PADDING`); it ignores parameters it does not know, such as `gmim_manifest`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from gmim_hub.errors import ServingError

WARMUP_NAME = "zeros_batch1"
MANIFEST_PARAMETER = "gmim_manifest"  # the export's manifest as JSON: clients read it with the model config
CPU_RUNTIMES = ("openvino", "onnxruntime")
CPU_PRECISIONS = ("auto", "bf16", "fp32")


def _schema() -> Any:
    try:
        from tritonclient.grpc import model_config_pb2
    except ImportError as e:
        raise ServingError("writing Triton model configs needs tritonclient: pip install 'gmim-hub[serve]' "
                           "(or pip install 'tritonclient[grpc]')") from e
    return model_config_pb2


def to_text(config: Any) -> str:
    """The message as config.pbtxt text (repeated numbers on one line, non-ASCII kept readable)."""
    from google.protobuf import text_format

    return str(text_format.MessageToString(config, as_utf8=True, use_short_repeated_primitives=True))


def _new(name: str, max_batch: int, **fields: str) -> Any:
    return _schema().ModelConfig(name=name, max_batch_size=max_batch, **fields)


def _tensor(tensors: Any, name: str, dtype: str, shape: Sequence[int]) -> None:
    pb = _schema()
    tensors.add(name=name, data_type=pb.DataType.Value(dtype), dims=[int(d) for d in shape])


def _window_io(config: Any, manifest: dict[str, Any]) -> None:
    _tensor(config.input, "image", "TYPE_FP32", manifest["input"]["shape"][1:])
    _tensor(config.output, "logits", "TYPE_FP32", manifest["output"]["shape"][1:])


def _instances(config: Any, kind: str, count: int) -> None:
    pb = _schema()
    config.instance_group.add(kind=pb.ModelInstanceGroup.Kind.Value(kind), count=count)


def _dynamic_batching(config: Any, max_batch: int, delay_us: int) -> None:
    config.dynamic_batching.preferred_batch_size.extend(sorted({b for b in (max_batch // 2, max_batch) if b >= 1}))
    config.dynamic_batching.max_queue_delay_microseconds = delay_us


def _parameters(config: Any, values: dict[str, str]) -> None:
    for key, value in values.items():
        config.parameters[key].string_value = value


def _manifest(config: Any, manifest: dict[str, Any]) -> None:
    _parameters(config, {MANIFEST_PARAMETER: json.dumps(manifest, ensure_ascii=False, separators=(",", ":"))})


def _tensorrt(config: Any, manifest: dict[str, Any], max_batch: int, cache_dir: str) -> None:
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
    accelerator = config.optimization.execution_accelerators.gpu_execution_accelerator.add(name="tensorrt")
    accelerator.parameters.update(params)


def gpu_config(
    manifest: dict[str, Any], name: str, max_batch: int, instance_count: int, tensorrt: bool, trt_cache_dir: str
) -> str:
    """The window model for NVIDIA's Triton container on a GPU host (onnxruntime backend, CUDA or TensorRT)."""
    config = _new(name, max_batch, platform="onnxruntime_onnx", default_model_filename="model.onnx")
    _window_io(config, manifest)
    _instances(config, "KIND_GPU", instance_count)
    _dynamic_batching(config, max_batch, 1000)
    warmup = config.model_warmup.add(name=WARMUP_NAME, batch_size=1)
    sample = warmup.inputs["image"]
    sample.data_type = _schema().DataType.Value("TYPE_FP32")
    sample.dims.extend(int(d) for d in manifest["input"]["shape"][1:])
    sample.zero_data = True
    _manifest(config, manifest)
    if tensorrt:
        _tensorrt(config, manifest, max_batch, trt_cache_dir)
    return to_text(config)


def _cpu_window_model(manifest: dict[str, Any], name: str, max_batch: int, instance_count: int, threads: int, *,
                      backend: str) -> Any:
    """What both CPU window models share: the window tensors, CPU instances and dynamic batching (5 ms queue)."""
    if threads < 0:
        raise ServingError(f"threads must be >= 0 (0: every core), got {threads}")
    config = _new(name, max_batch, backend=backend)
    _window_io(config, manifest)
    _instances(config, "KIND_CPU", instance_count)
    _dynamic_batching(config, max_batch, 5000)
    return config


def cpu_config(manifest: dict[str, Any], name: str, max_batch: int, instance_count: int, *,
               runtime: str = "openvino", precision: str = "auto", threads: int = 0) -> str:
    """The window model in the python backend on the CPU: OpenVINO (bf16 where the CPU supports it with precision
    "auto") or onnxruntime (fp32); threads 0: the runtime's default (every core); for CPU hosts and tests."""
    if runtime not in CPU_RUNTIMES:
        raise ServingError(f"cpu runtime must be one of {', '.join(CPU_RUNTIMES)}, got {runtime!r}")
    if precision not in CPU_PRECISIONS:
        raise ServingError(f"cpu precision must be one of {', '.join(CPU_PRECISIONS)}, got {precision!r}")
    if runtime == "onnxruntime" and precision == "bf16":
        raise ServingError("precision bf16 needs runtime openvino; onnxruntime runs fp32 (use precision auto or fp32)")
    config = _cpu_window_model(manifest, name, max_batch, instance_count, threads, backend="python")
    _parameters(config, {"runtime": runtime, "precision": precision, "threads": str(threads), "cache_dir": ""})
    _manifest(config, manifest)
    return to_text(config)


def openvino_config(manifest: dict[str, Any], name: str, max_batch: int, instance_count: int, *,
                    bf16: bool = False, threads: int = 0) -> str:
    """The window model for Triton's own `openvino` backend (the CPU backend of NVIDIA's container), reading the
    OpenVINO IR `1/model.xml` + `1/model.bin` (the backend's default file name). That backend refuses a batch
    smaller than `max_batch_size` unless ENABLE_BATCH_PADDING is set, so it is set (single windows are padded).
    `bf16`: HINT_BF16 (only for hosts whose CPU has native bf16; OpenVINO already picks bf16 by default on some)."""
    config = _cpu_window_model(manifest, name, max_batch, instance_count, threads, backend="openvino")
    params = {"PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": "1", "ENABLE_BATCH_PADDING": "YES"}
    if threads:
        params["INFERENCE_NUM_THREADS"] = str(threads)
    if bf16:
        params["HINT_BF16"] = "YES"
    _parameters(config, params)
    _manifest(config, manifest)
    return to_text(config)


def volume_config(manifest: dict[str, Any], name: str, window_model: str, sw_batch_size: int) -> str:
    """Whole-volume model: (C, X, Y, Z) float32 in, uint8 labels out ((X, Y, Z), or (K, X, Y, Z) multi-label), and
    the same labels bit-packed (`labels_packed`, 1-D)."""
    labels = [int(manifest["out_channels"]), -1, -1, -1] if manifest.get("multi_label") else [-1, -1, -1]
    config = _new(name, 0, backend="python")
    _tensor(config.input, "image", "TYPE_FP32", [int(manifest["in_channels"]), -1, -1, -1])
    _tensor(config.output, "labels", "TYPE_UINT8", labels)
    _tensor(config.output, "labels_packed", "TYPE_UINT8", [-1])
    _instances(config, "KIND_CPU", 1)
    _parameters(config, {"window_model": window_model, "overlap": "0.5", "sw_batch_size": str(sw_batch_size),
                         "sigma_scale": "0.125", "max_voxels": str(512**3)})
    _manifest(config, manifest)
    return to_text(config)
