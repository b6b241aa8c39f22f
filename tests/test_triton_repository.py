"""Triton model repository and client-side checks that need no server: the GPU window model's config parsed with
Triton's protobuf schema and checked against the ONNX graph (with and without TensorRT), integrity checks, one-line
errors of `gmim export triton` / `gmim infer` / the launcher, and the numpy sliding window of the volume model
against MONAI's."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.inferers import SlidingWindowInferer
from typer.testing import CliRunner

from gmim_hub import ServingError
from gmim_hub.cli.main import app
from gmim_hub.errors import GMIMError
from gmim_hub.inference import openvino_runtime
from gmim_hub.serving.backend.sliding import gaussian_weights, sliding_window_logits
from gmim_hub.serving.client import TritonClient
from gmim_hub.serving.repository import write_triton_repository
from gmim_hub.serving.server import free_port
from gmim_hub.serving.validate import parse_model_config, validate_gpu_config, validate_openvino_config

pytest_plugins = ["conftest_triton"]
PROTOCOLS = ["http", "grpc"]
MAX_BATCH = 4  # the export fixture's


# -------------------------------------------------------------------------------- repository and GPU config
def test_repository_writer_rejects_a_modified_export(triton_export, tmp_path):
    src = tmp_path / "export"
    shutil.copytree(triton_export.onnx_path.parent, src)
    with open(src / "model.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(GMIMError, match="modified after export"):
        write_triton_repository(src, tmp_path / "repo")
    assert not (tmp_path / "repo").exists()


@pytest.mark.parametrize("tensorrt", [False, True])
def test_gpu_config_parses_and_matches_the_onnx_graph(triton_export, tmp_path, tensorrt):
    files = write_triton_repository(triton_export.onnx_path.parent, tmp_path, tensorrt=tensorrt)
    assert {f.relative_to(tmp_path).as_posix() for f in files} >= {
        "tiny/config.pbtxt", "tiny/1/model.onnx", "tiny_cpu/1/model.py", "tiny_cpu/1/model.onnx",
        "tiny_volume/1/model.py", "tiny_volume/1/gmim_sliding.py", "tiny_volume/1/manifest.json"}
    cfg = validate_gpu_config(tmp_path / "tiny" / "config.pbtxt", tmp_path / "tiny" / "1" / "model.onnx")
    assert cfg.platform == "onnxruntime_onnx" and cfg.max_batch_size == MAX_BATCH
    assert [(t.name, list(t.dims)) for t in cfg.input] == [("image", [1, 64, 64, 64])]
    assert [(t.name, list(t.dims)) for t in cfg.output] == [("logits", [2, 64, 64, 64])]
    assert cfg.instance_group[0].kind == 1  # KIND_GPU
    assert list(cfg.dynamic_batching.preferred_batch_size) == [2, 4]
    assert cfg.model_warmup[0].batch_size == 1 and cfg.model_warmup[0].inputs["image"].zero_data
    accelerators = cfg.optimization.execution_accelerators.gpu_execution_accelerator
    if not tensorrt:
        assert not accelerators
        return
    params = dict(accelerators[0].parameters)
    assert accelerators[0].name == "tensorrt" and params["precision_mode"] == "FP16"
    assert params["trt_layer_norm_fp32_fallback"] == "1" and params["trt_engine_cache_enable"] == "1"
    assert params["trt_timing_cache_enable"] == "1"
    assert params["trt_profile_min_shapes"] == "image:1x1x64x64x64"
    assert params["trt_profile_max_shapes"] == "image:4x1x64x64x64"


@pytest.mark.parametrize(("old", "new", "message"), [
    ("dims: [1, 64, 64, 64]", "dims: [1, 96, 96, 96]",
     "dims [1, 96, 96, 96] differ from the graph's [1, 64, 64, 64]"),
    ('name: "logits"', 'name: "probs"', "output names ['probs'] differ from the ONNX graph's ['logits']"),
    ("data_type: TYPE_FP32\n  dims: [2", "data_type: TYPE_FP16\n  dims: [2",
     "is TYPE_FP16, the graph has TYPE_FP32"),
    ("kind: KIND_GPU", "kind: KIND_CPU", "instance_group must be KIND_GPU"),
    ('platform: "onnxruntime_onnx"', 'platform: "tensorrt_plan"', "platform is 'tensorrt_plan'"),
    ("max_batch_size: 4", "max_batch_size: 4\nmax_batch_size_typo: 1", "is not a valid Triton model config"),
])
def test_gpu_config_mismatch_is_reported(triton_export, tmp_path, old, new, message):
    write_triton_repository(triton_export.onnx_path.parent, tmp_path)
    config = tmp_path / "tiny" / "config.pbtxt"
    assert old in config.read_text()
    config.write_text(config.read_text().replace(old, new, 1))
    with pytest.raises(ServingError) as err:
        validate_gpu_config(config, tmp_path / "tiny" / "1" / "model.onnx")
    assert message in str(err.value)


def test_gpu_config_detects_a_modified_onnx_file(triton_export, tmp_path):
    write_triton_repository(triton_export.onnx_path.parent, tmp_path)
    with open(tmp_path / "tiny" / "1" / "model.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(ServingError, match="file modified after export"):
        validate_gpu_config(tmp_path / "tiny" / "config.pbtxt", tmp_path / "tiny" / "1" / "model.onnx")


def test_gmim_export_triton_cli(triton_export, tmp_path):
    result = CliRunner().invoke(app, ["export", "triton", str(triton_export.onnx_path.parent), "--repo", str(tmp_path),
                                      "--tensorrt"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny", "tiny_cpu", "tiny_volume"]
    assert "checked against the ONNX graph" in result.output


def test_cpu_config_names_its_runtime_precision_and_threads(triton_export, tmp_path):
    write_triton_repository(triton_export.onnx_path.parent, tmp_path)
    cfg = parse_model_config(tmp_path / "tiny_cpu" / "config.pbtxt")
    assert cfg.backend == "python" and cfg.max_batch_size == MAX_BATCH and cfg.instance_group[0].kind == 2  # CPU
    params = {k: v.string_value for k, v in cfg.parameters.items()}
    assert {k: params[k] for k in ("runtime", "precision", "threads", "cache_dir")} == {
        "runtime": "openvino", "precision": "auto", "threads": "0", "cache_dir": ""}
    assert json.loads(params["gmim_manifest"])["sha256"] == triton_export.manifest["sha256"]
    # the window model carries the OpenVINO settings it shares with the in-process backend, byte for byte
    shared = Path(openvino_runtime.__file__).read_bytes()
    assert (tmp_path / "tiny_cpu" / "1" / "gmim_openvino.py").read_bytes() == shared


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"cpu_runtime": "tensorflow"}, "cpu runtime must be one of openvino, onnxruntime, got 'tensorflow'"),
    ({"cpu_precision": "fp16"}, "cpu precision must be one of auto, bf16, fp32, got 'fp16'"),
    ({"cpu_runtime": "onnxruntime", "cpu_precision": "bf16"}, "precision bf16 needs runtime openvino"),
    ({"threads": -1}, "threads must be >= 0 (0: every core), got -1"),
])
def test_cpu_config_bad_options(triton_export, tmp_path, kwargs, message):
    with pytest.raises(ServingError) as err:
        write_triton_repository(triton_export.onnx_path.parent, tmp_path / "repo", **kwargs)
    assert message in str(err.value)
    assert not (tmp_path / "repo").exists()


# the parameters Triton's openvino backend reads (src/openvino.cc, ParseParameters); it ignores any other key
OPENVINO_BACKEND_PARAMETERS = {"CPU_EXTENSION_PATH", "SKIP_OV_DYNAMIC_BATCHSIZE", "ENABLE_BATCH_PADDING",
                               "RESHAPE_IO_LAYERS", "TARGET_DEVICE", "INFERENCE_NUM_THREADS",
                               "COMPILATION_NUM_THREADS", "HINT_BF16", "NUM_STREAMS", "PERFORMANCE_HINT"}


@pytest.mark.parametrize("bf16", [False, True])
def test_openvino_backend_model_parses_with_the_schema_and_openvino_reads_its_ir(triton_export, tmp_path, bf16):
    import openvino as ov

    files = write_triton_repository(triton_export.onnx_path.parent, tmp_path, openvino_model=True,
                                    openvino_bf16=bf16, threads=2)
    model = tmp_path / "tiny_openvino"
    assert {f.relative_to(model).as_posix() for f in files if model in f.parents} == {
        "config.pbtxt", "1/manifest.json", "1/model.xml", "1/model.bin"}
    assert sorted(p.name for p in (model / "1").iterdir()) == ["manifest.json", "model.bin", "model.xml"]
    cfg = validate_openvino_config(model, triton_export.onnx_path)
    assert cfg.backend == "openvino" and not cfg.platform and not cfg.default_model_filename  # model.xml
    assert cfg.max_batch_size == MAX_BATCH and cfg.instance_group[0].kind == 2  # KIND_CPU
    assert [(t.name, list(t.dims)) for t in cfg.input] == [("image", [1, 64, 64, 64])]
    assert [(t.name, list(t.dims)) for t in cfg.output] == [("logits", [2, 64, 64, 64])]
    params = {k: v.string_value for k, v in cfg.parameters.items()}
    assert set(params) - {"gmim_manifest"} <= OPENVINO_BACKEND_PARAMETERS
    assert params["ENABLE_BATCH_PADDING"] == "YES" and params["PERFORMANCE_HINT"] == "LATENCY"
    assert params["INFERENCE_NUM_THREADS"] == "2" and params.get("HINT_BF16") == ("YES" if bf16 else None)
    # OpenVINO reads the IR as that backend would (model.xml with model.bin beside it): its fp32 logits are those
    # of the ONNX file compiled the same way, for a batch of two windows (the batch axis stays dynamic)
    core = ov.Core()
    x = np.random.default_rng(0).standard_normal((2, 1, 64, 64, 64)).astype(np.float32)
    config = {"INFERENCE_PRECISION_HINT": "f32"}
    from_ir = core.compile_model(core.read_model(str(model / "1" / "model.xml")), "CPU", config)(x)[0]
    from_onnx = core.compile_model(core.read_model(str(triton_export.onnx_path)), "CPU", config)(x)[0]
    assert from_ir.shape == (2, 2, 64, 64, 64)
    np.testing.assert_allclose(from_ir, from_onnx, atol=1e-5)


def test_openvino_backend_model_problems_are_reported(triton_export, tmp_path):
    write_triton_repository(triton_export.onnx_path.parent, tmp_path, openvino_model=True)
    model = tmp_path / "tiny_openvino"
    config = model / "config.pbtxt"
    config.write_text(config.read_text().replace('backend: "openvino"', 'backend: "onnxruntime"')
                      .replace('string_value: "YES"', 'string_value: "NO"'))
    (model / "1" / "model.bin").unlink()
    with pytest.raises(ServingError) as err:
        validate_openvino_config(model, triton_export.onnx_path)
    for part in ("backend is 'onnxruntime', expected 'openvino'", "ENABLE_BATCH_PADDING must be YES",
                 "missing " + str(model / "1" / "model.bin")):
        assert part in str(err.value)


def test_gmim_export_triton_cli_openvino(triton_export, tmp_path):
    result = CliRunner().invoke(app, ["export", "triton", str(triton_export.onnx_path.parent), "--repo", str(tmp_path),
                                      "--openvino"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny", "tiny_cpu", "tiny_openvino", "tiny_volume"]
    assert "tiny_openvino" in result.output and "cannot load it" in result.output


@pytest.mark.parametrize(("args", "message"), [
    (["--name", "bad name"], "model name 'bad name' must be letters, digits"),
    (["--max-batch", "0"], "max_batch must be >= 1, got 0"),
    (["--instance-count", "0"], "instance_count must be >= 1, got 0"),
])
def test_gmim_export_triton_bad_options(triton_export, tmp_path, args, message):
    export_dir = str(triton_export.onnx_path.parent)
    result = CliRunner().invoke(app, ["export", "triton", export_dir, "--repo", str(tmp_path), *args])
    assert result.exit_code == 2 and message in result.output
    assert not list(tmp_path.iterdir())


def test_gmim_export_triton_without_an_export(tmp_path):
    result = CliRunner().invoke(app, ["export", "triton", str(tmp_path / "nothing"), "--repo", str(tmp_path / "r")])
    assert result.exit_code == 2 and "no ONNX export manifest" in result.output and "gmim export onnx" in result.output


# ------------------------------------------------------------------------------- client and launcher errors
@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_unreachable_server_is_one_line(protocol):
    port = free_port()
    client = TritonClient(f"127.0.0.1:{port}", protocol=protocol, retries=1, backoff=0.0, timeout=5)
    with pytest.raises(ServingError) as err:
        client.check_ready("tiny_cpu")
    msg = str(err.value)
    assert msg.startswith(f"cannot reach Triton at {protocol}://127.0.0.1:{port}") and "is `gmim serve` running?" in msg
    assert "\n" not in msg


@pytest.mark.parametrize(("option", "message"), [
    (["--mode", "slices"], "mode must be 'volume' or 'window', got 'slices'"),
    (["--overlap", "1.0"], "overlap must be in [0, 1), got 1.0"),
    (["--concurrency", "0"], "concurrency must be >= 1, got 0"),
    (["--batch-size", "0"], "batch_size must be >= 1, got 0"),
    (["--protocol", "ftp"], "--protocol must be http or grpc, got 'ftp'"),
])
def test_gmim_infer_bad_options_are_one_line(triton_mri, tmp_path, option, message):
    result = CliRunner().invoke(app, ["infer", str(triton_mri), str(tmp_path / "o.nii.gz"), "--model", "tiny", *option])
    assert result.exit_code == 2 and message in result.output


def test_gmim_infer_unreachable_exits_2_with_one_line(triton_mri, tmp_path):
    url = f"127.0.0.1:{free_port()}"
    result = CliRunner().invoke(app, ["infer", str(triton_mri), str(tmp_path / "o.nii.gz"), "--model", "tiny",
                                      "--url", url, "--retries", "0"])
    assert result.exit_code == 2
    assert f"cannot reach Triton at http://{url}" in result.output
    assert not (tmp_path / "o.nii.gz").exists()


# --------------------------------------------------------------------------- numpy stitching (volume model)
def test_numpy_gaussian_matches_monai():
    from monai.data.utils import compute_importance_map

    roi = (64, 48, 32)
    monai_map = compute_importance_map(roi, mode="gaussian", sigma_scale=0.125).numpy()
    np.testing.assert_allclose(gaussian_weights(roi), monai_map, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", [(50, 90, 70), (20, 33, 64), (32, 100, 31)])
def test_numpy_sliding_window_matches_monai_inferer(shape):
    net = torch.nn.Conv3d(1, 3, 3, padding=1).eval()  # position-independent, so window seams are tested
    vol = torch.randn(1, *shape, generator=torch.Generator().manual_seed(0))
    run = lambda w: net(torch.from_numpy(w)).detach().numpy()  # noqa: E731
    ours = sliding_window_logits(vol.numpy(), (32, 32, 32), run, channels=3, overlap=0.5, batch_size=3)
    with torch.no_grad():
        ref = SlidingWindowInferer((32, 32, 32), sw_batch_size=3, overlap=0.5, mode="gaussian")(vol[None], net)[0]
    assert ours.shape == (3, *shape)
    np.testing.assert_allclose(ours, ref.numpy(), atol=1e-4)


@pytest.mark.parametrize("out_channels, multi_label, bits", [(2, False, 1), (4, False, 2), (5, False, 4),
                                                              (14, False, 4), (17, False, 8), (3, True, 1)])
def test_packed_labels_round_trip(out_channels, multi_label, bits):
    from gmim_hub.serving.backend.sliding import label_bits, pack_labels, unpack_labels

    assert label_bits(out_channels, multi_label) == bits
    rng = np.random.default_rng(out_channels)
    labels = rng.integers(0, 2 if multi_label else out_channels, size=(3, 5, 7), dtype=np.uint8)  # 105 labels
    packed = pack_labels(labels, bits)
    assert packed.dtype == np.uint8 and packed.shape == (-(-labels.size * bits // 8),)
    assert np.array_equal(unpack_labels(packed, bits, labels.shape), labels)
    with pytest.raises(ValueError, match="do not hold"):
        unpack_labels(packed[:-1], bits, labels.shape)
