"""The OpenVINO backend: it compiles the ONNX export it is given (sha256 checked), honours precision and threads,
caches compiled models and exports, and `auto` follows the documented rule. Label parity with fp32 PyTorch on a
real volume is in tests/test_predict.py; timings live in benchmarks/, never in tests."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from gmim_hub import PRESETS
from gmim_hub.errors import ConfigError
from gmim_hub.export.onnx import export_onnx
from gmim_hub.inference.backends import choose_backend
from gmim_hub.inference.openvino_backend import (
    OpenVINOBackend,
    _model_key,
    cache_root,
    export_for_openvino,
    openvino_bf16_supported,
)
from gmim_hub.models.hub_models import GMIMForSegmentation

pytest.importorskip("openvino")


@pytest.fixture(scope="module")
def seg_model() -> GMIMForSegmentation:
    torch.manual_seed(3)
    return GMIMForSegmentation(dataclasses.replace(PRESETS["tiny"], out_channels=3)).eval()


@pytest.fixture(scope="module")
def ov_cache(tmp_path_factory) -> Path:
    """Compiled models shared by the tests that do not test the cache itself."""
    return tmp_path_factory.mktemp("ov-cache")


@pytest.fixture(scope="module")
def export_dir(seg_model, tmp_path_factory) -> Path:
    return export_onnx(seg_model, tmp_path_factory.mktemp("ov-export"), name="tiny3", max_batch=2).onnx_path.parent


def _smooth(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """Blurred noise: image-like structure, so labels are not decided by rounding noise alone."""
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    return torch.nn.functional.avg_pool3d(x, 5, stride=1, padding=2) * 3


def test_fp32_logits_match_pytorch_and_batches_run_window_by_window(seg_model, export_dir, ov_cache):
    backend = OpenVINOBackend(export_dir, precision="fp32", threads=1, cache_dir=ov_cache)
    x = _smooth((3, 1, 64, 64, 64))
    out = backend(x)
    assert out.dtype == torch.float32 and out.shape == (3, 3, 64, 64, 64)
    with torch.inference_mode():
        ref = seg_model(x)
    torch.testing.assert_close(out, ref, atol=2e-3, rtol=1e-3)


@pytest.mark.skipif(not openvino_bf16_supported(), reason="the CPU plugin lists no BF16 on this CPU")
def test_bf16_labels_agree_with_fp32(seg_model, export_dir, ov_cache):
    backend = OpenVINOBackend(export_dir, precision="bf16", threads=2, cache_dir=ov_cache)
    x = _smooth((1, 1, 64, 64, 64), seed=1)
    with torch.inference_mode():
        ref = seg_model(x)
    assert (backend(x).argmax(1) == ref.argmax(1)).float().mean().item() >= 0.99


@pytest.mark.parametrize("precision, threads", [("fp32", 1), ("bf16", 2)])
def test_precision_and_threads_reach_the_compiled_model(export_dir, ov_cache, precision, threads):
    if precision == "bf16" and not openvino_bf16_supported():
        pytest.skip("the CPU plugin lists no BF16 on this CPU")
    compiled = OpenVINOBackend(export_dir, precision=precision, threads=threads, cache_dir=ov_cache).compiled
    assert int(compiled.get_property("INFERENCE_NUM_THREADS")) == threads
    assert str(compiled.get_property("INFERENCE_PRECISION_HINT")) == {"fp32": "<Type: 'float32'>",
                                                                      "bf16": "<Type: 'bfloat16'>"}[precision]


def test_second_compile_is_loaded_from_the_cache_dir(export_dir, tmp_path):
    cache = tmp_path / "ov"
    first = OpenVINOBackend(export_dir, precision="fp32", threads=1, cache_dir=cache)
    blobs = sorted(p.name for p in first.cache_dir.iterdir())
    assert first.cache_dir.parent == cache and not first.loaded_from_cache
    assert any(name.endswith(".blob") for name in blobs), blobs
    second = OpenVINOBackend(export_dir, precision="fp32", threads=1, cache_dir=cache)
    assert second.loaded_from_cache and sorted(p.name for p in second.cache_dir.iterdir()) == blobs
    x = _smooth((1, 1, 64, 64, 64), seed=2)
    torch.testing.assert_close(second(x), first(x), atol=0, rtol=0)


@pytest.mark.skipif(not openvino_bf16_supported(), reason="the CPU plugin lists no BF16 on this CPU")
def test_a_bf16_compile_never_loads_an_fp32_blob(seg_model, export_dir, tmp_path):
    """OpenVINO's cache key omits the precision hint (a shared folder crashed here): each precision has its own."""
    fp32 = OpenVINOBackend(export_dir, precision="fp32", threads=1, cache_dir=tmp_path)
    bf16 = OpenVINOBackend(export_dir, precision="bf16", threads=1, cache_dir=tmp_path)
    assert not bf16.loaded_from_cache and bf16.cache_dir != fp32.cache_dir
    x = _smooth((1, 1, 64, 64, 64), seed=4)
    with torch.inference_mode():
        ref = seg_model(x)
    assert (bf16(x).argmax(1) == ref.argmax(1)).float().mean().item() >= 0.99


def test_model_export_is_written_once_and_rebuilt_when_damaged(seg_model, tmp_path, caplog):
    folder = export_for_openvino(seg_model, tmp_path)
    assert folder.parent == tmp_path / "onnx" and sorted(p.name for p in folder.iterdir()) == ["manifest.json",
                                                                                               "model.onnx"]
    stamp = (folder / "model.onnx").stat().st_mtime_ns
    assert export_for_openvino(seg_model, tmp_path) == folder and (folder / "model.onnx").stat().st_mtime_ns == stamp
    other = GMIMForSegmentation(seg_model.config).eval()  # other weights: another key (so another folder)
    assert _model_key(other) != _model_key(seg_model) == _model_key(seg_model)
    with open(folder / "model.onnx", "ab") as f:
        f.write(b"\0")
    assert export_for_openvino(seg_model, tmp_path) == folder
    assert "is unusable" in caplog.text and (folder / "model.onnx").stat().st_mtime_ns != stamp


def test_cache_root_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("GMIM_CACHE_DIR", str(tmp_path / "c"))
    assert cache_root() == tmp_path / "c"
    monkeypatch.delenv("GMIM_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert cache_root() == tmp_path / "x" / "gmim-hub"


def test_auto_follows_the_documented_rule():
    """auto on the CPU is OpenVINO when it is installed (it is here: the test environment has the cpu extra), bf16
    where its CPU plugin lists BF16; with an export too; PyTorch's fast backend and onnxruntime without it."""
    native = "bf16" if openvino_bf16_supported() else "fp32"
    assert choose_backend("auto", "auto", "cpu") == ("openvino", native)
    assert choose_backend("auto", "auto", "cpu", export=True) == ("openvino", native)
    assert choose_backend("auto", "fp32", "cpu") == ("openvino", "fp32")
    assert choose_backend("openvino", "fp32", "cpu") == ("openvino", "fp32")


def test_auto_without_openvino_is_the_fast_backend(monkeypatch):
    from gmim_hub.inference import backends

    monkeypatch.setattr(backends, "openvino_available", lambda: False)
    assert backends.choose_backend("auto", "fp32", "cpu") == ("fast", "fp32")
    assert backends.choose_backend("auto", "auto", "cpu", export=True) == ("onnx", "fp32")


@pytest.mark.parametrize("kwargs, message", [
    ({"precision": "fp16"}, "precision must be 'fp32' or 'bf16' for the openvino backend, got 'fp16'"),
    ({"threads": 0}, "threads must be >= 1, got 0; omit --threads to use every core"),
])
def test_bad_options(export_dir, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        OpenVINOBackend(export_dir, **kwargs)
