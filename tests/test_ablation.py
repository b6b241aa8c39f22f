"""`gmim ablate` / `run_ablation` at CI size on the embedded MNI152 demo data (resampled to 4 mm, one step per run):
the protocol, the table and its intervals, the plot, and the baseline's measured mask ratio."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
from typer.testing import CliRunner

from gmim_hub.cli.main import app
from gmim_hub.engine.ablation import AblationSettings, run_ablation, summarise, t_interval
from gmim_hub.errors import ConfigError

runner = CliRunner(env={"COLUMNS": "250"})


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    from gmim_hub.data import demo_config

    base = demo_config()
    cfg = dataclasses.replace(base, data=dataclasses.replace(base.data, spacing=(4.0,) * 3))
    settings = AblationSettings(fractions=(0.5, 1.0), seeds=(0, 1), slabs=2, pretrain_steps=1, pretrain_warmup=0,
                                pretrain_batch_size=1, finetune_steps=1, finetune_warmup=0, ratio_crops=2)
    small_window = dataclasses.replace(cfg, roi_size=(64, 32, 32))  # pre-training needs 64^3; fine-tuning does not
    return run_ablation(tmp_path_factory.mktemp("ablation"), settings, config=cfg, finetune_config=small_window), \
        settings


def test_every_arm_fraction_and_seed_is_run_with_the_same_budget(result):
    res, settings = result
    assert [(r["arm"], r["fraction"], r["seed"]) for r in res.runs] == [
        (a, f, s) for a in ("gmim", "uniform", "scratch") for f in (0.5, 1.0) for s in (0, 1)]
    for run in res.runs:
        metrics = [json.loads(line) for line in (res.output_dir / run["output_dir"] / "metrics.jsonl").open()]
        assert max(m["step"] for m in metrics) == settings.finetune_steps
        assert 0.0 <= run["mean_dice"] <= 1.0 and set(run["dice"]) == {"CSF", "GM", "WM"}
    card = (res.output_dir / "finetune/gmim/fraction-0.5/seed-0/model/README.md").read_text()
    assert "pretrain/gmim" in card  # fine-tuned from that arm's encoder
    uniform = json.loads((res.output_dir / "pretrain/uniform/model/config.json").read_text())["masking"]
    gmim = json.loads((res.output_dir / "pretrain/gmim/model/config.json").read_text())["masking"]
    assert uniform["strategy"] == "uniform" and gmim["strategy"] == "adaptive"
    assert uniform["uniform_ratio"] == pytest.approx(res.uniform_ratio, abs=1e-6)
    assert 0.35 <= res.uniform_ratio <= 0.65  # inside the adaptive range base_ratio * [1 - scale, 1 + scale]


def test_table_json_markdown_and_plot(result):
    res, _ = result
    doc = json.loads((res.output_dir / "ablation.json").read_text())
    assert len(doc["table"]) == 6 and doc["uniform_ratio"] == res.uniform_ratio
    for row in doc["table"]:
        dice = [r["mean_dice"] for r in res.runs if (r["arm"], r["fraction"]) == (row["arm"], row["fraction"])]
        assert row["n"] == 2 and row["dice_mean"] == pytest.approx(sum(dice) / 2)
        assert row["ci95_low"] <= row["dice_mean"] <= row["ci95_high"]
    md = (res.output_dir / "ablation.md").read_text()
    assert md.count("\n| ") == 6 and "| scratch | 0.5 | 2 |" in md  # one line per (arm, fraction)
    assert (res.output_dir / "ablation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_t_interval_against_the_textbook_value():
    # n = 3, mean 2, sd 1: half width t(0.975, 2) * 1 / sqrt(3) = 4.302653 / 1.732051 = 2.484138
    mean, low, high = t_interval([1.0, 2.0, 3.0])
    assert mean == 2.0 and high - mean == pytest.approx(2.484138, abs=1e-6) and low == pytest.approx(2 - 2.484138)
    assert all(math.isnan(v) for v in t_interval([0.5])[1:])  # one seed: no interval
    rows = summarise([{"arm": "gmim", "fraction": 1.0, "mean_dice": 0.5}], ["gmim"], [1.0])
    assert rows[0]["n"] == 1 and math.isnan(rows[0]["ci95_low"])


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"fractions": (0.0, 1.0)}, "fractions must be numbers in (0, 1]"),
    ({"seeds": (1, 1)}, "seeds must be distinct integers"),
    ({"arms": ("gmim", "mae")}, "unknown arm(s) ['mae']; choose from gmim, uniform, scratch"),
])
def test_settings_are_checked(kwargs, message):
    with pytest.raises(ConfigError) as err:
        AblationSettings(**kwargs)
    assert message in str(err.value)


def test_cli_rejects_a_bad_list_in_one_line(tmp_path):
    res = runner.invoke(app, ["ablate", "-o", str(tmp_path / "a"), "--fractions", "0.5,half"])
    assert res.exit_code == 2 and "--fractions must be comma-separated floats such as 0.25,0.5,1" in res.output
    assert not (tmp_path / "a").exists()
