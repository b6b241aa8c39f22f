"""Triton under load, short form of `benchmarks/load_test.py` (which sends 500): 40 requests at concurrency 8 to
the session's real server, window and volume models over HTTP and gRPC mixed. Every answer must arrive (0 errors)
and equal the in-process result (0 mismatches); the timings are printed, never asserted."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

pytest_plugins = ["conftest_triton"]


def _load_test_module():
    path = Path(__file__).resolve().parent.parent / "benchmarks" / "load_test.py"
    spec = importlib.util.spec_from_file_location("gmim_load_test", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_40_mixed_requests_at_concurrency_8_all_correct(triton_server, triton_export, triton_local):
    load = _load_test_module()
    spec = load.LoadSpec(requests=40, concurrency=8, window_pool=4, volume_pool=2, max_seconds=600)
    m = triton_export.manifest
    inputs = load.make_inputs(spec, triton_local, m["window_size"], m["out_channels"], batch_size=m["max_batch_size"])
    assert all(0.05 < lab.mean() < 0.95 for lab in inputs.volume_labels)  # both classes: label equality means a lot
    assert len({float(np.abs(w).sum()) for w in inputs.window_logits}) == spec.window_pool  # distinct answers

    result = load.run_load(triton_server.http_url, triton_server.grpc_url, spec, inputs)
    print("\n" + result.line(), result.by_kind, f"max |window diff| {result.max_abs_diff_window:.2e}")
    assert result.errors == 0, result.error_samples
    assert result.skipped == 0 and result.requests == 40
    assert result.mismatches == 0, (result.max_abs_diff_window, result.label_voxels_differing)
    assert set(result.by_kind) == {"window/http", "window/grpc", "volume/http", "volume/grpc"}
    assert sum(s["count"] for s in result.by_kind.values()) == 40
    assert triton_server.ready()
