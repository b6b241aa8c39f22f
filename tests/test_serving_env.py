"""The Triton server's own environment (numpy < 2 there only): its key, its checks on real virtual environments
(empty, numpy from this environment, interrupted, failing to install), and a real server whose python-backend stub
runs in it while this process may run numpy 2."""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest
from packaging.requirements import Requirement
from typer.testing import CliRunner

from gmim_hub.cli.main import app
from gmim_hub.errors import ServingError
from gmim_hub.serving import env as serving_env
from gmim_hub.serving.server import TritonServer, free_port

runner = CliRunner(env={"COLUMNS": "250"})


def _venv(path: Path, *, pip: bool = False) -> Path:
    subprocess.run([sys.executable, "-m", "venv", *([] if pip else ["--without-pip"]), str(path)], check=True)
    return path


def _see_this_environment(venv: Path) -> None:
    """Make this environment's packages (numpy, onnxruntime; no nvidia-pytriton) importable in `venv`."""
    site = next((venv / "lib").glob("python3*/site-packages"))
    (site / "main_env.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")


def test_the_library_itself_allows_numpy_2_and_leaves_the_server_out():
    reqs = [Requirement(r) for r in importlib.metadata.requires("gmim-hub") or []]
    numpy_req = next(r for r in reqs if r.name == "numpy")
    assert numpy_req.specifier.contains("2.3.0") and numpy_req.specifier.contains("1.26.4"), numpy_req
    assert not [r for r in reqs if r.name == "nvidia-pytriton"], "the server belongs in its own environment"
    constraints = (Path(__file__).resolve().parent.parent / "constraints.txt").read_text()
    assert not [ln for ln in constraints.splitlines() if ln.strip().startswith("numpy")]


def test_env_key_follows_the_package_list_and_the_folder_can_be_chosen(monkeypatch, tmp_path):
    key = serving_env.env_key()
    assert key.startswith(f"py{sys.version_info.major}.{sys.version_info.minor}-") and len(key.split("-")[1]) == 12
    assert serving_env.env_key((*serving_env.SERVING_PACKAGES, ("openvino>=2025", "openvino"))) != key
    monkeypatch.delenv(serving_env.ENV_VARIABLE, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert serving_env.default_env_dir() == tmp_path / "cache" / "gmim-hub" / "serving-env" / key
    monkeypatch.setenv(serving_env.ENV_VARIABLE, str(tmp_path / "mine"))
    assert serving_env.default_env_dir() == tmp_path / "mine"


def test_an_empty_environment_is_one_line_and_left_alone(tmp_path):
    venv = _venv(tmp_path / "empty")
    before = sorted(p.name for p in venv.rglob("*"))
    with pytest.raises(ServingError) as err:
        serving_env.ensure_serving_env(venv, repair=True)
    message = str(err.value)
    assert "\n" not in message
    for name in ("nvidia-pytriton", "numpy", "onnxruntime"):
        assert f"{name} is not installed" in message
    assert "fix it or use another environment (--serving-env or $GMIM_SERVING_ENV" in message
    assert sorted(p.name for p in venv.rglob("*")) == before  # not ours: never modified
    assert not list(tmp_path.glob(".*.lock"))


def test_numpy_of_this_environment_is_judged_by_the_servers_rule(tmp_path):
    """The stub needs numpy < 2: this environment's numpy is refused there exactly when it is 2.x."""
    venv = _venv(tmp_path / "borrowed")
    _see_this_environment(venv)
    found = serving_env.problems(serving_env.probe(venv))
    numpy_2 = f"numpy {np.__version__} does not satisfy numpy>=1.24,<2"
    assert (numpy_2 in found) == (int(np.__version__.split(".")[0]) >= 2), found
    assert "nvidia-pytriton is not installed" in found
    assert not [p for p in found if p.startswith("onnxruntime")], found  # installed here, imports


def test_not_an_environment_and_interrupted_creation(tmp_path):
    (tmp_path / "plain").mkdir()
    with pytest.raises(ServingError, match=r"plain is not a Python environment \(no bin/python\); pass a virtual"):
        serving_env.ensure_serving_env(tmp_path / "plain")
    half = _venv(tmp_path / "half")
    (half / ".gmim-creating").write_text("")  # what a creation killed before its end leaves
    with pytest.raises(ServingError, match=r"no Triton server environment at .*half; create it with: gmim serve "
                                           r"--setup-env"):
        serving_env.ensure_serving_env(half, create=False)
    assert not half.exists()


def test_a_failed_creation_leaves_nothing_and_says_why(tmp_path, monkeypatch):
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)  # no index at all: pip cannot find nvidia-pytriton
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.delenv("PIP_FIND_LINKS", raising=False)
    said: list[str] = []
    target = tmp_path / "envs" / "new"
    with pytest.raises(ServingError) as err:
        serving_env.ensure_serving_env(target, progress=said.append)
    message = str(err.value)
    assert "\n" not in message and "pip install failed (ERROR: " in message and "nvidia-pytriton" in message
    assert "it needs the package index once" in message and "new.pip.log" in message
    assert said and said[0].startswith(f"creating the Triton server's Python environment in {target}")
    assert not target.exists()
    assert (tmp_path / "envs" / "new.pip.log").is_file()


def test_a_broken_environment_gmim_made_asks_for_setup_env(tmp_path):
    venv = _venv(tmp_path / "made")
    (venv / "gmim-serving-env.json").write_text(json.dumps({"requirements": serving_env.requirements()}))
    with pytest.raises(ServingError, match=r"made is not usable \(nvidia-pytriton is not installed; .*\); rebuild it: "
                                           r"gmim serve --setup-env$"):
        serving_env.ensure_serving_env(venv)
    assert venv.exists()


# ------------------------------------------------------------------ a real server in the real environment
_PROBE_CONFIG = """name: "probe"
backend: "python"
max_batch_size: 0
input [{ name: "x", data_type: TYPE_FP32, dims: [3] }]
output [{ name: "y", data_type: TYPE_FP32, dims: [3] }, { name: "numpy", data_type: TYPE_STRING, dims: [1] },
        { name: "prefix", data_type: TYPE_STRING, dims: [1] }]
"""
_PROBE_MODEL = '''import sys

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            x = pb_utils.get_input_tensor_by_name(request, "x").as_numpy()
            responses.append(pb_utils.InferenceResponse(output_tensors=[
                pb_utils.Tensor("y", (2 * x).astype(np.float32)),
                pb_utils.Tensor("numpy", np.array([np.__version__.encode()], dtype=np.object_)),
                pb_utils.Tensor("prefix", np.array([sys.prefix.encode()], dtype=np.object_)),
            ]))
        return responses
'''


@pytest.mark.slow
def test_the_stub_runs_in_the_serving_environment(tmp_path):
    import tritonclient.http as httpclient

    senv = serving_env.ensure_serving_env()
    assert int(senv.versions["numpy"].split(".")[0]) < 2
    model = tmp_path / "repo" / "probe"
    (model / "1").mkdir(parents=True)
    (model / "config.pbtxt").write_text(_PROBE_CONFIG)
    (model / "1" / "model.py").write_text(_PROBE_MODEL)
    x = np.array([1.0, -2.0, 3.5], np.float32)
    with TritonServer(tmp_path / "repo", http_port=free_port(), grpc_port=free_port(), metrics_port=free_port(),
                      log_path=tmp_path / "server.log") as server:
        client = httpclient.InferenceServerClient(server.http_url)
        try:
            inp = httpclient.InferInput("x", [3], "FP32")
            inp.set_data_from_numpy(x, binary_data=True)
            outputs = [httpclient.InferRequestedOutput(n, binary_data=True) for n in ("y", "numpy", "prefix")]
            result = client.infer("probe", [inp], outputs=outputs)
        finally:
            client.close()
    np.testing.assert_array_equal(result.as_numpy("y"), 2 * x)  # not the empty outputs numpy 2 gives
    assert result.as_numpy("numpy")[0].decode() == senv.versions["numpy"]
    assert Path(result.as_numpy("prefix")[0].decode()) == senv.path
    print(f"\nthis process: numpy {np.__version__}; the server's stub: numpy {senv.versions['numpy']}")


@pytest.mark.slow
def test_gmim_serve_setup_env_reports_the_environment():
    result = runner.invoke(app, ["serve", "--setup-env"])
    assert result.exit_code == 0, result.output
    senv = serving_env.check_serving_env()
    for text in ("Triton server environment ready", str(senv.path), "numpy", senv.versions["numpy"],
                 "nvidia-pytriton", "0.7.0"):
        assert text in result.output
