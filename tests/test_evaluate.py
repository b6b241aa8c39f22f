"""Metrics (hard Dice, HD95 in mm, NaN conventions) and `gmim evaluate` on the embedded MNI152 demo data."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from typer.testing import CliRunner

from gmim_hub.cli.main import app
from gmim_hub.config import DataConfig, get_preset
from gmim_hub.engine import metrics as M
from gmim_hub.engine.evaluate import CaseResult, build_report, score_case
from gmim_hub.errors import ConfigError, InputError

runner = CliRunner(env={"COLUMNS": "250"})  # rich wraps at the terminal width; keep paths whole


def _labels(*boxes: tuple[int, slice, slice, slice], shape=(12, 12, 12)) -> torch.Tensor:
    """A (1, 1, *shape) class map with class k filled in each (k, box)."""
    lab = torch.zeros((1, 1, *shape), dtype=torch.long)
    for k, *box in boxes:
        lab[(0, 0, *box)] = k
    return lab


BOX1 = (1, slice(2, 6), slice(2, 6), slice(2, 6))
BOX2 = (2, slice(7, 11), slice(7, 11), slice(7, 11))


# --------------------------------------------------------------------------------------------------- Dice
def test_dice_perfect_prediction_is_one_and_background_excluded():
    gt = M.one_hot(_labels(BOX1, BOX2), 3)
    dice = M.dice_per_class(gt.clone(), gt, include_background=False)
    assert dice.shape == (1, 2)  # classes 1 and 2 only
    assert torch.equal(dice, torch.ones(1, 2))


def test_dice_disjoint_prediction_is_zero():
    gt = M.one_hot(_labels(BOX1), 2)
    pred = M.one_hot(_labels((1, slice(7, 11), slice(7, 11), slice(7, 11))), 2)
    assert M.dice_per_class(pred, gt, include_background=False).item() == 0.0


def test_dice_partial_overlap_matches_formula():
    gt = M.one_hot(_labels((1, slice(0, 4), slice(0, 4), slice(0, 4))), 2)  # 64 voxels
    pred = M.one_hot(_labels((1, slice(2, 6), slice(0, 4), slice(0, 4))), 2)  # 64 voxels, 32 shared
    assert M.dice_per_class(pred, gt, include_background=False).item() == pytest.approx(2 * 32 / 128)


def test_background_does_not_change_the_foreground_scores():
    """Class 1 perfect, but a stray background voxel predicted as class 2 (absent from the ground truth): class 1
    stays exactly 1, class 2 scores 0, and no background channel appears in the output."""
    gt = M.one_hot(_labels(BOX1), 3)
    pred = M.one_hot(_labels(BOX1, (2, slice(0, 1), slice(0, 1), slice(0, 1))), 3)
    with_bg = M.dice_per_class(pred, gt, include_background=True)
    without = M.dice_per_class(pred, gt, include_background=False)
    assert with_bg.shape == (1, 3) and without.shape == (1, 2)
    assert with_bg[0, 0].item() < 1.0
    assert without.tolist() == [[1.0, 0.0]]


def test_dice_nan_when_class_absent_from_both_and_zero_when_only_predicted():
    gt = M.one_hot(_labels(BOX1), 3)  # class 2 absent from the ground truth
    pred_absent = gt.clone()
    pred_false_pos = M.one_hot(_labels(BOX1, BOX2), 3)
    assert math.isnan(M.dice_per_class(pred_absent, gt, include_background=False)[0, 1].item())
    assert M.dice_per_class(pred_false_pos, gt, include_background=False)[0, 1].item() == 0.0


def test_nanmean_skips_undefined_values():
    assert M.nanmean([1.0, float("nan"), 0.5]) == 0.75
    assert math.isnan(M.nanmean([float("nan")]))
    assert math.isnan(M.nanmean([]))


def test_discretize_argmax_and_threshold():
    logits = torch.tensor([[0.1, 2.0, -1.0], [0.5, -3.0, 0.0]]).reshape(1, 2, 3, 1, 1)  # (B, C=2, 3 voxels)
    soft = M.discretize(logits, multi_label=False)
    assert soft[0, :, :, 0, 0].tolist() == [[0.0, 1.0, 0.0], [1.0, 0.0, 1.0]]  # one-hot of the argmax per voxel
    hard = M.discretize(logits, multi_label=True)  # sigmoid > 0.5 <=> logit > 0, per channel
    assert hard[0, :, :, 0, 0].tolist() == [[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]]


# --------------------------------------------------------------------------------------------------- HD95
@pytest.mark.parametrize("axis", [0, 1, 2])
def test_hd95_in_mm_with_anisotropic_spacing(axis):
    """Two full one-voxel planes 3 voxels apart along `axis`: every surface point is exactly 3 voxels from the
    other mask, so HD95 = 3 * spacing[axis] mm (and 3 without spacing)."""
    spacing = (2.0, 0.5, 0.7)
    gt = torch.zeros(1, 2, 10, 10, 10)
    pred = torch.zeros(1, 2, 10, 10, 10)
    gt[(0, 1, *[slice(4, 5) if a == axis else slice(None) for a in range(3)])] = 1
    pred[(0, 1, *[slice(7, 8) if a == axis else slice(None) for a in range(3)])] = 1
    gt[:, 0], pred[:, 0] = 1 - gt[:, 1], 1 - pred[:, 1]
    hd = M.hd95_per_class(pred, gt, spacing=spacing, include_background=False)
    assert hd.shape == (1, 1)
    assert hd.item() == pytest.approx(3 * spacing[axis])
    assert M.hd95_per_class(pred, gt, spacing=None, include_background=False).item() == pytest.approx(3.0)


def test_hd95_is_zero_for_a_perfect_prediction_and_nan_for_an_empty_mask():
    gt = M.one_hot(_labels(BOX1), 3)
    hd = M.hd95_per_class(gt, gt, spacing=(1.0, 1.0, 1.0), include_background=False)
    assert hd[0, 0].item() == 0.0
    assert math.isnan(hd[0, 1].item())  # class 2 empty in both


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: M.one_hot(torch.full((1, 1, 4, 4, 4), 5), 3), "label values must be in [0, 2] for 3 classes"),
        (lambda: M.one_hot(torch.zeros(1, 2, 4, 4, 4), 3), "a label map must be (B, 1, *spatial)"),
        (lambda: M.dice_per_class(torch.zeros(1, 2, 4, 4, 4), torch.zeros(1, 2, 4, 4, 2), include_background=False),
         "differ in shape"),
        (lambda: M.hd95_per_class(torch.zeros(1, 2, 4, 4, 4), torch.zeros(1, 2, 4, 4, 4), spacing=(1.0, 1.0),
                                  include_background=False), "spacing needs 3 values"),
        (lambda: M.target_masks(torch.zeros(1, 2, 4, 4, 4), 3, True), "a multi-label target needs 3 channels"),
    ],
)
def test_metric_input_errors(call, message):
    with pytest.raises(InputError, match=None) as e:
        call()
    assert message in str(e.value)


# -------------------------------------------------------------------------------------- cases and reports
def test_score_case_multi_label_scores_every_channel():
    cfg = dataclasses.replace(get_preset("tiny"), out_channels=3,
                              data=DataConfig(label_names=("TC", "WT", "ET"), multi_label=True))
    target = torch.zeros(1, 3, 8, 8, 8)
    target[0, 1, 2:6, 2:6, 2:6] = 1
    logits = torch.where(target > 0, 5.0, -5.0)
    dice, hd = score_case(logits, target, cfg, spacing=(1.0, 1.0, 1.0), with_hd95=True)
    assert list(dice) == ["TC", "WT", "ET"]
    assert dice["WT"] == 1.0 and math.isnan(dice["TC"]) and math.isnan(dice["ET"])
    assert hd["WT"] == 0.0


def test_report_means_skip_nan_and_json_uses_null():
    cases = [CaseResult("a", (1.0,) * 3, {"A": 1.0, "B": float("nan")}, {"A": 2.0, "B": float("nan")}),
             CaseResult("b", (1.0,) * 3, {"A": 0.5, "B": 0.25}, {"A": 4.0, "B": float("nan")})]
    report = build_report(cases, model="m", split="validation", class_names=["A", "B"])
    assert report.dice == {"A": 0.75, "B": 0.25}
    assert report.mean_dice == 0.5
    assert report.hd95["A"] == 3.0 and math.isnan(report.hd95["B"]) and report.mean_hd95 == 3.0
    data = json.loads(json.dumps(report.to_dict(), allow_nan=False))
    assert data["hd95_mm"]["B"] is None and data["cases"][0]["dice"]["B"] is None
    assert report.card_metrics() == {"dice": 0.5, "hd95_mm": 3.0, "dice/A": 0.75, "dice/B": 0.25, "hd95_mm/A": 3.0}


# ---------------------------------------------------------------------------------------------------- CLI
@pytest.fixture(scope="module")
def random_model(tmp_path_factory):
    """An untrained segmenter for the demo task, saved as a Hub folder (evaluation needs no trained weights to
    exercise every code path; the consistency with training is tested in test_finetune.py)."""
    from gmim_hub.data import demo_config
    from gmim_hub.models.hub_models import GMIMForSegmentation

    torch.manual_seed(0)
    base = demo_config()  # at 4 mm with a small ROI, so one evaluation takes about a second
    cfg = dataclasses.replace(base, roi_size=(64, 32, 32), data=dataclasses.replace(base.data, spacing=(4.0,) * 3))
    folder = tmp_path_factory.mktemp("model") / "seg"
    GMIMForSegmentation(cfg).save_pretrained(folder)
    return folder


def test_evaluate_cli_writes_json_and_prints_a_table(random_model, tmp_path):
    out = tmp_path / "eval" / "report.json"
    result = runner.invoke(app, ["evaluate", str(random_model), "--demo-data", "--output", str(out)])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert data["classes"] == ["CSF", "GM", "WM"] and data["split"] == "validation"
    assert len(data["cases"]) == 1 and data["cases"][0]["spacing_mm"] == [4.0, 4.0, 4.0]
    for key in ("dice", "hd95_mm"):
        assert set(data[key]) == {"CSF", "GM", "WM"}
        assert all(v is None or (isinstance(v, float) and v >= 0) for v in data[key].values())
    assert all(0.0 <= v <= 1.0 for v in data["cases"][0]["dice"].values() if v is not None)
    for text in ("Dice", "HD95 (mm)", "CSF", "GM", "WM", "mean", str(out)):
        assert text in result.output


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ([], "pass exactly one of --data PATH or --demo-data"),
        (["--demo-data", "--overlap", "1.0"], "overlap must be in [0, 1)"),
        (["--demo-data", "--sw-batch-size", "0"], "sw_batch_size must be an int >= 1"),
    ],
)
def test_evaluate_cli_bad_input(random_model, tmp_path, extra, message):
    result = runner.invoke(app, ["evaluate", str(random_model), "--output", str(tmp_path / "r.json"), *extra])
    assert result.exit_code == 2
    assert message in result.output


def test_evaluate_cli_missing_model(tmp_path):
    (tmp_path / "empty").mkdir()
    result = runner.invoke(app, ["evaluate", str(tmp_path / "empty"), "--demo-data", "--output",
                                 str(tmp_path / "r.json")])
    assert result.exit_code == 2
    assert "has no model.safetensors" in result.output


def test_resolve_device_rejects_garbage():
    from gmim_hub.engine.evaluate import resolve_device

    assert resolve_device("auto").type in ("cpu", "cuda")
    with pytest.raises(ConfigError, match="device must be a torch device string"):
        resolve_device("gpu please")
