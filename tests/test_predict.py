"""`gmim predict` and `Predictor`: geometry survives prediction, backends agree on a real volume, bad inputs fail in
one line without leaving files behind."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from gmim_hub import PRESETS, ConfigError, DataConfig, InputError
from gmim_hub.cli.main import app
from gmim_hub.export.onnx import export_onnx
from gmim_hub.inference import Predictor, TorchBackend
from gmim_hub.inference.openvino_backend import openvino_bf16_supported
from gmim_hub.models.hub_models import GMIMForSegmentation

# A non-RAS, anisotropic, oddly sized grid: voxel axes point to -Y, +Z, -X (orientation "PSL"), spacings 0.8, 1.3 and
# 2.1 mm, 37 x 51 x 29 voxels: any missed flip, transposition or zoom in the inverse moves or reshapes the output.
ODD_SHAPE = (37, 51, 29)
ODD_AFFINE = np.array([[0.0, 0.0, -2.1, 40.0], [-0.8, 0.0, 0.0, 30.0], [0.0, 1.3, 0.0, -20.0], [0, 0, 0, 1]])
BLOB_VOXEL = np.array([12, 30, 9])  # off-centre on every axis
BLOB_RADIUS_MM = 8.0


def _blob_volume() -> tuple[np.ndarray, np.ndarray]:
    """(image with a bright sphere on faint noise, the sphere's mask), both (37, 51, 29)."""
    ijk = np.stack(np.meshgrid(*[np.arange(s) for s in ODD_SHAPE], indexing="ij"), -1).astype(float)
    world = ijk @ ODD_AFFINE[:3, :3].T + ODD_AFFINE[:3, 3]
    centre = ODD_AFFINE[:3, :3] @ BLOB_VOXEL + ODD_AFFINE[:3, 3]
    mask = np.linalg.norm(world - centre, axis=-1) < BLOB_RADIUS_MM
    noise = np.random.default_rng(0).uniform(0.0, 0.1, ODD_SHAPE)
    return (noise + 0.9 * mask).astype(np.float32), mask


class ThresholdNet(torch.nn.Module):
    """A model with a known answer: class 1 where the normalised intensity is above 0.5. It makes the geometry
    test exact (labels must land on the blob) while the real pipeline (transforms, sliding window, inverse) runs."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([0.5 - x, x - 0.5], dim=1)


def _save(path: Path, data: np.ndarray, affine: np.ndarray = ODD_AFFINE) -> Path:
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return path


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    return GMIMForSegmentation(PRESETS["tiny"]).save_pretrained(tmp_path_factory.mktemp("m") / "tiny")


@pytest.fixture(scope="module")
def mni(tmp_path_factory):
    """The real MNI152 T1 template at 2 mm (ships with nilearn), a seeded tiny model that resamples it to 3 mm
    (66 x 78 x 63: 2 x 2 x 1 windows of 64 at overlap 0.25, few enough for a CPU test), and its ONNX export."""
    from nilearn.datasets import load_mni152_template

    root = tmp_path_factory.mktemp("mni")
    image = load_mni152_template(resolution=2)
    path = root / "mni152_2mm.nii.gz"
    nib.save(nib.Nifti1Image(np.asarray(image.dataobj, dtype=np.float32), image.affine), str(path))
    cfg = dataclasses.replace(PRESETS["tiny"], data=DataConfig(spacing=(3.0, 3.0, 3.0)))
    torch.manual_seed(1)
    model_dir = GMIMForSegmentation(cfg).save_pretrained(root / "tiny_mni")
    export = export_onnx(model_dir, root / "export", max_batch=2)
    return path, model_dir, export.onnx_path.parent


def _mni_labels(mni, out: Path, **kwargs) -> np.ndarray:
    path, model_dir, _ = mni
    kwargs.setdefault("backend", "torch")
    predictor = Predictor.from_pretrained(model_dir, overlap=0.25, device="cpu", **kwargs)
    return np.asarray(nib.load(str(predictor.predict_file(path, out)[0])).dataobj)


@pytest.fixture(scope="module")
def mni_fp32(mni, tmp_path_factory) -> np.ndarray:
    return _mni_labels(mni, tmp_path_factory.mktemp("fp32") / "torch_seg.nii.gz", precision="fp32")


# ------------------------------------------------------------------------------------------------------ geometry
def test_cli_output_has_input_shape_and_affine(tiny_dir, tmp_path):
    image, _ = _blob_volume()
    src = _save(tmp_path / "odd.nii.gz", image)
    out = tmp_path / "out" / "odd_seg.nii.gz"
    result = CliRunner().invoke(app, ["predict", str(src), str(out), "--model", str(tiny_dir), "--device", "cpu",
                                      "--probabilities"])
    assert result.exit_code == 0, result.output
    labels, probs = nib.load(str(out)), nib.load(str(tmp_path / "out" / "odd_prob.nii.gz"))
    assert labels.shape == ODD_SHAPE and labels.get_data_dtype() == np.uint8
    assert np.allclose(labels.affine, ODD_AFFINE, atol=1e-5) and np.allclose(probs.affine, ODD_AFFINE, atol=1e-5)
    assert set(np.unique(np.asarray(labels.dataobj))) <= {0, 1}
    assert probs.shape == (*ODD_SHAPE, 2) and probs.get_data_dtype() == np.float32
    assert np.allclose(np.asarray(probs.dataobj).sum(-1), 1.0, atol=1e-4)
    assert sorted(p.name for p in out.parent.iterdir()) == ["odd_prob.nii.gz", "odd_seg.nii.gz"]


@pytest.mark.parametrize("multi_label", [False, True])
def test_labels_land_on_the_content(tmp_path, multi_label):
    cfg = dataclasses.replace(PRESETS["tiny"], data=DataConfig(intensity="minmax", multi_label=multi_label))
    image, blob = _blob_volume()
    src = _save(tmp_path / "blob.nii.gz", image)
    predictor = Predictor(cfg, TorchBackend(ThresholdNet(), device="cpu"), sw_batch_size=1)
    calls: list[tuple[int, int]] = []
    written = predictor.predict_file(src, tmp_path / "blob_seg.nii.gz", probabilities=True,
                                     progress=lambda done, total: calls.append((done, total)))
    labels = np.asarray(nib.load(str(written[0])).dataobj)
    if multi_label:  # one 0/1 channel per label, (X, Y, Z, K): here channel 1 is the blob, channel 0 the rest
        assert labels.shape == (*ODD_SHAPE, 2)
        assert np.array_equal(labels[..., 0], 1 - labels[..., 1])
        labels = labels[..., 1]
    dice = 2 * np.sum((labels == 1) & blob) / (np.sum(labels == 1) + blob.sum())
    assert dice > 0.9
    centroid = np.argwhere(labels == 1).mean(0)
    assert np.abs(centroid - BLOB_VOXEL).max() < 1.0
    # windows over the 1 mm grid of the 30 x 66 x 61 mm field of view, each reported once, ending at the total
    assert calls[-1][0] == calls[-1][1] == len(calls) == predictor.count_windows((30, 66, 61)) == 2


def test_folder_in_folder_out(tiny_dir, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    rng = np.random.default_rng(0)
    for name in ("a.nii.gz", "b.nii"):
        _save(src / name, rng.normal(size=(20, 24, 18)).astype(np.float32), np.diag([1.5, 1.5, 1.5, 1.0]))
    (src / "notes.txt").write_text("ignored")
    result = CliRunner().invoke(app, ["predict", str(src), str(tmp_path / "out"), "--model", str(tiny_dir),
                                      "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a_seg.nii.gz", "b_seg.nii.gz"]
    assert nib.load(str(tmp_path / "out" / "b_seg.nii.gz")).shape == (20, 24, 18)


# ------------------------------------------------------------------------------------------------------ backends
def test_torch_and_onnxruntime_agree_on_a_real_volume(mni, mni_fp32, tmp_path):
    onnx_labels = _mni_labels(mni, tmp_path / "onnx_seg.nii.gz", backend="onnx", onnx_path=mni[2])
    assert mni_fp32.shape == onnx_labels.shape == (99, 117, 95)
    assert 0.05 < np.mean(mni_fp32) < 0.95  # not a trivial one-class map
    assert np.mean(mni_fp32 == onnx_labels) >= 0.999


def test_bf16_runs_and_agrees_with_fp32(mni, mni_fp32, tmp_path):
    bf16 = _mni_labels(mni, tmp_path / "bf16_seg.nii.gz", precision="bf16")
    assert np.mean(mni_fp32 == bf16) >= 0.95


def test_fast_backend_agrees_with_torch_on_a_real_volume(mni, mni_fp32, tmp_path):
    fast32 = _mni_labels(mni, tmp_path / "fast32_seg.nii.gz", backend="fast", precision="fp32")
    assert np.mean(mni_fp32 == fast32) >= 0.999  # the same function; only summation order differs
    fast16 = _mni_labels(mni, tmp_path / "fast16_seg.nii.gz", backend="fast", precision="bf16")
    assert np.mean(mni_fp32 == fast16) >= 0.95


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_openvino_agrees_with_torch_fp32_and_keeps_the_geometry(mni, mni_fp32, tmp_path, precision):
    """fp32 from the model folder (exported once into the cache), bf16 from the ONNX export given with onnx_path."""
    pytest.importorskip("openvino")
    from gmim_hub.inference.openvino_backend import openvino_bf16_supported

    if precision == "bf16" and not openvino_bf16_supported():
        pytest.skip("the OpenVINO CPU plugin lists no BF16 on this CPU")
    extra = {"onnx_path": mni[2]} if precision == "bf16" else {}
    labels = _mni_labels(mni, tmp_path / "ov_seg.nii.gz", backend="openvino", precision=precision, **extra)
    out, src = nib.load(str(tmp_path / "ov_seg.nii.gz")), nib.load(str(mni[0]))
    assert labels.shape == mni_fp32.shape == src.shape and np.array_equal(out.affine, src.affine)
    assert np.mean(mni_fp32 == labels) >= (0.999 if precision == "fp32" else 0.99)


# ------------------------------------------------------------------------------------- one-value windows reused
class _CountingRunner:
    """A window runner whose output depends on every input voxel of each window on its own (so reusing the logits
    of a window that is not identical gives different numbers), counting the windows it computes."""

    def __init__(self) -> None:
        self.computed = 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.computed += int(x.shape[0])
        pooled = torch.nn.functional.avg_pool3d(x, 3, stride=1, padding=1)
        return torch.cat([x.sum(1, keepdim=True) - pooled.mean(1, keepdim=True), pooled[:, :1] * 2.0], dim=1)


def test_one_value_windows_are_computed_once_with_the_same_logits():
    from gmim_hub.inference.predictor import CONSTANT_WINDOW_CACHE, run_reusing_constant_windows

    g = torch.Generator().manual_seed(0)
    noise = torch.rand(2, 8, 8, 8, generator=g)
    half = torch.stack([torch.full((8, 8, 8), 0.25), noise[1]])  # channel 0 constant, channel 1 not: computed
    zeros, minus = torch.zeros(2, 8, 8, 8), torch.full((2, 8, 8, 8), -1.5)
    mixed = torch.stack([torch.full((8, 8, 8), -1.5), torch.zeros(8, 8, 8)])  # one value per channel, two values
    batches = [torch.stack([zeros, noise, zeros, half]), torch.stack([minus, zeros, mixed, mixed]),
               torch.stack([zeros, minus])]
    runner, cache, computed = _CountingRunner(), {}, []
    for batch in batches:
        out, n = run_reusing_constant_windows(runner, batch, cache)
        assert torch.equal(out, _CountingRunner()(batch))  # bit for bit what computing every window gives
        computed.append(n)
    # batch 1: zeros once (its second copy reused), noise, half; batch 2: minus, mixed once; batch 3: all reused
    assert computed == [3, 2, 0] and runner.computed == 5
    assert sorted(cache) == [(-1.5, -1.5), (-1.5, 0.0), (0.0, 0.0)] and len(cache) <= CONSTANT_WINDOW_CACHE


def test_reusing_one_value_windows_changes_no_label_on_a_real_volume(mni, tmp_path):
    """The MNI152 head in a field of view twice its size along x, padded with zeros (as air around a head or body
    is in many scans): the zero windows are computed once, and the labels equal those of computing every window.
    One window per call (sw_batch_size=1), so each window's logits do not depend on the batch it came in."""
    path, model_dir, _ = mni
    img = nib.load(str(path))
    data = np.asarray(img.dataobj, dtype=np.float32)
    padded = np.zeros((data.shape[0] * 2, *data.shape[1:]), np.float32)
    padded[: data.shape[0]] = data
    src = _save(tmp_path / "wide.nii.gz", padded, img.affine)
    predictor = Predictor.from_pretrained(model_dir, overlap=0.25, device="cpu", backend="torch", sw_batch_size=1)
    reused = np.asarray(nib.load(str(predictor.predict_file(src, tmp_path / "reused.nii.gz")[0])).dataobj)
    stats = predictor.window_stats
    predictor.reuse_constant_windows = False
    every = np.asarray(nib.load(str(predictor.predict_file(src, tmp_path / "every.nii.gz")[0])).dataobj)
    assert predictor.window_stats["computed"] == predictor.window_stats["windows"] == stats["windows"]
    assert stats["reused"] > 0 and stats["computed"] + stats["reused"] == stats["windows"]
    assert np.array_equal(reused, every)


def test_cli_compute_every_window_gives_the_same_labels(tiny_dir, tmp_path):
    image = np.zeros((80, 40, 40), np.float32)
    image[:30] = _blob_volume()[0][:30, :40, :29].mean()  # a flat block and air: windows of one value only
    image[5:25, 10:30, 10:30] += np.random.default_rng(3).uniform(0, 1, (20, 20, 20)).astype(np.float32)
    src = _save(tmp_path / "block.nii.gz", image, np.eye(4))
    outs = []
    for extra in ([], ["--compute-every-window"]):
        out = tmp_path / f"out{len(outs)}.nii.gz"
        result = CliRunner().invoke(app, ["predict", str(src), str(out), "--model", str(tiny_dir), "--device", "cpu",
                                          "--backend", "torch", "--sw-batch-size", "1", *extra])
        assert result.exit_code == 0, result.output
        outs.append(np.asarray(nib.load(str(out)).dataobj))
    assert np.array_equal(outs[0], outs[1])


def test_cli_default_backend_follows_the_documented_rule(tiny_dir, tmp_path):
    """auto on the CPU: OpenVINO (installed with the cpu extra), bf16 where its CPU plugin lists BF16."""
    src = _save(tmp_path / "in.nii.gz", np.random.default_rng(0).normal(size=(20, 20, 20)).astype(np.float32))
    result = CliRunner().invoke(app, ["predict", str(src), str(tmp_path / "seg.nii.gz"), "--model", str(tiny_dir),
                                      "--device", "cpu", "--threads", "2"])
    assert result.exit_code == 0, result.output
    expected = f"(openvino backend, {'bf16' if openvino_bf16_supported() else 'fp32'})"
    assert expected in result.stdout


# ---------------------------------------------------------------------------------------------------- bad input
def _truncated(path: Path) -> Path:
    full = _save(path.with_name("full.nii.gz"), np.random.default_rng(0).normal(size=(40, 40, 40)).astype("f4"))
    data = full.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    full.unlink()
    return path


BAD_INPUTS = {
    "2d": (lambda p: _save(p, np.zeros((30, 40), np.float32)), "is 2-D (shape 30x40); gmim predict needs a 3-D"),
    "channels": (lambda p: _save(p, np.zeros((20, 20, 20, 2), np.float32)),
                 "has 2 channel(s) but the model expects 1"),
    "nan": (lambda p: _save(p, np.where(np.arange(8000).reshape(20, 20, 20) % 1000 == 0, np.nan, 1.0)
                            .astype(np.float32)), "contains 8 non-finite voxels (NaN or Inf)"),
    "truncated": (_truncated, "the file is truncated or corrupt"),
    "text": (lambda p: p.write_text("patient: 12\n") and p, "is not a readable NIfTI file"),
}


@pytest.mark.parametrize("kind", sorted(BAD_INPUTS))
def test_bad_input_is_one_line_and_leaves_no_file(tiny_dir, tmp_path, kind):
    make, message = BAD_INPUTS[kind]
    src = make(tmp_path / "in.nii.gz")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    result = CliRunner().invoke(app, ["predict", str(src), str(out_dir / "x_seg.nii.gz"), "--model",
                                      str(tiny_dir), "--device", "cpu", "--probabilities"])
    assert result.exit_code == 2
    assert message in result.stderr and str(src) in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.output
    assert list(out_dir.iterdir()) == []  # neither outputs nor temporary files


def test_existing_output_needs_overwrite(tiny_dir, tmp_path):
    src = _save(tmp_path / "in.nii.gz", np.random.default_rng(0).normal(size=(20, 20, 20)).astype(np.float32))
    out = tmp_path / "in_seg.nii.gz"
    out.write_bytes(b"precious")
    args = ["predict", str(src), str(out), "--model", str(tiny_dir), "--device", "cpu"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and "already exists; pass --overwrite" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and out.read_bytes() == b"precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.nii.gz", "in_seg.nii.gz"]
    assert CliRunner().invoke(app, [*args, "--overwrite"]).exit_code == 0
    assert nib.load(str(out)).shape == (20, 20, 20)


@pytest.mark.parametrize("image, message", [
    (np.zeros((32, 32)), "expected a 3-D volume"),
    (np.zeros((3, 16, 16, 16)), "has 3 channel(s) but the model expects 1"),
    (np.full((16, 16, 16), np.inf), "contains 4096 non-finite voxels"),
])
def test_predict_volume_rejects_bad_arrays(image, message):
    predictor = Predictor(PRESETS["tiny"], TorchBackend(ThresholdNet(), device="cpu"))
    with pytest.raises(InputError, match=re.escape(message)):
        predictor.predict_volume(image, np.eye(4))


@pytest.mark.parametrize("kwargs, message", [
    ({"backend": "onnx", "precision": "bf16", "onnx_path": "x"}, "applies to the torch, fast and openvino backends only"),
    ({"backend": "tensorflow"}, "backend must be one of auto, torch, fast, onnx, openvino; got 'tensorflow'"),
    ({"backend": "openvino", "source": None}, "the openvino backend needs a model"),
    ({"threads": 0}, r"threads must be >= 1 \(CPU threads\), got 0"),
    ({"overlap": 1.0}, r"overlap must be in \[0, 1\)"),
    ({"sw_batch_size": 0}, "sw_batch_size must be >= 1"),
    ({"precision": "fp16"}, "precision must be one of auto, fp32, bf16; got 'fp16'"),
    ({"backend": "fast", "source": None}, "the fast backend needs a model"),
])
def test_predictor_option_errors(tiny_dir, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        Predictor.from_pretrained(kwargs.pop("source", tiny_dir), device="cpu", **kwargs)


@pytest.mark.parametrize("output, message", [
    ("out.png", "must end in .nii.gz, .nii, .nrrd, .mha or .dcm"),
])
def test_bad_output_name(tiny_dir, tmp_path, output, message):
    src = _save(tmp_path / "in.nii.gz", np.zeros((20, 20, 20), np.float32))
    result = CliRunner().invoke(app, ["predict", str(src), str(tmp_path / output), "--model", str(tiny_dir)])
    assert result.exit_code == 2 and message in result.stderr


def test_missing_input_and_folder_to_file(tiny_dir, tmp_path):
    missing = CliRunner().invoke(app, ["predict", str(tmp_path / "nope.nii.gz"), str(tmp_path / "o.nii.gz"),
                                       "--model", str(tiny_dir)])
    assert missing.exit_code == 2 and "does not exist" in missing.stderr
    (tmp_path / "in").mkdir()
    _save(tmp_path / "in" / "a.nii.gz", np.zeros((20, 20, 20), np.float32))
    (tmp_path / "taken.nii.gz").write_bytes(b"x")
    to_file = CliRunner().invoke(app, ["predict", str(tmp_path / "in"), str(tmp_path / "taken.nii.gz"),
                                       "--model", str(tiny_dir)])
    assert to_file.exit_code == 2 and "OUTPUT must be a folder" in to_file.stderr
