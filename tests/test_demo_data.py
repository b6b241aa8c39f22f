"""The embedded MNI152 demo dataset (real nilearn template data, built offline at 2 mm)."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from gmim_hub import ConfigError
from gmim_hub.data import build_demo_dataset, demo_config, finetune_transforms, load_datalist, pretrain_transforms
from gmim_hub.data.demo import LABEL_NAMES, DemoPaths, tissue_labels

pytest.importorskip("nilearn")


@pytest.fixture(scope="module", params=["coronal", "sagittal"])
def demo(request, tmp_path_factory) -> tuple[DemoPaths, str]:
    split = request.param
    return build_demo_dataset(tmp_path_factory.mktemp(f"demo_{split}"), resolution=2, split=split), split


def _load(path: Path) -> tuple[np.ndarray, np.ndarray]:
    img = nib.load(path)
    return np.asarray(img.dataobj), img.affine


def test_files_exist(demo) -> None:
    paths, _ = demo
    for p in (paths.dataset_json, paths.train_image, paths.train_label, paths.val_image, paths.val_label,
              paths.manifest, *paths.pretrain_images):
        assert p.is_file() and p.is_relative_to(paths.root), p


def test_labels_are_four_tissues_present_in_both_parts(demo) -> None:
    paths, _ = demo
    for label_path, image_path in ((paths.train_label, paths.train_image), (paths.val_label, paths.val_image)):
        labels, _ = _load(label_path)
        image, _ = _load(image_path)
        assert labels.dtype == np.uint8 and labels.shape == image.shape
        counts = np.bincount(labels.ravel(), minlength=4)
        assert len(counts) == 4 and np.all(counts > 100), counts
        assert np.all(image[labels == 0] <= 0.2) and np.all(image[labels > 0] > 0.2)  # the brain mask rule


def test_parts_are_disjoint_in_world_space_and_tile_the_template(demo) -> None:
    paths, split = demo
    axis = {"coronal": 1, "sagittal": 0}[split]
    whole, whole_aff = _load(paths.pretrain_images[0])
    (train, train_aff), (val, val_aff) = _load(paths.train_image), _load(paths.val_image)
    for aff in (train_aff, val_aff):  # same grid and spacing; only the origin along the cut axis moves
        np.testing.assert_allclose(np.delete(aff, 3, axis=1), np.delete(whole_aff, 3, axis=1))
        np.testing.assert_allclose(np.delete(aff[:3, 3], axis), np.delete(whole_aff[:3, 3], axis))
    train_coords = train_aff[axis, 3] + train_aff[axis, axis] * np.arange(train.shape[axis])
    val_coords = val_aff[axis, 3] + val_aff[axis, axis] * np.arange(val.shape[axis])
    assert train_coords.max() < 0 <= val_coords.min()
    np.testing.assert_array_equal(np.concatenate([train, val], axis=axis), whole)  # nothing lost, nothing shared
    # a voxel of the validation part maps to the same world point, and holds the same value, as in the template
    ijk = np.array([10, 20, 30])
    world = val_aff @ [*ijk, 1]
    whole_ijk = np.round(np.linalg.inv(whole_aff) @ world).astype(int)[:3]
    assert val[tuple(ijk)] == whole[tuple(whole_ijk)]


def test_pretrain_views_are_the_template_and_its_hemispheres(demo) -> None:
    paths, _ = demo
    whole, aff = _load(paths.pretrain_images[0])
    assert whole.shape == (99, 117, 95) and np.allclose(np.diag(aff)[:3], 2.0)
    left, right = _load(paths.pretrain_images[1])[0], _load(paths.pretrain_images[2])[0]
    assert left.shape[0] + right.shape[0] == whole.shape[0]
    assert [Path(e["image"]).name for e in load_datalist(paths.pretrain_dir)] == sorted(
        p.name for p in paths.pretrain_images)


def test_template_is_mirror_symmetric_as_documented(demo) -> None:
    """The reason the sagittal split is not the default (see gmim_hub.data.demo)."""
    whole, _ = _load(demo[0].pretrain_images[0])
    assert np.abs(whole - whole[::-1]).max() == 0


def test_dataset_json_is_msd_style_and_loadable(demo) -> None:
    paths, split = demo
    info = json.loads(paths.dataset_json.read_text())
    assert info["labels"] == {"0": "background", "1": "CSF", "2": "GM", "3": "WM"} and info["modality"] == {"0": "T1"}
    assert split in info["description"]
    train = load_datalist(paths.dataset_json, split="training", channel_names=("T1",), require_labels=True)
    val = load_datalist(paths.dataset_json, split="validation", channel_names=("T1",), require_labels=True)
    assert [train[0]["image"], val[0]["image"]] == [str(paths.train_image), str(paths.val_image)]
    assert train[0]["label"] == str(paths.train_label)


def test_rebuild_is_skipped_and_a_damaged_file_is_rebuilt(demo) -> None:
    paths, split = demo
    manifest = json.loads(paths.manifest.read_text())
    stamp = paths.train_image.stat().st_mtime_ns
    assert build_demo_dataset(paths.root, split=split) == paths
    assert paths.train_image.stat().st_mtime_ns == stamp
    good = paths.val_label.read_bytes()
    paths.val_label.write_bytes(good[:-10])
    build_demo_dataset(paths.root, split=split)
    assert paths.val_label.read_bytes() == good  # deterministic output: the same bytes again
    assert json.loads(paths.manifest.read_text()) == manifest


def test_demo_pipelines_run_on_the_real_data(demo) -> None:
    paths, _ = demo
    cfg = demo_config()
    entry = load_datalist(paths.dataset_json, split="training")[0]
    crops = finetune_transforms(cfg, train=True)(entry)
    assert all(c["image"].shape == (1, 64, 64, 64) and c["label"].max() <= 3 for c in crops)
    val = finetune_transforms(cfg, train=False)(load_datalist(paths.dataset_json, split="validation")[0])
    np.testing.assert_allclose(val["image"].affine.numpy(), nib.load(paths.val_image).affine)
    views = pretrain_transforms(cfg, margin=16)({"image": str(paths.pretrain_images[0])})
    assert views["image"].shape == views["target"].shape == (1, 64, 64, 64)
    assert torch.isfinite(views["target"]).all()


def test_demo_config() -> None:
    cfg = demo_config()
    assert (cfg.in_channels, cfg.out_channels, cfg.feature_size, cfg.roi_size) == (1, 4, 12, (64, 64, 64))
    assert cfg.data.label_names == LABEL_NAMES and cfg.data.spacing == (2.0, 2.0, 2.0)
    assert cfg.data.channel_names == ("T1",) and cfg.data.intensity == "zscore_nonzero"
    assert demo_config(1).data.spacing == (1.0, 1.0, 1.0)


@pytest.mark.parametrize("kwargs, match", [
    ({"resolution": 3}, "resolution must be 1 or 2 .*, got 3"),
    ({"split": "axial"}, "split must be 'coronal' or 'sagittal', got 'axial'"),
])
def test_bad_demo_arguments(tmp_path: Path, kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        build_demo_dataset(tmp_path, **kwargs)


def test_tissue_rule() -> None:
    brain = np.array([False, True, True, True, True, True])
    gm = np.array([0.9, 0.1, 0.6, 0.3, 0.5, 0.45])
    wm = np.array([0.0, 0.2, 0.3, 0.6, 0.5, 0.45])
    assert tissue_labels(brain, gm, wm).tolist() == [0, 1, 2, 3, 2, 1]  # outside, CSF, GM, WM, tie->GM, <0.5->CSF


@pytest.mark.slow
def test_one_millimetre_build(tmp_path: Path) -> None:
    paths = build_demo_dataset(tmp_path, resolution=1)
    labels, aff = _load(paths.train_label)
    assert labels.shape == (197, 134, 189) and np.allclose(np.diag(aff)[:3], 1.0)
    assert set(np.unique(labels)) == {0, 1, 2, 3}
