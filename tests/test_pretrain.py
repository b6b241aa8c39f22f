"""`gmim pretrain` and the pre-training engine: outputs, validation, the non-finite stop, and bad inputs."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from _pretrain_fixtures import tiny_pretrain_config, write_config, write_volumes
from safetensors.torch import load_file
from typer.testing import CliRunner

from gmim_hub.cli.main import app
from gmim_hub.config import LossConfig
from gmim_hub.engine.checkpoint import capture_rng_state, load_checkpoint, load_latest_checkpoint, save_checkpoint
from gmim_hub.engine.distributed import DistInfo
from gmim_hub.engine.logger import read_metrics
from gmim_hub.engine.pretrain import NonFiniteLossError, PretrainArgs, pretrain
from gmim_hub.engine.pretrain_setup import build_run
from gmim_hub.engine.pretrain_step import validate
from gmim_hub.errors import ConfigError

runner = CliRunner()
FAST = ["--batch-size", "1", "--num-workers", "0", "--log-every", "1", "--eval-every", "0", "--preview-every", "0"]


def _fast_args(data: Path, out: Path, **kw) -> PretrainArgs:
    base = dict(data=data, output_dir=out, steps=2, warmup=1, batch_size=1, num_workers=0, seed=3, log_every=1,
                eval_every=0, preview_every=0, ckpt_every=1, resume="auto")
    return PretrainArgs(**{**base, **kw})


@pytest.fixture(scope="module")
def volumes(tmp_path_factory) -> Path:
    return write_volumes(tmp_path_factory.mktemp("pretrain") / "imgs")


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, volumes) -> tuple[Path, Path]:
    """A finished 2-step run with a held-out fold (validated every step): (output dir, config.json)."""
    root = tmp_path_factory.mktemp("finished")
    cfg = write_config(root / "config.json")
    out = root / "run"
    result = pretrain(_fast_args(volumes, out, fold=0, eval_every=1), tiny_pretrain_config())
    assert result.final_step == 2 and result.model_dir == out / "model"
    return out, cfg


@pytest.mark.slow
def test_cli_pretrain_on_embedded_demo_data(tmp_path):
    from matplotlib.image import imread

    from gmim_hub.models.hub_models import GMIMForSegmentation

    out = tmp_path / "run"
    res = runner.invoke(app, ["pretrain", "--demo-data", "-o", str(out), "--steps", "3", "--warmup", "1", *FAST,
                              "--ckpt-every", "2", "--preview-every", "2", "--cache"])
    assert res.exit_code == 0, res.output
    assert f"done at step 3: model in {out / 'model'}" in res.output.replace("\n", "")
    records = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3]
    assert {"loss", "cc", "rec", "lr", "grad_norm", "time", "elapsed"} <= set(records[0])
    assert all(np.isfinite(r["loss"]) for r in records) and records[0]["lr"] == 0.0  # warmup starts at 0
    for step in (2, 3):  # every 2 steps and at the end
        png = imread(out / "previews" / f"step-{step:08d}.png")
        assert png.ndim == 3 and png.shape[0] > 100 and png.shape[1] > 400
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    path, state = load_latest_checkpoint(out / "checkpoints")
    assert path.name == "ckpt-00000003.pt" and state["step"] == 3  # exactly --steps optimizer steps
    assert {int(s["step"]) for s in state["optimizer"]["state"].values()} == {3}
    seg = GMIMForSegmentation.from_pretrained_encoder(out / "model")
    saved = load_file(out / "model" / "model.safetensors")
    for name, tensor in seg.state_dict().items():
        if name.startswith("swinViT."):
            assert torch.equal(tensor, saved[name]) and torch.equal(tensor, state["model"][name])


def test_validation_is_logged_and_repeatable(finished_run, volumes, tmp_path):
    out, _ = finished_run
    val = [r for r in read_metrics(out / "metrics.jsonl") if "val_loss" in r]
    assert [r["step"] for r in val] == [1, 2] and all(np.isfinite(r["val_loss"]) for r in val)
    run = build_run(_fast_args(volumes, tmp_path / "v", fold=0), tiny_pretrain_config(), DistInfo())
    args = _fast_args(volumes, tmp_path / "v", fold=0)
    rng_before = capture_rng_state()
    first, second = validate(run, args, DistInfo()), validate(run, args, DistInfo())
    assert first == second  # same crops and masks every time: a comparable metric
    assert run.model.training  # back in train mode
    rng_after = capture_rng_state()
    assert torch.equal(rng_before["torch"], rng_after["torch"])
    assert torch.equal(rng_before["numpy"]["keys"], rng_after["numpy"]["keys"])


def test_non_finite_loss_stops_with_the_step(volumes, tmp_path):
    """lr=1e10 without warmup: step 1 moves every weight by ~1e10, so step 2's cross-correlation overflows."""
    out = tmp_path / "run"
    with pytest.raises(NonFiniteLossError, match=r"the loss became non-finite at step 2 \(loss=(inf|nan), cc="):
        pretrain(_fast_args(volumes, out, steps=4, warmup=0, lr=1e10), tiny_pretrain_config())
    path, state = load_latest_checkpoint(out / "checkpoints")
    assert state["step"] == 1 and all(torch.isfinite(t).all() for t in state["model"].values())
    assert not (out / "model").exists()


def _cli(out: Path, *args: str):
    return runner.invoke(app, ["pretrain", "-o", str(out), *args])


def _one_line_error(res, match: str) -> None:
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output
    text = " ".join(res.output.split())  # rich wraps long lines
    assert match in text, text


@pytest.mark.parametrize(("extra", "match"), [
    (["--demo-data", "--preset", "huge"], "unknown preset 'huge'; choose one of base, brats21, ct_abdomen, tiny"),
    (["--steps", "3"], "pass exactly one of --data PATH or --demo-data"),
    (["--demo-data", "--data", "x"], "pass exactly one of --data PATH or --demo-data"),
    (["--data", "VOLUMES", "--preset", "tiny", "--warmup", "500", "--steps", "10"],
     "warmup must be < steps, got warmup=500 with steps=10; lower --warmup or raise --steps"),
    (["--data", "VOLUMES", "--preset", "tiny", "--precision", "half"],
     "precision must be fp32, bf16, fp16 or auto, got 'half'"),
    (["--data", "VOLUMES", "--preset", "tiny", "--batch-size", "0"], "batch_size must be an int >= 1, got 0"),
    (["--data", "VOLUMES", "--config", "nope.json"], "--config nope.json: no such file"),
    (["--data", "VOLUMES", "--config", "tiny.json", "--preset", "tiny"], "pass either --config or --preset"),
    (["--data", "MISSING", "--preset", "tiny"], "does not exist; pass a dataset.json, a JSON datalist or a folder"),
    (["--data", "VOLUMES", "--config", "GRID3"], "masking.grids [3] do not divide roi_size (64, 64, 64)"),
    (["--data", "VOLUMES", "--config", "ROI32"], "pre-training needs roi_size >= 64 per axis, got (32, 32, 32)"),
    (["--data", "VOLUMES", "--preset", "tiny", "--resume", "nope.pt"], "--resume 'nope.pt': no such checkpoint file"),
])
def test_bad_inputs_fail_before_training(tmp_path, volumes, monkeypatch, extra, match):
    monkeypatch.chdir(tmp_path)
    tiny = tiny_pretrain_config()
    write_config(tmp_path / "tiny.json", tiny)
    bad_grid = tiny.to_dict()
    bad_grid["masking"]["grids"] = [3]  # GMIMConfig itself refuses this, so write the JSON by hand
    (tmp_path / "GRID3").write_text(json.dumps(bad_grid))
    write_config(tmp_path / "ROI32", dataclasses.replace(tiny, roi_size=(32, 32, 32)))
    subst = {"VOLUMES": str(volumes), "MISSING": str(tmp_path / "missing")}
    out = tmp_path / "out"
    _one_line_error(_cli(out, *[subst.get(a, a) for a in extra]), match)
    assert not out.exists()  # nothing written: no partial outputs


def test_resume_never_refuses_to_mix_runs(finished_run, volumes):
    out, cfg = finished_run
    res = _cli(out, "--data", str(volumes), "--config", str(cfg), "--resume", "never", "--steps", "2",
               "--warmup", "1", "--fold", "0", *FAST)
    _one_line_error(res, "already holds checkpoints (ckpt-00000002.pt, ...) of an earlier run; continue it with "
                         "--resume auto, or choose a new --output")


@pytest.mark.parametrize(("change", "match"), [
    (["--lr", "0.001"], "different settings (lr: 0.0004 -> 0.001)"),
    (["--seed", "4"], "different settings (seed: 3 -> 4)"),
    (["--steps", "5"], "different settings (steps: 2 -> 5)"),
])
def test_resume_with_changed_settings_is_refused(finished_run, volumes, tmp_path, change, match):
    out, cfg = finished_run
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    opts = {"--steps": "2", "--lr": "0.0004", "--seed": "3", **dict(zip(change[::2], change[1::2], strict=True))}
    res = _cli(copy, "--data", str(volumes), "--config", str(cfg), "--warmup", "1", "--fold", "0", *FAST,
               *[x for kv in opts.items() for x in kv])
    _one_line_error(res, match)


def test_resume_with_changed_config_is_refused(finished_run, volumes, tmp_path):
    out, _ = finished_run
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    other = write_config(tmp_path / "other.json",
                         dataclasses.replace(tiny_pretrain_config(), loss=LossConfig(alpha_cc=0.01)))
    res = _cli(copy, "--data", str(volumes), "--config", str(other), "--steps", "2", "--warmup", "1", "--seed", "3",
               "--fold", "0", *FAST)
    _one_line_error(res, "was written with a different model config (loss.alpha_cc: 0.005 -> 0.01)")


@pytest.mark.parametrize(("field", "value", "match"), [
    ("log_every", 0, "log_every must be >= 1, got 0"),
    ("lr", float("nan"), "lr must be a positive finite number, got nan"),
    ("grad_clip", -1.0, "grad_clip must be >= 0 (0 disables), got -1.0"),
    ("keep_checkpoints", 0, "keep_checkpoints must be >= 1, got 0"),
    ("val_batches", 0, "val_batches must be None or >= 1, got 0"),
    ("resume", "", "resume must be 'auto', 'never' or a checkpoint path, got ''"),
])
def test_pretrain_args_validation(field, value, match):
    with pytest.raises(ConfigError, match=match.replace("(", r"\(").replace(")", r"\)")):
        PretrainArgs(data="x", output_dir="y", **{field: value})


def test_args_record_is_json(tmp_path):
    args = _fast_args(tmp_path, tmp_path / "o")
    assert json.loads(json.dumps(args.to_dict()))["output_dir"] == str(tmp_path / "o")


@pytest.mark.parametrize("num_workers", [0, 2])
def test_validation_does_not_change_the_training_masks(volumes, tmp_path, num_workers):
    """Training and validation draw mask seeds from separate streams: building and running the validation loader
    between two training batches leaves the second batch's masks as they are without validation."""

    def two_training_batches(validate_between: bool) -> list[list]:
        args = _fast_args(volumes, tmp_path / f"run-{validate_between}", fold=0, num_workers=num_workers)
        run = build_run(args, tiny_pretrain_config(), DistInfo())
        assert run.val_loader is not None and len(run.val_data) >= 1
        batches = iter(run.train_loader(0))
        out = [next(batches)["masks"]]
        if validate_between:
            for _ in range(2):  # two validations, as a run with eval_every does
                assert all(b["masks"][0] is not None for b in run.val_loader())
        out.append(next(batches)["masks"])
        return out

    plain, with_validation = two_training_batches(False), two_training_batches(True)
    for masks_a, masks_b in zip(plain, with_validation, strict=True):
        for a, b in zip(masks_a, masks_b, strict=True):
            assert (a is None and b is None) or torch.equal(a, b)
    assert not torch.equal(plain[0][0], plain[1][0])  # the batches themselves differ


def test_checkpoint_in_the_old_layout_still_resumes(volumes, tmp_path):
    """Checkpoints written while the engine still kept a mask generator hold its state ("mask_generator", at the top
    level and per rank); resuming from one ignores it and ends where the uninterrupted run ends, bit for bit."""
    ref = tmp_path / "ref"
    pretrain(_fast_args(volumes, ref, steps=3), tiny_pretrain_config())
    state = load_checkpoint(ref / "checkpoints" / "ckpt-00000002.pt")
    assert "mask_generator" not in state and [set(s) for s in state["rank_states"]] == [{"rng"}]
    gen = torch.Generator().manual_seed(1).get_state()  # the old layout, built by hand from the new one
    old = {**state, "mask_generator": gen, "rank_states": [{**s, "mask_generator": gen} for s in state["rank_states"]]}
    run = tmp_path / "old"
    save_checkpoint(run / "checkpoints", 2, old)

    result = pretrain(_fast_args(volumes, run, steps=3), tiny_pretrain_config())
    assert result.final_step == 3
    a, b = load_file(ref / "model" / "model.safetensors"), load_file(run / "model" / "model.safetensors")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    keys = ("loss", "cc", "rec", "grad_norm", "lr")
    last = [{k: r[k] for k in keys} for r in read_metrics(ref / "metrics.jsonl") if r["step"] == 3]
    assert [{k: r[k] for k in keys} for r in read_metrics(run / "metrics.jsonl") if r["step"] == 3] == last
