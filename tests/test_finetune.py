"""`gmim train` / `finetune`: outputs, model card, init from pre-trained and segmentation models, exact resume.

All runs use the embedded MNI152 tissue data (resampled to 4 mm) and the tiny preset with a (64, 32, 32) ROI, a few
steps each.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard
from safetensors.torch import load_file
from typer.testing import CliRunner

from gmim_hub.cli.main import app
from gmim_hub.engine.finetune import FinetuneArgs, finetune
from gmim_hub.engine.finetune_setup import DiceBCELoss, build_loss, build_run
from gmim_hub.engine.logger import read_metrics
from gmim_hub.errors import ConfigError, WeightsError

runner = CliRunner(env={"COLUMNS": "250"})  # rich wraps at the terminal width; keep paths whole


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from gmim_hub.data import build_demo_dataset

    return build_demo_dataset(tmp_path_factory.mktemp("demo") / "data")


@pytest.fixture(scope="module")
def cfg():
    """The demo task at 4 mm with a (64, 32, 32) ROI: the smallest grid the segmenter trains on (its bottleneck
    InstanceNorm needs > 1 voxel), so a step and a sliding-window validation take about a second on 2 cores."""
    from gmim_hub.data import demo_config

    base = demo_config()
    return dataclasses.replace(base, roi_size=(64, 32, 32), data=dataclasses.replace(base.data, spacing=(4.0,) * 3))


@pytest.fixture(scope="module")
def cfg_file(cfg, tmp_path_factory):
    path = tmp_path_factory.mktemp("cfg") / "config.json"
    cfg.to_json_file(path)
    return path


@pytest.fixture(scope="module")
def pretrained(cfg, tmp_path_factory):
    from gmim_hub.models.hub_models import GMIMForPretraining

    torch.manual_seed(1)
    return GMIMForPretraining(cfg).save_pretrained(tmp_path_factory.mktemp("pre") / "gmim-pretrained")


def _args(demo, out: Path, **kw) -> FinetuneArgs:
    base = {"data": str(demo.dataset_json), "output_dir": out, "steps": 2, "num_samples": 1, "val_every": 0,
            "cache": True, "log_every": 1, "precision": "fp32", "device": "cpu", "overlap": 0.0}
    return FinetuneArgs(**{**base, **kw})


def _train_cli(demo, cfg_file, out: Path, *extra: str):
    return runner.invoke(app, ["train", "--data", str(demo.dataset_json), "--config", str(cfg_file), "--output",
                               str(out), "--steps", "2", "--num-samples", "1", "--val-every", "0", "--log-every",
                               "1", "--device", "cpu", "--cache", "--overlap", "0", *extra])


def _check_outputs(out: Path, *, base_model: str | None) -> str:
    from gmim_hub.models.hub_models import GMIMForSegmentation

    model = GMIMForSegmentation.from_pretrained(out / "model")  # strict by default
    assert model.config.data.label_names == ("background", "CSF", "GM", "WM")
    card = (out / "model" / "README.md").read_text()
    for text in ("model-index", "MNI152Tissue validation", "type: dice", "name: dice (GM)", "type: hd95_mm"):
        assert text in card
    if base_model is not None:
        assert f"Fine-tuned from `{base_model}`" in card
    else:
        assert "Fine-tuned from" not in card
    report = json.loads((out / "validation.json").read_text())
    assert set(report["dice"]) == {"CSF", "GM", "WM"}
    results = {r.metric_name: r.metric_value for r in ModelCard.load(out / "model" / "README.md").data.eval_results}
    assert results["dice"] == report["mean_dice"]  # the card holds the final validation of the saved weights
    assert {k: results.get(f"dice ({k})") for k in report["dice"]} == report["dice"]
    records = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in records if "loss" in r] == [1, 2]
    assert any("mean_dice" in r for r in records)
    assert (out / "checkpoints" / "last" / "ckpt-00000002.pt").is_file()
    assert list((out / "checkpoints" / "best").glob("ckpt-*.pt"))
    assert any((out / "tensorboard").iterdir())
    return card


def test_train_cli_from_scratch(demo, cfg_file, tmp_path):
    out = tmp_path / "scratch"
    result = _train_cli(demo, cfg_file, out)
    assert result.exit_code == 0, result.output
    _check_outputs(out, base_model=None)
    for text in ("Dice", "HD95 (mm)", str(out / "model"), "validation.json"):
        assert text in result.output


def test_train_cli_from_pretrained_encoder(demo, cfg_file, pretrained, tmp_path):
    out = tmp_path / "from-pre"
    result = _train_cli(demo, cfg_file, out, "--init", str(pretrained))
    assert result.exit_code == 0, result.output
    _check_outputs(out, base_model=str(Path(pretrained).resolve()))


def test_validated_weights_reproduce_with_gmim_evaluate(demo, cfg, tmp_path):
    """The model card's numbers (computed during training) are what `gmim evaluate` finds again for the saved model
    on the same split."""
    result = finetune(_args(demo, tmp_path / "run", val_every=1), cfg)
    out = tmp_path / "eval.json"
    cli = runner.invoke(app, ["evaluate", str(result.model_dir), "--data", str(demo.dataset_json), "--output",
                              str(out), "--device", "cpu", "--overlap", "0"])
    assert cli.exit_code == 0, cli.output
    again = json.loads(out.read_text())
    assert result.report is not None
    assert again["dice"] == pytest.approx(result.report.to_dict()["dice"], abs=1e-6)
    assert again["hd95_mm"] == pytest.approx(result.report.to_dict()["hd95_mm"], abs=1e-4)
    assert result.best_step in (1, 2)


def test_resume_continues_bit_exactly(demo, cfg, tmp_path):
    """4 steps in one go == 4 steps interrupted before step 4 is checkpointed, then resumed from step 2."""
    kw = {"steps": 4, "ckpt_every": 2, "val_every": 2}
    full = finetune(_args(demo, tmp_path / "full", **kw), cfg)

    class Crash:
        def on_start(self, start_step, total_steps): ...
        def on_validation(self, step, mean_dice, best_dice): ...
        def on_end(self, step): ...

        def on_step(self, step, values):
            if step == 4:
                raise KeyboardInterrupt  # as a kill would: steps 3-4 done (3 logged), no checkpoint after step 2

    part_dir = tmp_path / "part"
    with pytest.raises(KeyboardInterrupt):
        finetune(_args(demo, part_dir, **kw), cfg, callback=Crash())
    resumed = finetune(_args(demo, part_dir, **kw), cfg)
    assert resumed.resumed_from is not None and resumed.resumed_from.name == "ckpt-00000002.pt"
    a, b = load_file(full.model_dir / "model.safetensors"), load_file(resumed.model_dir / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for name in ("config.json", "README.md"):  # (safetensors' header key order varies, so compare tensors there)
        assert (full.model_dir / name).read_bytes() == (resumed.model_dir / name).read_bytes()
    last_a = torch.load(full.output_dir / "checkpoints/last/ckpt-00000004.pt", weights_only=True)
    last_b = torch.load(resumed.output_dir / "checkpoints/last/ckpt-00000004.pt", weights_only=True)
    assert all(torch.equal(last_a["model"][k], last_b["model"][k]) for k in last_a["model"])
    strip = [{k: v for k, v in r.items() if k != "time"} for r in read_metrics(full.output_dir / "metrics.jsonl")]
    strip_b = [{k: v for k, v in r.items() if k != "time"} for r in read_metrics(part_dir / "metrics.jsonl")]
    assert strip == strip_b  # the interrupted run's step-3 record was dropped on resume
    assert full.best_step == resumed.best_step


def test_resume_refuses_changed_settings_and_never(demo, cfg, tmp_path):
    finetune(_args(demo, tmp_path / "run", steps=1), cfg)
    with pytest.raises(ConfigError, match=r"different settings \(lr: 0.0001 -> 0.001\)"):
        finetune(_args(demo, tmp_path / "run", steps=1, lr=1e-3), cfg)
    with pytest.raises(ConfigError, match="already holds checkpoints"):
        finetune(_args(demo, tmp_path / "run", steps=1, resume="never"), cfg)


def test_init_from_pretraining_copies_the_encoder(demo, cfg, pretrained, tmp_path):
    run = build_run(_args(demo, tmp_path / "r", init=str(pretrained)), cfg)
    source = load_file(Path(pretrained) / "model.safetensors")
    state = run.model.state_dict()
    enc = [k for k in state if k.startswith("swinViT.")]
    assert enc and all(torch.equal(state[k], source[k]) for k in enc)
    assert run.base_model == str(Path(pretrained).resolve())


def test_init_from_segmentation_model_and_freeze_encoder(demo, cfg, tmp_path):
    from gmim_hub.models.hub_models import GMIMForSegmentation

    torch.manual_seed(3)
    seg = GMIMForSegmentation(cfg).save_pretrained(tmp_path / "seg")
    run = build_run(_args(demo, tmp_path / "r", init=str(seg), freeze_encoder=True), None)  # config from the folder
    source = load_file(seg / "model.safetensors")
    assert all(torch.equal(v, source[k]) for k, v in run.model.state_dict().items())
    trainable = {id(p) for g in run.optimizer.param_groups for p in g["params"]}
    assert not any(id(p) in trainable for p in run.model.swinViT.parameters())
    assert any(id(p) in trainable for p in run.model.decoder1.parameters())


def test_epochs_count_passes_over_the_training_volumes(demo, cfg, tmp_path):
    run = build_run(_args(demo, tmp_path / "r", steps=None, epochs=3), cfg)
    assert run.total_steps == 3  # one training volume, batch 1


def test_no_validation_split_trains_without_metrics(demo, cfg, tmp_path):
    datalist = tmp_path / "train_only.json"
    datalist.write_text(json.dumps({"training": [{"image": str(demo.train_image), "label": str(demo.train_label)}]}))
    result = finetune(_args(demo, tmp_path / "run", data=str(datalist), steps=1), cfg)
    assert result.report is None
    card = (result.model_dir / "README.md").read_text()
    assert "model-index" not in card


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"steps": None}, "pass exactly one of steps or epochs"),
        ({"epochs": 2}, "pass exactly one of steps or epochs"),
        ({"steps": 0}, "steps must be an int >= 1, got 0"),
        ({"lr": -1.0}, "lr must be a positive finite number"),
        ({"loss": "focal"}, "loss must be 'dicece' or 'dice', got 'focal'"),
        ({"overlap": 1.0}, "overlap must be in [0, 1), got 1.0"),
        ({"precision": "fp8"}, "precision must be fp32, bf16, fp16 or auto"),
        ({"num_samples": 0}, "num_samples must be an int >= 1"),
        ({"val_every": -1}, "val_every must be an int >= 0"),
        ({"init": ""}, "init must be 'scratch' or a model folder"),
    ],
)
def test_finetune_args_validation(demo, tmp_path, kw, message):
    with pytest.raises(ConfigError) as e:
        _args(demo, tmp_path, **kw)
    assert message in str(e.value)


def test_bad_init_and_missing_config(demo, cfg, tmp_path):
    with pytest.raises(ConfigError, match="training from scratch needs a config"):
        build_run(_args(demo, tmp_path / "a"), None)
    (tmp_path / "empty").mkdir()
    with pytest.raises(WeightsError, match="has no model.safetensors"):
        build_run(_args(demo, tmp_path / "b", init=str(tmp_path / "empty")), cfg)
    with pytest.raises(WeightsError, match="not a valid Hub repo id"):
        build_run(_args(demo, tmp_path / "c", init="../no/such/../model"), cfg)


def test_train_cli_bad_input(demo, cfg_file, tmp_path):
    both = runner.invoke(app, ["train", "--data", str(demo.dataset_json), "--demo-data", "-o", str(tmp_path)])
    assert both.exit_code == 2 and "pass exactly one of --data PATH or --demo-data" in both.output
    clash = runner.invoke(app, ["train", "--data", str(demo.dataset_json), "--config", str(cfg_file), "--preset",
                                "tiny", "-o", str(tmp_path)])
    assert clash.exit_code == 2 and "pass either --config or --preset, not both" in clash.output


@pytest.mark.parametrize("multi_label", [False, True])
def test_losses_match_their_definition(multi_label):
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 4, 4, 4, requires_grad=True)
    if multi_label:
        target = (torch.rand(2, 3, 4, 4, 4) > 0.5).float()
        from monai.losses import DiceLoss

        expected = DiceLoss(sigmoid=True)(logits, target) + torch.nn.functional.binary_cross_entropy_with_logits(
            logits, target)
        assert isinstance(build_loss("dicece", True), DiceBCELoss)
    else:
        target = torch.randint(0, 3, (2, 1, 4, 4, 4))
        from monai.losses import DiceLoss

        dice = DiceLoss(to_onehot_y=True, softmax=True)(logits, target)
        expected = dice + torch.nn.functional.cross_entropy(logits, target[:, 0])
    loss = build_loss("dicece", multi_label)(logits, target)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    loss.backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()


def test_task_config_keeps_the_patch_merging_of_the_init_model(demo, cfg, tmp_path):
    """A legacy-merging model (e.g. fine-tuned from a converted checkpoint) fine-tuned again with a task config
    that says "merging": the weights keep computing what they were trained to compute."""
    from gmim_hub.models.hub_models import GMIMForSegmentation

    torch.manual_seed(4)
    legacy = dataclasses.replace(cfg, patch_merging="legacy")
    seg = GMIMForSegmentation(legacy).save_pretrained(tmp_path / "seg")
    assert cfg.patch_merging == "merging"
    run = build_run(_args(demo, tmp_path / "r", init=str(seg)), cfg)
    assert run.config.patch_merging == "legacy" and run.model.config.patch_merging == "legacy"
    assert type(run.model.swinViT.layers1[0].downsample).__name__ == "LegacyPatchMerging"


def _hemisphere_task(demo, root: Path) -> Path:
    """The demo's MNI152 volumes with 6 classes instead of the pre-training config's 4: GM and WM each split into
    left and right by the world x coordinate (RAS: x < 0 is left), as an MSD dataset.json with another modality
    name."""
    import nibabel as nib
    import numpy as np

    names = ["background", "CSF", "GM left", "GM right", "WM left", "WM right"]
    entries = {}
    for split, image, label in (("training", demo.train_image, demo.train_label),
                                ("validation", demo.val_image, demo.val_label)):
        img = nib.load(str(label))
        tissue = np.asarray(img.dataobj).astype(np.uint8)
        x = nib.affines.apply_affine(img.affine, np.indices(tissue.shape).reshape(3, -1).T)[:, 0]
        right = (x >= 0).reshape(tissue.shape)
        out = np.where(tissue >= 2, 2 * tissue - 2 + right, tissue).astype(np.uint8)  # 2 -> 2/3, 3 -> 4/5
        assert set(np.unique(out)) == set(range(6))
        path = root / f"{split}_hemispheres.nii.gz"
        nib.save(nib.Nifti1Image(out, img.affine), path)
        entries[split] = [{"image": str(image), "label": str(path)}]
    dataset = {"name": "MNI152Hemispheres", "modality": {"0": "T1w"},
               "labels": {str(i): n for i, n in enumerate(names)}, **entries}
    (root / "dataset.json").write_text(json.dumps(dataset))
    return root / "dataset.json"


def test_train_from_pretrained_derives_the_task_config(demo, cfg, pretrained, tmp_path):
    """The README's fine-tuning command on a dataset.json whose classes differ from the pre-training config's: the
    architecture, window and preprocessing come from the pre-trained model, the classes and channel names from the
    dataset.json, shown in one table; no --config."""
    from gmim_hub.models.hub_models import GMIMForSegmentation

    data = _hemisphere_task(demo, tmp_path)
    out = tmp_path / "run"
    result = runner.invoke(app, ["train", "--data", str(data), "-o", str(out), "--init", str(pretrained),
                                 "--steps", "2", "--num-samples", "1", "--val-every", "0", "--device", "cpu",
                                 "--cache", "--overlap", "0"])
    assert result.exit_code == 0, result.output
    text = result.output
    assert f"task config: {pretrained} + dataset.json" in text
    cells = [[c.strip() for c in line.split("│")[1:-1]] for line in text.splitlines() if line.count("│") == 4]
    rows = {c[0]: (c[1], c[2]) for c in cells}
    assert rows["out_channels"] == ("6", "dataset.json labels")
    assert rows["data.label_names"] == ("background, CSF, GM left, GM right, WM left, WM right", "dataset.json labels")
    assert rows["data.channel_names"] == ("T1w", "dataset.json modality")
    assert rows["data.modality"] == ("MRI", "dataset.json modality")
    assert rows["roi_size"] == ("64, 32, 32", "pre-trained config")  # not a preset's: the encoder's own
    assert rows["data.spacing"] == ("4.0, 4.0, 4.0", "pre-trained config")
    model = GMIMForSegmentation.from_pretrained(out / "model")
    expected = dataclasses.replace(cfg, out_channels=6, data=dataclasses.replace(
        cfg.data, label_names=("background", "CSF", "GM left", "GM right", "WM left", "WM right"),
        channel_names=("T1w",)))
    assert model.config.data.reference is not None  # the training images' intensities, recorded by gmim train
    assert dataclasses.replace(model.config, data=dataclasses.replace(model.config.data, reference=None)) == expected
    assert set(json.loads((out / "validation.json").read_text())["dice"]) == {"CSF", "GM left", "GM right",
                                                                            "WM left", "WM right"}
    encoder = {k: v for k, v in load_file(Path(pretrained) / "model.safetensors").items() if k.startswith("swinViT.")}
    assert encoder and all(k in model.state_dict() for k in encoder)
