"""Property-based fuzzing of `gmim predict` with NIfTI files whose header and data are mutated at random (issue 12).

Each example is a single-file NIfTI-1 written byte by byte (so nibabel cannot tidy the header on save): a valid 3-D
volume (random size 2-24 per axis, voxel sizes, uint8/int16/float32 data, sform code 1) with 0-3 random mutations:
dims (1-D to 5-D, sizes 1-24), pixdim (0, negative, tiny, huge, NaN, Inf), datatype (ints, floats, complex, RGB),
scl_slope / scl_inter (0, NaN, Inf, huge), qform (codes, NaN quaternions), sform (codes, singular, sheared, NaN),
voxel values (NaN, Inf, 1e38), truncation; gzipped or not. Each goes through the real CLI with a tiny saved model.

The property: exit code 0 with a complete label map on the input's grid, or exit code 2 with exactly one `error:`
line; never a traceback, never a hang (pytest-timeout), never a partial output, and the input stays byte-identical.
A second property sends random tensors straight to the Triton volume model of a real local server (shapes 1-40
per axis with 1-2 channels, five dtypes, NaN/Inf/huge values, odd `overlap` parameters): labels of the right shape
or one `ServingError` line, and the server still answers afterwards. The example counts are bounded and the seed
fixed (`derandomize`), so CI runs the same examples every time; the counts are printed (`pytest -s`).
"""

from __future__ import annotations

import gzip
import struct
from collections import Counter
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from gmim_hub import PRESETS, ServingError
from gmim_hub.cli.main import app
from gmim_hub.models.hub_models import GMIMForSegmentation

pytest_plugins = ["conftest_triton"]
hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

runner = CliRunner(env={"COLUMNS": "250", "GMIM_MAX_MEMORY_GB": "0.02"})  # big resampled grids are refused fast
MAX_EXAMPLES = 30
RUN: dict[str, int] = {"examples": 0, "ok": 0, "refused": 0, "server_examples": 0, "server_refused": 0}

DTYPES = {2: np.uint8, 4: np.int16, 8: np.int32, 16: np.float32, 64: np.float64, 256: np.int8, 512: np.uint16,
          32: np.complex64, 128: np.dtype([("r", "u1"), ("g", "u1"), ("b", "u1")])}
ODD = [0.0, -1.0, 1e-4, 1e4, float("nan"), float("inf")]
MUTATIONS = ["dims", "pixdim", "datatype", "scaling", "qform", "sform", "values", "truncate"]
MESSAGES: Counter[str] = Counter()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    return GMIMForSegmentation(PRESETS["tiny"]).save_pretrained(tmp_path_factory.mktemp("fuzz") / "tiny")


@st.composite
def niftis(draw) -> bytes:
    """A valid 3-D volume (random size, voxel sizes, int or float data, sform-coded), then 0-3 random mutations."""
    mutations = draw(st.lists(st.sampled_from(MUTATIONS), max_size=3))
    shape: tuple[int, ...] = tuple(draw(st.integers(2, 24)) for _ in range(3))
    if "dims" in mutations:
        shape = tuple(draw(st.lists(st.sampled_from([1, 2, 3, 24]), min_size=1, max_size=5)))
    code = draw(st.sampled_from(sorted(DTYPES) if "datatype" in mutations else [2, 4, 16]))
    dtype = np.dtype(DTYPES[code])
    zooms = [draw(st.sampled_from(ODD if "pixdim" in mutations else [0.5, 1.0, 2.0, 3.0])) for _ in range(3)]
    hdr = nib.Nifti1Header()
    hdr["dim"][0] = len(shape)
    hdr["dim"][1 : len(shape) + 1] = shape
    hdr["datatype"], hdr["bitpix"] = code, dtype.itemsize * 8
    hdr["pixdim"][1:4] = zooms
    hdr["scl_slope"], hdr["scl_inter"] = 1.0, 0.0
    if "scaling" in mutations:
        hdr["scl_slope"] = draw(st.sampled_from([0.0, -1.0, 2.5, float("nan"), float("inf"), 1e30]))
        hdr["scl_inter"] = draw(st.sampled_from([0.0, -1000.0, float("nan"), 1e30]))
    srow = np.diag(zooms).astype(np.float32)
    hdr["qform_code"], hdr["sform_code"] = 0, 1
    if "qform" in mutations:
        hdr["qform_code"] = draw(st.integers(0, 4))
        hdr["quatern_b"], hdr["quatern_c"], hdr["quatern_d"] = (draw(st.sampled_from([0.0, 0.3, 1.0, float("nan")]))
                                                                for _ in range(3))
    if "sform" in mutations:
        hdr["sform_code"] = draw(st.integers(0, 4))
        srow = np.diag([draw(st.sampled_from(ODD + [1.0])) for _ in range(3)]).astype(np.float32)
        srow[0, 1] = draw(st.sampled_from([0.0, 0.5, 2.0]))  # shear
    for i, key in enumerate(("srow_x", "srow_y", "srow_z")):
        hdr[key] = [*srow[i], -40.0]
    hdr["vox_offset"] = 352
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    values = rng.normal(50.0, 30.0, size=int(np.prod(shape)) * (3 if code == 128 else 1))
    if "values" in mutations and np.issubdtype(dtype, np.inexact):
        values[:: draw(st.integers(1, 50))] = draw(st.sampled_from([float("nan"), float("inf"), 1e38]))
    data = values.astype(np.uint8).tobytes() if code == 128 else values.astype(dtype).tobytes()
    blob = hdr.binaryblock + struct.pack("<4b", 0, 0, 0, 0) + data
    if "truncate" in mutations:
        blob = blob[: draw(st.integers(0, len(blob)))]
    return gzip.compress(blob, mtime=0) if draw(st.booleans()) else blob


@pytest.mark.timeout(900)
@settings(max_examples=MAX_EXAMPLES, derandomize=True, deadline=None, database=None,
          suppress_health_check=list(HealthCheck))
@given(blob=niftis())
def test_any_nifti_gives_labels_or_one_error_line(blob: bytes, model_dir: Path, tmp_path_factory) -> None:
    folder = tmp_path_factory.mktemp("case")
    src = folder / ("in.nii.gz" if blob[:2] == b"\x1f\x8b" else "in.nii")
    src.write_bytes(blob)
    out = folder / "out" / "seg.nii.gz"
    result = runner.invoke(app, ["predict", str(src), str(out), "--model", str(model_dir), "--device", "cpu",
                                 "--overlap", "0"])
    RUN["examples"] += 1
    assert "Traceback" not in result.output, result.output
    assert result.exit_code in (0, 2), (result.exit_code, result.output, repr(result.exception))
    assert src.read_bytes() == blob
    if result.exit_code == 2:
        RUN["refused"] += 1
        lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
        MESSAGES[" ".join(lines[0].replace(str(src), "IN").split()[:6])] += 1
        assert not out.parent.exists() or not any(out.parent.iterdir())
    else:
        RUN["ok"] += 1
        assert nib.load(out).shape[:3] == nib.load(src).shape[:3]
        assert sorted(p.name for p in out.parent.iterdir()) == ["seg.nii.gz"]


@st.composite
def requests(draw) -> tuple[np.ndarray, dict]:
    shape = (draw(st.sampled_from([1, 1, 1, 2])), *(draw(st.integers(1, 40)) for _ in range(3)))
    dtype = draw(st.sampled_from([np.float32] * 4 + [np.float64, np.float16, np.int32, np.uint8]))
    fill = draw(st.sampled_from([0.0, 1.0, -1000.0, 1e30, float("nan"), float("inf")]))
    with np.errstate(over="ignore"):  # 1e30 overflows float16 to inf: one more odd value
        arr = np.full(shape, fill if np.issubdtype(dtype, np.floating) else 7, dtype=dtype)
    arr.reshape(-1)[:: draw(st.integers(1, 7))] = draw(st.sampled_from([0.5, 3.0, -2.0]))
    overlap = draw(st.sampled_from([0.5, 0.5, 0.0, 0.99, 1.0, -0.1, "half", float("nan")]))
    return arr, {"overlap": overlap}


@pytest.mark.slow
@pytest.mark.timeout(900)
@settings(max_examples=MAX_EXAMPLES // 2, derandomize=True, deadline=None, database=None,
          suppress_health_check=list(HealthCheck))
@given(request=requests())
def test_the_volume_model_answers_any_tensor_or_one_error(request: tuple[np.ndarray, dict], triton_server,
                                                          triton_client) -> None:
    arr, params = request
    RUN["server_examples"] += 1
    with triton_client("http", retries=0, timeout=120) as client:
        try:
            labels = client.infer("tiny_volume", arr, "labels", parameters=params)
        except ServingError as e:
            RUN["server_refused"] += 1
            assert "\n" not in str(e), str(e)
            MESSAGES["server: " + " ".join(w for w in str(e).split() if "request" not in w and "id" not in w)[:70]] += 1
        else:
            assert labels.shape == arr.shape[1:] and labels.dtype == np.uint8
        assert client.infer("tiny_volume", np.ones((1, 8, 8, 8), np.float32), "labels").shape == (8, 8, 8)
    assert triton_server.running()


def test_the_fuzzing_ran() -> None:
    """Runs after the properties (file order): reports and checks the number of examples each ran."""
    if not RUN["examples"] and not RUN["server_examples"]:
        pytest.skip("reports on the two properties above; run it with them")
    print(f"\nNIfTI fuzzing: {RUN['examples']} examples, {RUN['ok']} predicted, {RUN['refused']} refused in one line; "
          f"Triton volume model: {RUN['server_examples']} requests, {RUN['server_refused']} refused in one line")
    for message, n in MESSAGES.most_common():
        print(f"  {n:3d} x {message} ...")
    assert RUN["examples"] in (0, *range(MAX_EXAMPLES // 2, 10 * MAX_EXAMPLES))
    assert RUN["server_examples"] in (0, *range(MAX_EXAMPLES // 4, 10 * MAX_EXAMPLES))
