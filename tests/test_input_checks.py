"""What a model was trained on travels with it, and prediction says when an input is far outside it (issue 12).

`gmim train` (2 steps on the embedded MNI152 T1 tissue task, 4 mm) records the modality and the training images'
intensity statistics in config.json and the model card. A CT-range head volume made from the same nilearn data
(air -1000 HU outside the head, soft tissue 30-45 HU inside) then gets one warning line from `gmim predict`, and an
exit-2 error with `--strict-input`; the MRI it was trained on gets neither.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from gmim_hub.cli.main import app
from gmim_hub.config import GMIMConfig, IntensityReference
from gmim_hub.intensity import compare, describe

pytest.importorskip("nilearn")
runner = CliRunner(env={"COLUMNS": "250"})


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(demo dataset, trained model folder): `gmim train` from scratch, 2 steps, 4 mm, ROI (64, 32, 32)."""
    from gmim_hub.data import build_demo_dataset, demo_config

    root = tmp_path_factory.mktemp("ref")
    demo = build_demo_dataset(root / "data")
    base = demo_config()
    cfg = dataclasses.replace(base, roi_size=(64, 32, 32), data=dataclasses.replace(base.data, spacing=(4.0,) * 3))
    cfg.to_json_file(root / "cfg.json")
    result = runner.invoke(app, ["train", "--data", str(demo.dataset_json), "--config", str(root / "cfg.json"),
                                 "--output", str(root / "run"), "--steps", "2", "--num-samples", "1", "--val-every",
                                 "0", "--device", "cpu", "--overlap", "0"])
    assert result.exit_code == 0, result.output
    return demo, root / "run" / "model"


def _ct_like(mri: Path, out: Path) -> Path:
    """A head CT's intensity range on the MRI's grid: -1000 HU (air) outside the head, 30-45 HU inside."""
    img = nib.load(mri)
    t1 = np.asarray(img.dataobj, np.float32)
    hu = np.where(t1 > 0, 30.0 + 15.0 * t1 / t1.max(), -1000.0).astype(np.float32)
    nib.save(nib.Nifti1Image(hu, img.affine), out)
    return out


def test_train_records_the_training_data_in_config_and_card(trained):
    demo, model = trained
    cfg = GMIMConfig.from_json_file(model / "config.json")
    ref = cfg.data.reference
    assert cfg.data.modality == "MRI" and ref is not None and ref.volumes >= 1
    assert ref.negative_fraction == 0.0 and 0.05 < ref.foreground_fraction < 0.6  # a skull-stripped T1
    assert abs(ref.mean) < 0.1 and abs(ref.std - 1.0) < 0.1  # z-scored foreground, as the network sees it
    assert json.loads((model / "config.json").read_text())["data"]["reference"]["volumes"] == ref.volumes
    assert "| training intensities | " in (model / "README.md").read_text()


def test_a_ct_gets_one_warning_line_and_strict_input_refuses_it(trained, tmp_path):
    demo, model = trained
    ct = _ct_like(demo.val_image, tmp_path / "ct.nii.gz")
    before = ct.read_bytes()
    result = runner.invoke(app, ["predict", str(ct), str(tmp_path / "seg.nii.gz"), "--model", str(model),
                                 "--device", "cpu"])
    assert result.exit_code == 0, result.output
    warnings = [ln for ln in result.stderr.splitlines() if ln.startswith("warning:")]
    assert len(warnings) == 1, result.stderr
    assert "does not look like the model's training data (MRI" in warnings[0]
    assert "0% of voxels negative expected" in warnings[0] and "--strict-input makes this an error" in warnings[0]
    assert (tmp_path / "seg.nii.gz").is_file()

    strict = runner.invoke(app, ["predict", str(ct), str(tmp_path / "strict.nii.gz"), "--model", str(model),
                                 "--device", "cpu", "--strict-input"])
    assert strict.exit_code == 2, strict.output
    lines = [ln for ln in strict.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "pass a MRI volume like the training" in lines[0]
    assert not (tmp_path / "strict.nii.gz").exists() and ct.read_bytes() == before


def test_the_training_mri_gets_no_warning(trained, tmp_path):
    demo, model = trained
    result = runner.invoke(app, ["predict", str(demo.val_image), str(tmp_path / "seg.nii.gz"), "--model",
                                 str(model), "--device", "cpu", "--strict-input"])
    assert result.exit_code == 0, result.output
    assert "warning" not in result.stderr


def test_comparison_is_scale_free_for_mri():
    """Another scanner's arbitrary MRI scale (x40) is not 'far outside'; a sign flip of most voxels is."""
    from gmim_hub.data import demo_config

    rng = np.random.default_rng(0)
    t1 = np.where(rng.random((1, 40, 40, 40)) < 0.3, rng.gamma(9.0, 0.05, (1, 40, 40, 40)), 0.0).astype(np.float32)
    data = demo_config().data
    ref = describe([t1], data)
    assert isinstance(ref, IntensityReference) and ref.negative_fraction == 0.0
    assert compare(ref, describe([t1 * 40.0], data), "MRI") is None
    assert compare(ref, describe([np.where(t1 > 0, t1, -1000.0)], data), "MRI") is not None
