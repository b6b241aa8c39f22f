"""Checks on what goes into, and comes out of, a Triton model repository: the export's integrity and the GPU
window model's config against the ONNX graph. The GPU config cannot be loaded without NVIDIA's container and a
GPU, so it is parsed with Triton's own protobuf schema (`tritonclient.grpc.model_config_pb2`) and compared with
the graph's inputs and outputs, which catches the mistakes a GPU host would only report at load time.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gmim_hub.atomic import sha256_file
from gmim_hub.errors import ServingError
from gmim_hub.serving.pbtxt import MANIFEST_PARAMETER

# ONNX TensorProto element types -> Triton model_config DataType names
_ONNX_TO_TRITON = {1: "TYPE_FP32", 2: "TYPE_UINT8", 6: "TYPE_INT32", 7: "TYPE_INT64", 9: "TYPE_BOOL",
                   10: "TYPE_FP16", 11: "TYPE_FP64", 16: "TYPE_BF16"}


def check_export(export_dir: Path) -> tuple[dict[str, Any], Path]:
    """(manifest, onnx path) of an export folder whose ONNX file matches the manifest's sha256."""
    from gmim_hub.export.onnx import load_manifest, verify_onnx_sha256

    manifest = load_manifest(export_dir)  # FileNotFoundError naming `gmim export onnx` when absent
    onnx_path = export_dir / str(manifest["onnx_file"])
    if not onnx_path.is_file():
        raise ServingError(f"{onnx_path} not found; re-run `gmim export onnx`")
    verify_onnx_sha256(manifest, onnx_path)
    return manifest, onnx_path


def parse_model_config(config_path: str | Path) -> Any:
    """Parse a config.pbtxt into `tritonclient.grpc.model_config_pb2.ModelConfig` (ServingError if invalid)."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    try:
        return text_format.Parse(Path(config_path).read_text(), model_config_pb2.ModelConfig())
    except text_format.ParseError as e:
        raise ServingError(f"{config_path} is not a valid Triton model config: {e}") from e


def onnx_signature(onnx_path: str | Path) -> tuple[dict[str, tuple[str, list[int]]], dict[str, tuple[str, list[int]]]]:
    """Graph inputs and outputs as {name: (Triton data type, dims with -1 for symbolic axes)}."""
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    initializers = {t.name for t in graph.initializer}

    def describe(values: Any) -> dict[str, tuple[str, list[int]]]:
        out = {}
        for v in values:
            if v.name in initializers:
                continue
            t = v.type.tensor_type
            shape = [d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim]
            out[v.name] = (_ONNX_TO_TRITON.get(t.elem_type, f"onnx type {t.elem_type}"), shape)
        return out

    return describe(graph.input), describe(graph.output)


def _compare(kind: str, tensors: Any, graph: dict[str, tuple[str, list[int]]], max_batch: int) -> list[str]:
    from tritonclient.grpc import model_config_pb2

    names = [t.name for t in tensors]
    if sorted(names) != sorted(graph):
        return [f"{kind} names {names} differ from the ONNX graph's {sorted(graph)}"]
    problems = []
    for t in tensors:
        dtype, shape = graph[t.name]
        declared = model_config_pb2.DataType.Name(t.data_type)
        if declared != dtype:
            problems.append(f"{kind} {t.name!r} is {declared}, the graph has {dtype}")
        if list(t.dims) != shape[1:]:
            problems.append(f"{kind} {t.name!r} dims {list(t.dims)} differ from the graph's {shape[1:]} "
                            "(batch axis removed)")
        if shape and shape[0] != -1 and shape[0] < max_batch:
            problems.append(f"{kind} {t.name!r} has a fixed batch {shape[0]} < max_batch_size {max_batch}")
    return problems


def _check_tensorrt(cfg: Any, item_dims: list[int]) -> list[str]:
    problems = []
    for acc in cfg.optimization.execution_accelerators.gpu_execution_accelerator:
        if acc.name != "tensorrt":
            continue
        for key, batch in (("trt_profile_min_shapes", 1), ("trt_profile_max_shapes", cfg.max_batch_size)):
            want = "image:" + "x".join(str(d) for d in [batch, *item_dims])
            if acc.parameters.get(key) != want:
                problems.append(f"tensorrt {key} is {acc.parameters.get(key)!r}, expected {want!r}")
    return problems


def _check_embedded_manifest(cfg: Any, onnx_path: str | Path) -> list[str]:
    """The manifest in the config's parameters must describe this very ONNX file (same sha256)."""
    import json


    if MANIFEST_PARAMETER not in cfg.parameters:
        return [f"parameter {MANIFEST_PARAMETER!r} (the export's manifest) is missing"]
    manifest = json.loads(cfg.parameters[MANIFEST_PARAMETER].string_value)
    actual = sha256_file(onnx_path)
    if manifest.get("sha256") != actual:
        return [f"the ONNX file's sha256 {actual[:16]}... is not the manifest's {str(manifest.get('sha256'))[:16]}... "
                "(file modified after export; re-run gmim export onnx and gmim export triton)"]
    return []


def validate_gpu_config(config_path: str | Path, onnx_path: str | Path) -> Any:
    """Parse the GPU window model's config.pbtxt and check it against the ONNX graph: platform, input and output
    names, data types, dims without the batch axis, a batch axis able to hold `max_batch_size`, GPU instances, the
    warm-up sample's dims and the TensorRT profile shapes. Returns the parsed `ModelConfig`."""

    cfg = parse_model_config(config_path)
    problems = _check_embedded_manifest(cfg, onnx_path)
    if problems:  # a modified file: comparing its graph would only add noise
        raise ServingError(f"{config_path} does not match {onnx_path}: " + "; ".join(problems))
    try:
        inputs, outputs = onnx_signature(onnx_path)
    except Exception as e:  # onnx raises DecodeError, OSError, ...
        raise ServingError(f"{onnx_path} is not a readable ONNX file ({type(e).__name__}); re-export it") from e
    if cfg.platform != "onnxruntime_onnx" and cfg.backend != "onnxruntime":
        problems.append(f"platform is {cfg.platform or cfg.backend!r}, expected 'onnxruntime_onnx'")
    if cfg.max_batch_size < 1:
        problems.append(f"max_batch_size must be >= 1 for a batched window model, got {cfg.max_batch_size}")
    problems += _compare("input", cfg.input, inputs, cfg.max_batch_size)
    problems += _compare("output", cfg.output, outputs, cfg.max_batch_size)
    problems += _instance_kind(cfg, "KIND_GPU")
    item_dims = list(cfg.input[0].dims) if cfg.input else []
    for w in cfg.model_warmup:
        for key, value in w.inputs.items():
            if key in inputs and list(value.dims) != inputs[key][1][1:]:
                problems.append(f"model_warmup {w.name!r} dims {list(value.dims)} differ from the graph's input")
    problems += _check_tensorrt(cfg, item_dims)
    if problems:
        raise ServingError(f"{config_path} does not match {onnx_path}: " + "; ".join(problems))
    return cfg


def _instance_kind(cfg: Any, kind: str) -> list[str]:
    """A problem unless every instance group of `cfg` has `kind` (e.g. "KIND_GPU")."""
    from tritonclient.grpc import model_config_pb2

    wanted = model_config_pb2.ModelInstanceGroup.Kind.Value(kind)
    if not cfg.instance_group or any(g.kind != wanted for g in cfg.instance_group):
        return [f"instance_group must be {kind}"]
    return []


def validate_openvino_config(model_dir: str | Path, onnx_path: str | Path) -> Any:
    """Check `<name>_openvino` (Triton's openvino backend) without that backend: the config parses with Triton's
    schema and matches the ONNX graph (backend, names, types, dims, CPU instances, batch padding), the IR files are
    where the backend looks (`1/model.xml`, `1/model.bin`), and OpenVINO reads them with the graph's input and
    output names. Returns the parsed `ModelConfig`."""

    model_dir = Path(model_dir)
    config_path = model_dir / "config.pbtxt"
    cfg = parse_model_config(config_path)
    problems = _check_embedded_manifest(cfg, onnx_path)
    if problems:
        raise ServingError(f"{config_path} does not match {onnx_path}: " + "; ".join(problems))
    inputs, outputs = onnx_signature(onnx_path)
    if cfg.backend != "openvino" or cfg.platform:
        problems.append(f"backend is {cfg.backend or cfg.platform!r}, expected 'openvino'")
    problems += _compare("input", cfg.input, inputs, cfg.max_batch_size)
    problems += _compare("output", cfg.output, outputs, cfg.max_batch_size)
    problems += _instance_kind(cfg, "KIND_CPU")
    if cfg.max_batch_size > 1 and cfg.parameters["ENABLE_BATCH_PADDING"].string_value.upper() != "YES":
        problems.append("ENABLE_BATCH_PADDING must be YES (the backend refuses batches below max_batch_size)")
    name = cfg.default_model_filename or "model.xml"
    ir = [model_dir / "1" / name, model_dir / "1" / (Path(name).stem + ".bin")]
    missing = [str(p) for p in ir if not p.is_file()]
    if missing:
        problems.append(f"missing {', '.join(missing)}")
    else:
        import openvino as ov

        graph = ov.Core().read_model(str(ir[0]))
        names = (sorted(t.get_any_name() for t in graph.inputs), sorted(t.get_any_name() for t in graph.outputs))
        if names != (sorted(inputs), sorted(outputs)):
            problems.append(f"the IR's inputs/outputs {names} differ from the ONNX graph's")
    if problems:
        raise ServingError(f"{config_path} does not match {onnx_path}: " + "; ".join(problems))
    return cfg
