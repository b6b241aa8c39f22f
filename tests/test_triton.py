"""Triton serving against a REAL server (session fixture `server` in conftest_triton.py): `tiny_cpu` (batched
windows) and `tiny_volume` (whole volumes stitched on the server by business logic scripting) over HTTP and gRPC
must equal the in-process OpenVINO backend they wrap (same precision) and local prediction, and agree with fp32
onnxruntime; the onnxruntime runtime of `_cpu` equals local onnxruntime; bad requests fail clearly while the server keeps serving; a
modified ONNX file refuses to load; `gmim infer` and `gmim serve` work end to end."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import nibabel as nib
import numpy as np
import pytest
import torch
from _dicom_series import Layout, write_series
from monai.inferers import SlidingWindowInferer
from typer.testing import CliRunner

from gmim_hub import ServingError
from gmim_hub.cli.main import app
from gmim_hub.inference import Predictor
from gmim_hub.serving.backend.sliding import sliding_window_logits
from gmim_hub.serving.client import TritonClient
from gmim_hub.serving.infer import check_model
from gmim_hub.serving.repository import write_triton_repository
from gmim_hub.serving.server import TritonServer, free_port
from gmim_hub.serving.validate import parse_model_config

pytest_plugins = ["conftest_triton"]
PROTOCOLS = ["http", "grpc"]


# ----------------------------------------------------------------------------------- window model (batched)
@pytest.mark.slow
@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_window_model_equals_local_openvino_and_agrees_with_fp32(
    triton_client, triton_local, triton_ort, triton_precision, protocol
):
    x = np.random.default_rng(1).standard_normal((2, 1, 64, 64, 64)).astype(np.float32)
    with triton_client(protocol) as client:
        logits = client.infer("tiny_cpu", x, "logits")
    assert logits.shape == (2, 2, 64, 64, 64) and logits.dtype == np.float32
    np.testing.assert_array_equal(logits, triton_local(x))  # same graph, same compile settings, same precision
    fp32 = triton_ort(x)
    agreement = float((logits.argmax(1) == fp32.argmax(1)).mean())
    assert agreement >= 0.99, agreement
    if triton_precision == "bf16":  # the served model really runs bf16, not fp32 under another name
        assert np.abs(logits - fp32).max() > 1e-4


@pytest.mark.slow
def test_onnxruntime_runtime_equals_local_onnxruntime(triton_export, triton_ort, tmp_path):
    """`runtime: onnxruntime` (the choice for a container without openvino) in its own server."""
    write_triton_repository(triton_export.onnx_path.parent, tmp_path / "repo", cpu_runtime="onnxruntime", threads=2)
    cfg = parse_model_config(tmp_path / "repo" / "tiny_cpu" / "config.pbtxt")
    assert cfg.parameters["runtime"].string_value == "onnxruntime" and cfg.parameters["threads"].string_value == "2"
    srv = TritonServer(tmp_path / "repo", models=["tiny_cpu"], http_port=free_port(), grpc_port=free_port(),
                       metrics_port=free_port(), ready_timeout=120, log_path=tmp_path / "server.log")
    srv.start()
    try:
        x = np.random.default_rng(5).standard_normal((3, 1, 64, 64, 64)).astype(np.float32)
        with TritonClient(srv.http_url, protocol="http") as client:
            logits = client.infer("tiny_cpu", x, "logits")
        assert np.abs(logits - triton_ort(x)).max() <= 1e-5
    finally:
        srv.stop()
    assert "with onnxruntime fp32, threads 2" in (tmp_path / "server.log").read_text()


def _metric(triton_server, name: str, model: str) -> float:
    text = urllib.request.urlopen(triton_server.metrics_url, timeout=5).read().decode()
    line = next(ln for ln in text.splitlines() if ln.startswith(f'{name}{{model="{model}"'))
    return float(line.rsplit(" ", 1)[1])


@pytest.mark.slow
@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_concurrent_requests_are_batched_and_correct(triton_server, triton_client, triton_local, protocol):
    x = np.random.default_rng(2).standard_normal((4, 1, 64, 64, 64)).astype(np.float32)
    before = [_metric(triton_server, k, "tiny_cpu") for k in ("nv_inference_count", "nv_inference_exec_count")]
    with triton_client(protocol) as client:
        out = client.infer_many("tiny_cpu", [x[i : i + 1] for i in range(4)], "logits", concurrency=4)
    after = [_metric(triton_server, k, "tiny_cpu") for k in ("nv_inference_count", "nv_inference_exec_count")]
    np.testing.assert_allclose(np.concatenate(out), triton_local(x), atol=1e-5)
    windows, executions = after[0] - before[0], after[1] - before[1]
    assert windows == 4
    assert executions < windows  # the dynamic batcher merged queued requests into one execution


@pytest.mark.slow
def test_a_bad_request_batched_with_good_ones_fails_alone(triton_client, triton_local):
    good = np.random.default_rng(4).standard_normal((2, 1, 64, 64, 64)).astype(np.float32)
    bad = np.full((1, 1, 64, 64, 64), np.nan, np.float32)
    with triton_client("grpc", retries=0) as client, ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(client.infer, "tiny_cpu", x, "logits") for x in (good[:1], bad, good[1:])]
        with pytest.raises(ServingError, match="contains NaN or Inf"):
            futures[1].result()
        np.testing.assert_allclose(np.concatenate([futures[0].result(), futures[2].result()]), triton_local(good),
                                   atol=1e-5)


# ------------------------------------------------------------------------- volume model (BLS on the server)
@pytest.fixture(scope="session")
def local_logits(triton_volume, triton_local):
    """The same sliding window locally: numpy stitching and MONAI's inferer, both on the local OpenVINO backend."""
    numpy_logits = sliding_window_logits(triton_volume, (64, 64, 64), triton_local, channels=2, overlap=0.5,
                                         batch_size=4)
    inferer = SlidingWindowInferer((64, 64, 64), sw_batch_size=4, overlap=0.5, mode="gaussian")
    with torch.no_grad():
        run = lambda w: torch.from_numpy(triton_local(w.numpy()))  # noqa: E731
        monai_logits = inferer(torch.from_numpy(triton_volume)[None], run)[0]
    return numpy_logits, monai_logits.numpy()


@pytest.mark.slow
@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_volume_model_equals_local_sliding_window(triton_client, triton_volume, local_logits, protocol):
    with triton_client(protocol) as client:
        labels = client.infer("tiny_volume", triton_volume, "labels")
    assert labels.shape == triton_volume.shape[1:] and labels.dtype == np.uint8
    numpy_logits, monai_logits = local_logits
    np.testing.assert_array_equal(labels, numpy_logits.argmax(0))  # same stitching, same runtime: identical
    agreement = float((labels == monai_logits.argmax(0)).mean())
    assert agreement >= 0.999, agreement  # MONAI's inferer: identical up to float rounding on ties
    assert 0.05 < labels.mean() < 0.95  # both classes present: the comparison is not trivially true


@pytest.mark.slow
def test_volume_smaller_than_window_is_padded(triton_client, triton_local):
    vol = np.random.default_rng(3).standard_normal((1, 40, 70, 33)).astype(np.float32)
    with triton_client("http") as client:
        labels = client.infer("tiny_volume", vol, "labels", parameters={"overlap": 0.25})
    expected = sliding_window_logits(vol, (64, 64, 64), triton_local, channels=2, overlap=0.25).argmax(0)
    np.testing.assert_array_equal(labels, expected)


# -------------------------------------------------------------------------------- bad requests, same server
BAD_REQUESTS = [
    ("tiny_cpu", np.zeros((1, 1, 32, 32, 32), np.float32), None, "unexpected shape for input 'image'"),
    ("tiny_cpu", np.zeros((1, 1, 64, 64, 64), np.float64), None, "data-type is 'FP64', but model 'tiny_cpu' expects"),
    ("tiny_cpu", np.zeros((1, 3, 64, 64, 64), np.float32), None, "Expected [-1,1,64,64,64]"),
    ("tiny_cpu", np.full((1, 1, 64, 64, 64), np.inf, np.float32), None, "tiny_cpu: input 'image' contains NaN or Inf"),
    ("tiny_volume", np.full((1, 20, 20, 20), np.nan, np.float32), None, "contains NaN or Inf values"),
    ("tiny_volume", np.zeros((2, 20, 20, 20), np.float32), None, "unexpected shape for input 'image'"),
    ("tiny_volume", np.zeros((1, 20, 20, 20), np.float32), {"overlap": 1.5}, "overlap must be a number in [0, 1)"),
]


@pytest.mark.slow
@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize(("model", "array", "params", "message"), BAD_REQUESTS)
def test_bad_request_gets_clear_error_and_server_keeps_serving(
    triton_server, triton_client, protocol, model, array, params, message
):
    with triton_client(protocol, retries=0) as client:
        output = "logits" if model == "tiny_cpu" else "labels"
        with pytest.raises(ServingError) as err:
            client.infer(model, array, output, parameters=params)
        assert message in str(err.value)
        assert "\n" not in str(err.value)
        assert client.infer("tiny_volume", np.zeros((1, 8, 8, 8), np.float32), "labels").shape == (8, 8, 8)
    assert triton_server.running()


# --------------------------------------------------------------------------------------- integrity (sha256)
@pytest.mark.slow
def test_tampered_onnx_refuses_to_load_and_server_keeps_serving(triton_repo, tmp_path):
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    # its own server: the failed load leaves Triton reporting not ready (strict readiness, even after an unload),
    # which would break the session server's readiness checks in later tests
    srv = TritonServer(triton_repo, models=["tiny_cpu"], http_port=free_port(), grpc_port=free_port(),
                       metrics_port=free_port(), ready_timeout=120, log_path=tmp_path / "server.log")
    srv.start()
    client = httpclient.InferenceServerClient(srv.http_url)
    try:
        with pytest.raises(InferenceServerException, match="refusing to load: sha256 of .* but manifest.json says"):
            client.load_model("tampered_cpu")
        assert not client.is_model_ready("tampered_cpu")
        assert client.is_model_ready("tiny_cpu")
    finally:
        client.close()
        srv.stop()


@pytest.mark.slow
def test_server_start_fails_with_the_log_lines_when_a_model_cannot_load(triton_repo, tmp_path):
    srv = TritonServer(triton_repo, models=["tampered_cpu"], http_port=free_port(), grpc_port=free_port(),
                       metrics_port=free_port(), log_path=tmp_path / "server.log")
    with pytest.raises(ServingError, match=r"tritonserver exited .* refusing to load: sha256"):
        srv.start()
    assert not srv.running()


# -------------------------------------------------------------------------------------------- client checks
@pytest.mark.slow
@pytest.mark.parametrize(("model", "mode", "edit", "message"), [
    ("tiny_cpu", "window", {"window_size": [96, 96, 96]}, "input 'image': server has ('TYPE_FP32', [1, 64, 64, 64])"),
    ("tiny_cpu", "volume", {}, "volume models take one unbatched volume"),
    ("tiny_volume", "window", {}, "window models must be batched"),
])
def test_served_model_is_checked_against_the_manifest(triton_client, model, mode, edit, message):
    with triton_client("http") as client:
        spec = client.model_spec(model)
    assert spec.manifest is not None and spec.manifest["name"] == "tiny"
    manifest = json.loads(json.dumps(spec.manifest))
    if "window_size" in edit:
        manifest["input"]["shape"] = [-1, 1, *edit["window_size"]]
    with pytest.raises(ServingError, match="does not match export 'tiny'") as err:
        check_model(spec, manifest, mode)
    assert message in str(err.value)


@pytest.mark.slow
@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_timeout_is_retried_then_one_line(triton_client, protocol):
    x = np.zeros((1, 1, 64, 64, 64), np.float32)
    with triton_client(protocol, timeout=0.05, retries=1, backoff=0.0) as client, pytest.raises(ServingError) as err:
        client.infer("tiny_cpu", x, "logits")  # one window takes > 0.05 s on any CPU
    assert "inference on tiny_cpu" in str(err.value) and "timed out after 0.05 s (1 retries); raise --timeout" in str(
        err.value)


@pytest.mark.slow
def test_unknown_model_lists_the_loaded_ones(triton_client):
    with triton_client("grpc") as client, pytest.raises(ServingError, match="loaded: tiny_cpu, tiny_volume"):
        client.check_ready("nope")


# ------------------------------------------------------------------------------------------- CLI end to end
@pytest.fixture(scope="session")
def local_prediction(triton_export, triton_mri, triton_precision, tmp_path_factory):
    """`gmim predict`'s in-process OpenVINO backend at the served model's precision."""
    out = tmp_path_factory.mktemp("local") / "local_seg.nii.gz"
    predictor = Predictor.from_pretrained(None, backend="openvino", onnx_path=triton_export.onnx_path.parent,
                                          precision=triton_precision)
    predictor.predict_file(triton_mri, out)
    return np.asarray(nib.load(out).dataobj)


@pytest.mark.slow
@pytest.mark.parametrize(("mode", "protocol"), [("volume", "grpc"), ("window", "http")])
def test_gmim_infer_writes_input_geometry_and_matches_local_prediction(
    triton_server, triton_export, triton_mri, local_prediction, tmp_path, mode, protocol
):
    out = tmp_path / "served_seg.nii.gz"
    url = triton_server.http_url if protocol == "http" else triton_server.grpc_url
    result = CliRunner().invoke(app, [
        "infer", str(triton_mri), str(out), "--model", "tiny", "--url", url, "--protocol", protocol, "--mode", mode,
        "--concurrency", "2", "--manifest", str(triton_export.manifest_path)])
    assert result.exit_code == 0, result.output
    src, served = nib.load(triton_mri), nib.load(out)
    assert served.shape == src.shape
    np.testing.assert_allclose(served.affine, src.affine)
    agreement = float((np.asarray(served.dataobj) == local_prediction).mean())
    assert agreement >= 0.999, agreement


@pytest.mark.slow
def test_gmim_infer_sends_a_dicom_series_like_its_nifti(triton_server, triton_mri, local_prediction, tmp_path):
    """The same MRI as a DICOM series (rows along L, columns along A, slices stored top-down): the labels served
    back, compared in world space, are those of the NIfTI prediction."""
    src = nib.load(triton_mri)
    write_series(tmp_path / "series", np.asarray(src.dataobj), Layout("las", (1, 0, 0), (0, -1, 0), step=-2.0,
                                                                     pixel=(2.0, 2.0)))
    out = tmp_path / "served_seg.nii.gz"
    result = CliRunner().invoke(app, ["infer", str(tmp_path / "series"), str(out), "--model", "tiny", "--url",
                                      triton_server.grpc_url, "--protocol", "grpc"])
    assert result.exit_code == 0, result.output
    served = nib.as_closest_canonical(nib.load(out))
    local = nib.as_closest_canonical(nib.Nifti1Image(local_prediction, src.affine))
    assert served.shape == local.shape
    np.testing.assert_allclose(served.affine[:3, :3], local.affine[:3, :3])  # same grid (the origin is the series')
    agreement = float((np.asarray(served.dataobj) == np.asarray(local.dataobj)).mean())
    assert agreement >= 0.999, agreement


@pytest.mark.slow
def test_gmim_serve_starts_and_stops_gracefully_on_sigterm(triton_repo, tmp_path):
    ports = [str(free_port()) for _ in range(3)]
    cmd = [sys.executable, "-m", "gmim_hub.cli.main", "serve", str(triton_repo), "--models", "tiny_volume,tiny_cpu",
           "--http-port", ports[0], "--grpc-port", ports[1], "--metrics-port", ports[2],
           "--log-file", str(tmp_path / "server.log")]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines = []
        for line in proc.stdout:  # type: ignore[union-attr]
            lines.append(line)
            if "Ctrl-C to stop" in line:
                break
        assert urllib.request.urlopen(f"http://127.0.0.1:{ports[0]}/v2/health/ready", timeout=5).status == 200
        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    output = "".join(lines) + rest
    assert proc.returncode == 0, output
    assert f"http://127.0.0.1:{ports[0]}" in output and "tiny_volume" in output and "stopped" in output
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{ports[0]}/v2/health/ready", timeout=2)


def test_serve_errors_are_one_line(triton_repo, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        busy = s.getsockname()[1]
        with pytest.raises(ServingError, match=f"http port {busy} on 127.0.0.1 is in use"):
            TritonServer(triton_repo, models=["tiny_cpu"], http_port=busy).start()
    with pytest.raises(ServingError, match="model repository .* not found; write one with `gmim export triton`"):
        TritonServer(tmp_path / "missing")
    with pytest.raises(ServingError, match="model\\(s\\) nope not in .*available: tampered_cpu, tiny_cpu, tiny_volume"):
        TritonServer(triton_repo, models=["nope"])
    with pytest.raises(ServingError, match="model\\(s\\) tiny need a backend this CPU-only server lacks"):
        TritonServer(triton_repo, models=["tiny", "tiny_cpu"])
