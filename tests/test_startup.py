"""Start-up cost: `gmim` commands import only what they use. MONAI's package import alone takes ~10 s on a 2-core
machine (it imports all its submodules, and with them scipy, pandas and PIL), torch ~4 s; commands that never touch
a network or a MONAI transform must not pay for them. Each command runs in a fresh interpreter and reports the
top-level packages it imported when it exits."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytest_plugins = ["conftest_triton"]

# Runs `gmim ARGS...` as the console script does and, at exit (also after SIGTERM or an error), writes the sorted
# top-level names of sys.modules to $GMIM_MODULES_OUT.
DRIVER = """
import atexit, json, os, runpy, sys

def dump():
    with open(os.environ["GMIM_MODULES_OUT"], "w") as f:
        json.dump(sorted({name.split(".")[0] for name in sys.modules}), f)

atexit.register(dump)
sys.argv = ["gmim", *sys.argv[1:]]
runpy.run_module("gmim_hub.cli.main", run_name="__main__", alter_sys=True)
"""


def _env(tmp_path: Path) -> dict[str, str]:
    root = str(Path(__file__).resolve().parents[1])
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, "GMIM_MODULES_OUT": str(tmp_path / "modules.json"), "COLUMNS": "200"}


def _imported(tmp_path: Path, *args: str, expect_rc: int = 0) -> set[str]:
    proc = subprocess.run([sys.executable, "-c", DRIVER, *args], env=_env(tmp_path), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == expect_rc, proc.stdout + proc.stderr
    return set(json.loads((tmp_path / "modules.json").read_text()))


@pytest.mark.parametrize("args", [["--help"], ["version"], ["serve", "--help"], ["infer", "--help"],
                                  ["train", "--help"], ["demo", "--help"], ["ablate", "--help"]], ids=" ".join)
def test_light_commands_import_neither_monai_nor_torch(tmp_path, args):
    modules = _imported(tmp_path, *args)
    assert "gmim_hub" in modules  # the driver really ran the CLI
    assert not {"monai", "torch"} & modules, f"gmim {' '.join(args)} imported {sorted({'monai', 'torch'} & modules)}"


def test_version_reports_the_installed_libraries(tmp_path):
    from importlib.metadata import version

    proc = subprocess.run([sys.executable, "-m", "gmim_hub.cli.main", "version"], env=_env(tmp_path),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().endswith(f"(torch {version('torch')}, monai {version('monai')})")



@pytest.mark.slow
def test_serve_runs_a_server_without_monai_or_torch(tmp_path, triton_repo):
    """A real `gmim serve` until its server is ready, then SIGTERM: the CLI process never imported MONAI or torch
    (the python-backend models run in Triton's own stub processes)."""
    from gmim_hub.serving.server import free_port

    http = free_port()
    args = ["serve", str(triton_repo), "--models", "tiny_cpu", "--http-port", str(http), "--grpc-port",
            str(free_port()), "--metrics-port", str(free_port()), "--log-file", str(tmp_path / "triton.log")]
    proc = subprocess.Popen([sys.executable, "-c", DRIVER, *args], env=_env(tmp_path), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 180
        while not _ready(http):
            assert proc.poll() is None, proc.communicate()[0]
            assert time.monotonic() < deadline, "gmim serve did not get ready in 180 s"
            time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        out = proc.communicate(timeout=120)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, out
    assert "stopped" in out
    modules = set(json.loads((tmp_path / "modules.json").read_text()))
    assert "gmim_hub" in modules and not {"monai", "torch"} & modules, sorted({"monai", "torch"} & modules)


def _ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/health/ready", timeout=1) as r:
            return r.status == 200
    except OSError:
        return False


@pytest.mark.slow
def test_infer_volume_mode_needs_no_monai_and_matches_local_prediction(tmp_path, triton_server, triton_export,
                                                                       triton_mri, triton_precision):
    """`gmim infer --mode volume` (a real server, a real MRI in LAS orientation) imports no MONAI and writes the
    labels local prediction (MONAI preprocessing) with the runtime the server wraps (OpenVINO, same precision)
    writes."""
    import nibabel as nib
    import numpy as np

    from gmim_hub.inference.predictor import Predictor

    served, local = tmp_path / "served_seg.nii.gz", tmp_path / "local_seg.nii.gz"
    modules = _imported(tmp_path, "infer", str(triton_mri), str(served), "--model", "tiny", "--mode", "volume",
                        "--url", triton_server.http_url, "--manifest", str(triton_export.manifest_path))
    assert "gmim_hub" in modules and "tritonclient" in modules
    assert "monai" not in modules
    Predictor.from_pretrained(None, backend="openvino", onnx_path=triton_export.onnx_path.parent,
                              precision=triton_precision).predict_file(triton_mri, local)
    a, b = nib.load(served), nib.load(local)
    assert a.shape == b.shape and np.array_equal(a.affine, b.affine)
    assert np.array_equal(np.asarray(a.dataobj), np.asarray(b.dataobj))
