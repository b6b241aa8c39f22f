"""The paper's recipes (`brats21`, `ct_abdomen` presets) end to end on real volumes made into their shape.

Real anatomy from nilearn's MNI152 2009a template (T1, grey- and white-matter maps): for BraTS four channel files
per case and a label map in BraTS codes (1 NCR, 2 ED, 4 ET) whose regions TC / WT / ET overlap; for the abdomen a
volume in Hounsfield units. Each recipe keeps its own data description (spacing, intensity, channels, classes,
sigmoid or softmax); only the architecture is shrunk here (feature_size 12, ROI 64) so pre-training and
fine-tuning take seconds.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from gmim_hub.cli.train import _train_config
from gmim_hub.config import PRESETS, GMIMConfig
from gmim_hub.data.datalist import read_task
from gmim_hub.data.demo import tissue_labels
from gmim_hub.data.transforms import finetune_transforms
from gmim_hub.engine.finetune import FinetuneArgs, finetune
from gmim_hub.engine.pretrain import PretrainArgs, pretrain

datasets = pytest.importorskip("nilearn.datasets")


def shrink(cfg: GMIMConfig) -> GMIMConfig:
    """The recipe's data description and method with a tiny architecture (test only)."""
    return dataclasses.replace(cfg, feature_size=12, depths=(2, 1, 1, 1), roi_size=(64, 64, 64), projector_dim=64,
                               masking=dataclasses.replace(cfg.masking, grids=(2, 4, 8)))


def _template(resolution: int, box: tuple[slice, slice, slice]):
    """T1 (0-1), brain mask, tissue labels (0 bg, 1 CSF, 2 GM, 3 WM) and the affine of a box of the template."""
    t1 = datasets.load_mni152_template(resolution=resolution)
    crop = t1.slicer[box]
    brain = np.asarray(datasets.load_mni152_brain_mask(resolution=resolution).dataobj)[box] > 0
    gm = np.asarray(datasets.load_mni152_gm_template(resolution=resolution).dataobj, np.float32)[box]
    wm = np.asarray(datasets.load_mni152_wm_template(resolution=resolution).dataobj, np.float32)[box]
    data = np.asarray(crop.dataobj, np.float32)
    return data / data.max(), brain, gm, wm, tissue_labels(brain, gm, wm), crop.affine


def _save(path: Path, array: np.ndarray, affine: np.ndarray) -> str:
    nib.save(nib.Nifti1Image(array, affine), path)
    return str(path)


def _dataset(root: Path, entries: list[dict], labels: dict[str, str], modality: dict[str, str]) -> Path:
    info = {"name": root.name, "labels": labels, "modality": modality, "training": entries[:1],
            "validation": entries[1:]}
    (root / "dataset.json").write_text(json.dumps(info))
    return root / "dataset.json"


def _split_y(array: np.ndarray, affine: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """Posterior and anterior halves along the second voxel axis, each with its own (shifted) affine."""
    half = array.shape[1] // 2
    shifted = affine.copy()
    shifted[:3, 3] += affine[:3, 1] * half
    return [(array[:, :half], affine), (array[:, half:], shifted)]


@pytest.fixture(scope="module")
def brats(tmp_path_factory) -> Path:
    """Four 1 mm channel files per case (FLAIR-like CSF map, T1, T1ce-like WM map, T2-like GM map) and BraTS codes:
    GM -> 1 (NCR), CSF -> 2 (ED), WM -> 4 (ET), so TC = GM+WM, WT = brain, ET = WM."""
    root = tmp_path_factory.mktemp("brats")
    t1, brain, gm, wm, tissue, affine = _template(1, (slice(62, 134), slice(80, 160), slice(60, 132)))
    csf = np.where(brain, np.clip(1 - gm - wm, 0, 1), 0).astype(np.float32)
    channels = {"FLAIR": csf, "T1": t1, "T1ce": np.where(brain, wm, 0), "T2": np.where(brain, gm, 0)}
    codes = np.array([0, 2, 1, 4], np.uint8)[tissue]
    entries = []
    for part in range(2):
        files = [_save(root / f"case{part}_{name}.nii.gz", *_split_y(ch.astype(np.float32), affine)[part])
                 for name, ch in channels.items()]
        label, aff = _split_y(codes, affine)[part]
        entries.append({"image": files, "label": _save(root / f"case{part}_seg.nii.gz", label, aff)})
    labels = {"0": "background", "1": "NCR", "2": "ED", "3": "ET"}  # as a dataset.json would name the codes
    return _dataset(root, entries, labels, {str(i): n for i, n in enumerate(channels)})


@pytest.fixture(scope="module")
def ct(tmp_path_factory) -> Path:
    """A CT-range volume at 2 mm: air -1000 HU, soft tissue of the head 60 HU, CSF 10, GM 40, WM 28 HU, plus the
    template's texture (+-15 HU); the tissue classes stand in for the organs."""
    root = tmp_path_factory.mktemp("ct")
    t1, brain, _, _, tissue, affine = _template(2, (slice(20, 80), slice(30, 90), slice(20, 70)))
    hu = np.where(t1 > 0.05, 60.0, -1000.0) + 15.0 * (t1 - 0.5) * (t1 > 0.05)
    hu = np.where(brain, np.array([0.0, 10.0, 40.0, 28.0])[tissue] + 15.0 * (t1 - 0.5), hu).astype(np.float32)
    entries = []
    for part, ((img, aff), (lab, _)) in enumerate(zip(_split_y(hu, affine), _split_y(tissue, affine), strict=True)):
        entries.append({"image": _save(root / f"ct{part}.nii.gz", img, aff),
                        "label": _save(root / f"ct{part}_seg.nii.gz", lab.astype(np.uint8), aff)})
    return _dataset(root, entries, {"0": "background", "1": "CSF", "2": "GM", "3": "WM"}, {"0": "CT"})


def _run(dataset: Path, cfg: GMIMConfig, out: Path):
    """GMIM pre-training (1 step) on the dataset's images, then fine-tuning (1 step, a (64, 32, 32) window: only
    pre-training needs 64^3) from that encoder, with validation."""
    common = {"precision": "fp32", "device": "cpu", "num_workers": 0, "cache": True, "log_every": 1}
    pre = pretrain(PretrainArgs(data=str(dataset), output_dir=out / "pre", steps=1, batch_size=1, warmup=0,
                                eval_every=0, ckpt_every=0, preview_every=0, **common), cfg)
    return finetune(FinetuneArgs(data=str(dataset), output_dir=out / "fine", init=str(pre.model_dir), steps=1,
                                 num_samples=1, val_every=0, overlap=0.0, **common),
                    dataclasses.replace(cfg, roi_size=(64, 32, 32)))


def test_brats21_recipe_end_to_end(brats, tmp_path):
    cfg = _train_config(None, "brats21", False, brats)  # what `gmim train --preset brats21` uses
    assert cfg == PRESETS["brats21"]  # multi-label regions kept, not replaced by the label codes' names
    assert (cfg.in_channels, cfg.roi_size, cfg.data.spacing) == (4, (128, 128, 128), (1.0, 1.0, 1.0))
    small = shrink(cfg)
    sample = finetune_transforms(small, False)(
        {"image": json.loads(brats.read_text())["validation"][0]["image"],
         "label": json.loads(brats.read_text())["validation"][0]["label"]})
    image, label = torch.as_tensor(sample["image"]), torch.as_tensor(sample["label"]).bool()
    assert image.shape[0] == 4 and label.shape[0] == 3
    codes = torch.as_tensor(np.asarray(nib.load(json.loads(brats.read_text())["validation"][0]["label"]).dataobj))
    for channel, members in enumerate(((1, 4), (1, 2, 4), (4,))):  # TC, WT, ET from the BraTS codes
        assert torch.equal(label[channel], torch.isin(codes, torch.tensor(members)))
    assert bool((label[2] <= label[0]).all() and (label[0] <= label[1]).all()) and label[2].any()  # nested, real
    for c in range(4):  # channel-wise z-score over the non-zero voxels; zeros stay zero
        nz = image[c][image[c] != 0]
        assert abs(float(nz.mean())) < 1e-3 and abs(float(nz.std()) - 1) < 1e-2
    result = _run(brats, small, tmp_path)
    assert result.report is not None and result.report.class_names == ("TC", "WT", "ET")
    saved = json.loads((result.model_dir / "config.json").read_text())
    assert saved["data"]["multi_label"] is True and saved["data"]["channel_names"] == ["FLAIR", "T1", "T1ce", "T2"]


def test_ct_abdomen_recipe_end_to_end(ct, tmp_path):
    cfg = _train_config(None, "ct_abdomen", False, ct)  # softmax preset: classes from the dataset.json
    assert cfg.out_channels == 4 and cfg.data.label_names == ("background", "CSF", "GM", "WM")
    assert len(PRESETS["ct_abdomen"].data.label_names) == 16 and not cfg.data.multi_label
    assert (cfg.data.spacing, cfg.data.ct_window, cfg.roi_size) == ((1.5, 1.5, 2.0), (-175.0, 250.0), (128,) * 3)
    small = shrink(cfg)
    entry = json.loads(ct.read_text())["validation"][0]
    sample = finetune_transforms(small, False)(entry)
    image = torch.as_tensor(sample["image"])
    spacing = np.linalg.norm(np.asarray(sample["image"].affine)[:3, :3], axis=0)
    assert np.allclose(spacing, (1.5, 1.5, 2.0))  # resampled from 2 mm by the real affine
    hu = np.asarray(nib.load(entry["image"]).dataobj)
    assert float(image.min()) == 0.0 and float(image.max()) <= 1.0  # air clipped at the window's floor
    wm_hu = float(np.median(hu[np.asarray(nib.load(entry["label"]).dataobj) == 3]))
    wm = torch.as_tensor(sample["label"])[0] == 3
    assert abs(float(image[0][wm].median()) - (wm_hu + 175) / 425) < 0.05  # HU window mapped linearly to [0, 1]
    result = _run(ct, small, tmp_path)
    assert result.report is not None and result.report.class_names == ("CSF", "GM", "WM")


# The AMOS 2022 label map, transcribed by hand (index: name, spelling as published; "arota" is the dataset's).
AMOS_2022_LABELS = {
    "0": "background", "1": "spleen", "2": "right kidney", "3": "left kidney", "4": "gall bladder", "5": "esophagus",
    "6": "liver", "7": "stomach", "8": "arota", "9": "postcava", "10": "pancreas", "11": "right adrenal gland",
    "12": "left adrenal gland", "13": "duodenum", "14": "bladder", "15": "prostate/uterus",
}


def test_ct_abdomen_classes_are_the_amos_2022_label_map(tmp_path):
    """The `ct_abdomen` preset's classes are AMOS 2022's, index for index and name for name.

    Source of AMOS_2022_LABELS: the "labels" object of splits/dataset_ct.json in the AMOS organisers' public
    repository (JiYuanFeng/AMOS on GitHub), which independent AMOS conversion scripts (e.g. for nnU-Net) repeat
    verbatim. The second half checks that a dataset.json carrying that map (keys written out of order) gives
    `gmim train` exactly the preset's classes, through the same reader `gmim train` uses."""
    preset = PRESETS["ct_abdomen"]
    assert preset.data.label_names == tuple(AMOS_2022_LABELS[str(i)] for i in range(len(AMOS_2022_LABELS)))
    assert preset.out_channels == len(AMOS_2022_LABELS) and not preset.data.multi_label
    shuffled = dict(sorted(AMOS_2022_LABELS.items(), key=lambda kv: kv[1]))  # JSON key order is not the index order
    assert list(shuffled) != list(AMOS_2022_LABELS)
    src = tmp_path / "dataset.json"
    src.write_text(json.dumps({"name": "AMOS", "modality": {"0": "CT"}, "labels": shuffled,
                               "training": [{"image": "./imagesTr/amos_0001.nii.gz",
                                             "label": "./labelsTr/amos_0001.nii.gz"}]}))
    assert read_task(src).label_names == preset.data.label_names
