"""ONNX export: parity with PyTorch at two batch sizes, the manifest, the sha256 check, and clear input errors."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from typer.testing import CliRunner

from gmim_hub import PRESETS, GMIMError, InputError, WeightsError
from gmim_hub.cli.main import app
from gmim_hub.config import ConfigError
from gmim_hub.export.onnx import (
    MANIFEST_KEYS,
    OnnxWindowModel,
    export_onnx,
    load_manifest,
    select_providers,
    verify_onnx_sha256,
)
from gmim_hub.models.hub_models import GMIMForSegmentation

MAX_BATCH = 2


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    return GMIMForSegmentation(PRESETS["tiny"]).save_pretrained(tmp_path_factory.mktemp("m") / "tiny_seg")


@pytest.fixture(scope="module")
def exported(tiny_dir, tmp_path_factory):
    return export_onnx(tiny_dir, tmp_path_factory.mktemp("export"), max_batch=MAX_BATCH)


@pytest.fixture(scope="module")
def torch_model(tiny_dir):
    return GMIMForSegmentation.from_pretrained(tiny_dir).eval()


def test_export_writes_one_onnx_file_and_manifest(exported, tiny_dir):
    folder = exported.onnx_path.parent
    assert folder.name == "tiny_seg"  # default name: the model folder's
    assert sorted(p.name for p in folder.iterdir()) == ["manifest.json", "model.onnx"]  # no external data
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]  # no temporary leftovers
    graph = onnx.load(str(exported.onnx_path)).graph
    (inp,), (out,) = graph.input, graph.output
    dims = [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim]
    assert (inp.name, out.name) == ("image", "logits")
    assert isinstance(dims[0], str) and dims[1:] == [1, 64, 64, 64]  # dynamic batch only


def test_manifest_fields(exported, tiny_dir):
    m = json.loads(exported.manifest_path.read_text())
    assert tuple(m) == MANIFEST_KEYS and m == exported.manifest
    cfg = PRESETS["tiny"]
    assert m["format"] == "gmim-hub-onnx" and m["format_version"] == 1 and m["onnx_file"] == "model.onnx"
    assert m["sha256"] == hashlib.sha256(exported.onnx_path.read_bytes()).hexdigest()
    assert m["input"] == {"name": "image", "dtype": "float32", "shape": [-1, 1, 64, 64, 64]}
    assert m["output"] == {"name": "logits", "dtype": "float32", "shape": [-1, 2, 64, 64, 64]}
    assert m["window_size"] == [64, 64, 64] and m["max_batch_size"] == MAX_BATCH
    assert (m["in_channels"], m["out_channels"], m["multi_label"]) == (1, 2, False)
    assert m["config"] == cfg.to_dict() and m["data"] == cfg.to_dict()["data"]
    assert m["source"] == {"model": str(tiny_dir), "revision": None}
    assert m["opset"] == 17 and m["exporter"] == "torch.onnx (torchscript)"
    assert set(m["versions"]) == {"torch", "monai", "onnx", "onnxruntime", "gmim_hub"}
    assert 0 <= m["parity"]["max_abs_diff_batch1"] <= 1e-4 and 0 <= m["parity"]["max_abs_diff_batch_max"] <= 1e-4
    assert m["parity"]["atol"] == 1e-4
    assert load_manifest(exported.onnx_path.parent) == m


@pytest.mark.parametrize("batch", [1, MAX_BATCH])
def test_onnxruntime_matches_pytorch(exported, torch_model, batch):
    runner = OnnxWindowModel.from_export(exported.onnx_path.parent, providers=["CPUExecutionProvider"])
    x = torch.randn(batch, 1, 64, 64, 64, generator=torch.Generator().manual_seed(batch))
    with torch.inference_mode():
        ref = torch_model(x).numpy()
    got = runner(x.numpy())
    assert got.shape == (batch, 2, 64, 64, 64)
    assert np.abs(got - ref).max() <= 1e-4


@pytest.mark.parametrize("shape, dtype, message", [
    ((1, 1, 32, 32, 32), np.float32, "exported for windows of 64x64x64; got 32x32x32: use sliding-window"),
    ((1, 1, 64, 64, 96), np.float32, "exported for windows of 64x64x64; got 64x64x96"),
    ((1, 2, 64, 64, 64), np.float32, "takes 1 channel(s); got 2"),
    ((1, 1, 64, 64, 64), np.float64, "expected float32 input, got float64; cast with x.astype(np.float32)"),
    ((1, 64, 64, 64), np.float32, "add the batch and channel axes"),
])
def test_wrong_input_rejected_before_onnxruntime(exported, shape, dtype, message):
    runner = OnnxWindowModel(exported.onnx_path, providers=["CPUExecutionProvider"])
    with pytest.raises(InputError) as e:
        runner(np.zeros(shape, dtype=dtype))
    assert message in str(e.value) and "\n" not in str(e.value)


def test_sha_mismatch_detected(exported, tmp_path):
    copy = tmp_path / "tampered"
    shutil.copytree(exported.onnx_path.parent, copy)
    model = onnx.load(str(copy / "model.onnx"))
    model.doc_string = "edited after export"  # still a valid model: only the digest can tell
    onnx.save(model, str(copy / "model.onnx"))
    manifest = load_manifest(copy)
    with pytest.raises(WeightsError, match="was modified after export; re-export with gmim export onnx"):
        verify_onnx_sha256(manifest, copy / "model.onnx")
    with pytest.raises(WeightsError, match="modified after export"):
        OnnxWindowModel.from_export(copy / "model.onnx")
    assert verify_onnx_sha256(load_manifest(exported.manifest_path), exported.onnx_path) == manifest["sha256"]


@pytest.mark.parametrize("edit, message", [
    (lambda m: m.pop("sha256"), "missing keys: sha256"),
    (lambda m: m.update(extra=1), "unknown keys: extra"),
    (lambda m: m.update(format_version=99), "re-export with this version's gmim export onnx"),
])
def test_load_manifest_rejects_bad_manifests(exported, tmp_path, edit, message):
    m = json.loads(exported.manifest_path.read_text())
    edit(m)
    (tmp_path / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(WeightsError, match=message):
        load_manifest(tmp_path)


def test_load_manifest_rejects_invalid_json(tmp_path):
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(WeightsError, match="is not valid JSON"):
        load_manifest(tmp_path / "manifest.json")


def test_export_refuses_to_overwrite(exported, tiny_dir):
    with pytest.raises(GMIMError, match="already exists; pass overwrite=True"):
        export_onnx(tiny_dir, exported.onnx_path.parent.parent)


@pytest.mark.parametrize("kwargs, message", [
    ({"max_batch": 0}, "max_batch must be >= 1"),
    ({"opset": 13}, "opset must be >= 17"),
    ({"name": "bad name/.."}, "export name must be letters, digits"),
    ({"roi": (48, 64, 64)}, "roi_size must be three positive multiples of 32"),
])
def test_export_argument_errors(torch_model, tmp_path, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        export_onnx(torch_model, tmp_path, **kwargs)
    assert not list(tmp_path.iterdir())


def test_parity_failure_raises_with_the_numbers(torch_model, tmp_path):
    with pytest.raises(GMIMError, match=r"max abs diff .* at batch 1 and .* at batch 1 > atol 0"):
        export_onnx(torch_model, tmp_path, name="strict", max_batch=1, atol=0.0)
    assert not (tmp_path / "strict" / "model.onnx").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("device, available, expected", [
    (None, ["CPUExecutionProvider"], ["CPUExecutionProvider"]),
    (None, ["CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider"],
     ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]),
    ("cuda", ["CUDAExecutionProvider", "CPUExecutionProvider"], ["CUDAExecutionProvider", "CPUExecutionProvider"]),
    ("cpu", ["CUDAExecutionProvider", "CPUExecutionProvider"], ["CPUExecutionProvider"]),
])
def test_select_providers_order(device, available, expected):
    assert select_providers(device, available) == expected


def test_select_providers_cuda_without_gpu_provider():
    with pytest.raises(ConfigError, match="install onnxruntime-gpu .* or use --device cpu"):
        select_providers("cuda", ["CPUExecutionProvider"])


def test_cli_export_onnx(tiny_dir, tmp_path):
    result = CliRunner().invoke(app, ["export", "onnx", str(tiny_dir), "--name", "cli_tiny", "--out-dir",
                                      str(tmp_path), "--max-batch", "1"])
    assert result.exit_code == 0, result.output
    manifest = load_manifest(tmp_path / "cli_tiny")
    assert manifest["sha256"][:16] in result.output and "64x64x64" in result.output
    again = CliRunner().invoke(app, ["export", "onnx", str(tiny_dir), "--name", "cli_tiny", "--out-dir",
                                     str(tmp_path)])
    assert again.exit_code == 2 and "already exists" in again.output and "Traceback" not in again.output
