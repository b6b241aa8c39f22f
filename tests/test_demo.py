"""`gmim demo`: the end-to-end story (slow, real data and real training), its preview and its extension point."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from gmim_hub.cli.main import app
from gmim_hub.demo import DEMO_STEPS, DemoSettings, DemoStep, run_demo, save_segmentation_preview, step_data
from gmim_hub.errors import ConfigError

runner = CliRunner(env={"COLUMNS": "250"})  # rich wraps at the terminal width; keep paths whole


@pytest.mark.slow
def test_demo_quick_runs_end_to_end(tmp_path):
    out = tmp_path / "demo"
    result = runner.invoke(app, ["demo", "--output", str(out), "--quick"])
    assert result.exit_code == 0, result.output
    text = result.output
    for step in DEMO_STEPS:
        assert step.title in text
    for label in ("where things went", "summary (quick demo", "validation Dice", "validation HD95", "CSF", "GM",
                  "WM", str(out / "finetune" / "model"), str(out / "previews" / "validation.png")):
        assert label in text
    report = json.loads((out / "evaluation.json").read_text())
    assert report["classes"] == ["CSF", "GM", "WM"] and len(report["cases"]) == 1
    assert (out / "previews" / "validation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    card = (out / "finetune" / "model" / "README.md").read_text()
    assert f"Fine-tuned from `{out / 'pretrain' / 'model'}`" in card and "model-index" in card
    from gmim_hub.models.hub_models import GMIMForPretraining, GMIMForSegmentation

    GMIMForPretraining.from_pretrained(out / "pretrain" / "model")
    GMIMForSegmentation.from_pretrained(out / "finetune" / "model")
    assert "resumed" not in text

    # a second run in the same folder resumes: nothing is trained or exported again, and it still ends with the
    # evaluation and a served prediction
    kept = [out / "export" / "gmim_demo" / "model.onnx", *sorted((out / "pretrain" / "checkpoints").iterdir()),
            *sorted((out / "finetune" / "checkpoints" / "last").iterdir())]
    before = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in kept}
    again = runner.invoke(app, ["demo", "--output", str(out), "--quick"])
    assert again.exit_code == 0, again.output
    assert "finished by an earlier run in this folder, not redone: pretrain, finetune, export" in again.output
    assert {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in kept} == before
    assert "validation Dice" in again.output and "Triton serving" in again.output


def test_demo_help_lists_every_step():
    import gmim_hub.demo_serving  # noqa: F401  (appends export and serve, as `gmim demo` does)

    result = runner.invoke(app, ["demo", "--help"])
    assert result.exit_code == 0, result.output
    for i, step in enumerate(DEMO_STEPS, start=1):
        assert f"{i}. {step.name}: " in result.output
    assert [s.name for s in DEMO_STEPS][-2:] == ["export", "serve"]


def test_segmentation_preview_writes_a_png(tmp_path):
    image = torch.rand(20, 24, 16)
    label = torch.zeros(20, 24, 16, dtype=torch.long)
    label[5:15, 6:18, 4:12] = 2
    pred = torch.roll(label, 2, dims=0)
    path = save_segmentation_preview(tmp_path / "p" / "v.png", image, label, pred, ("bg", "a", "b"))
    from matplotlib.image import imread

    pixels = imread(path)
    assert pixels.shape[0] == 900 and pixels.shape[1] == 900  # 9 x 9 inches at 100 dpi
    assert np.ptp(pixels[..., :3]) > 0


def test_run_demo_accepts_appended_steps(tmp_path):
    """The extension point later features (export, serving) use: a step sees what earlier steps produced and adds
    its artifacts and summary rows."""
    seen = []

    def custom(ctx):
        seen.append(ctx.data.dataset_json)
        ctx.artifacts["custom"] = ctx.output_dir / "custom.txt"
        ctx.summary["custom"] = "ran"

    events = []
    ctx = run_demo(tmp_path, steps=[DemoStep("data", "data", step_data), DemoStep("custom", "custom", custom)],
                   on_step=lambda step, phase, s: events.append((step.name, phase)))
    assert seen == [ctx.data.dataset_json] and ctx.data.dataset_json.is_file()
    assert ctx.summary["custom"] == "ran" and "custom" in ctx.artifacts
    assert events == [("data", "start"), ("data", "end"), ("custom", "start"), ("custom", "end")]
    assert set(ctx.timings) == {"data", "custom", "total"}


@pytest.mark.parametrize("field", ["pretrain_steps", "finetune_steps", "val_every", "num_samples"])
def test_demo_settings_validation(field):
    with pytest.raises(ConfigError, match=f"demo {field} must be an int >= 1, got 0"):
        DemoSettings(**{field: 0})
