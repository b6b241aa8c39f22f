"""gmim_hub.data: datalists, affine-keeping transforms, the two-view sampler, and worker-safe seeding.

All volumes are tiny synthetic NIfTIs written with nibabel into tmp_path."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.transforms import Compose

from gmim_hub import PRESETS, ConfigError, DataConfig, InputError
from gmim_hub.data import (
    base_transforms,
    finetune_transforms,
    load_datalist,
    make_dataset,
    make_loader,
    pretrain_transforms,
)

ROI = (32, 32, 32)


def _nifti(path: Path, shape=(8, 9, 10), affine=None, data=None, dtype=np.float32) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.random.default_rng(0).random(shape).astype(dtype) if data is None else data
    nib.save(nib.Nifti1Image(arr, np.eye(4) if affine is None else affine), path)
    return str(path)


def _cfg(roi=ROI, **data_kw) -> object:
    data = DataConfig(**{"spacing": None, **data_kw})
    return dataclasses.replace(PRESETS["tiny"], roi_size=roi, data=data)


# ----------------------------------------------------------------------------------------------------- datalists


@pytest.fixture
def msd(tmp_path: Path) -> Path:
    for i in range(4):
        _nifti(tmp_path / "imagesTr" / f"c{i}.nii.gz")
        _nifti(tmp_path / "labelsTr" / f"c{i}.nii.gz", dtype=np.uint8, data=np.full((8, 9, 10), i % 3, np.uint8))
    _nifti(tmp_path / "imagesTs" / "t0.nii.gz")
    info = {"modality": {"0": "T1"}, "labels": {"0": "bg", "1": "a", "2": "b"},
            "training": [{"image": f"./imagesTr/c{i}.nii.gz", "label": f"./labelsTr/c{i}.nii.gz"} for i in range(4)],
            "test": ["./imagesTs/t0.nii.gz"]}
    (tmp_path / "dataset.json").write_text(json.dumps(info))
    return tmp_path / "dataset.json"


def test_msd_json_paths_are_absolute_and_relative_to_the_json(msd: Path) -> None:
    entries = load_datalist(msd, channel_names=("T1",), require_labels=True)
    assert [Path(e["image"]).name for e in entries] == [f"c{i}.nii.gz" for i in range(4)]
    assert all(Path(e["image"]).is_absolute() and Path(e["label"]).parent.name == "labelsTr" for e in entries)
    assert all("imagesTs" not in e["image"] for e in load_datalist(msd, split="all"))  # MSD test images are not data


def test_msd_kfold_is_a_partition(msd: Path) -> None:
    folds = [load_datalist(msd, split="validation", fold=k, num_folds=2) for k in range(2)]
    train0 = load_datalist(msd, split="training", fold=0, num_folds=2)
    val0, val1 = ({e["image"] for e in f} for f in folds)
    assert val0 and val1 and val0.isdisjoint(val1)
    assert val0 | val1 == {e["image"] for e in load_datalist(msd)}
    assert {e["image"] for e in train0} == val1


def test_msd_without_fold_has_no_validation(msd: Path) -> None:
    with pytest.raises(ConfigError, match="has no validation split; pass fold="):
        load_datalist(msd, split="validation")


def test_base_dir_overrides_the_json_folder(msd: Path, tmp_path: Path) -> None:
    moved = tmp_path / "elsewhere" / "list.json"
    moved.parent.mkdir()
    moved.write_text(msd.read_text())
    with pytest.raises(InputError, match="does not exist"):
        load_datalist(moved)
    assert len(load_datalist(moved, base_dir=msd.parent)) == 4


def test_folder_of_nifti_is_sorted_and_unlabelled(tmp_path: Path) -> None:
    for name in ("b.nii.gz", "a.nii", "c.nii.gz"):
        _nifti(tmp_path / name)
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "._a.nii").write_bytes(b"macOS resource fork")  # hidden files are skipped
    entries = load_datalist(tmp_path)
    assert [Path(e["image"]).name for e in entries] == ["a.nii", "b.nii.gz", "c.nii.gz"]
    assert all(set(e) == {"image"} for e in entries)


def test_empty_folder_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"holds no \*\.nii or \*\.nii\.gz files"):
        load_datalist(tmp_path)


def _fold_json(tmp_path: Path, n: int = 6) -> Path:
    entries = [{"image": _nifti(tmp_path / f"v{i}.nii.gz"), "fold": i % 3} for i in range(n)]
    (tmp_path / "folds.json").write_text(json.dumps({"training": entries}))
    return tmp_path / "folds.json"


def test_fold_json_uses_the_fold_ints(tmp_path: Path) -> None:
    src = _fold_json(tmp_path)
    val = load_datalist(src, split="validation", fold=1)
    train = load_datalist(src, split="training", fold=1)
    assert [Path(e["image"]).name for e in val] == ["v1.nii.gz", "v4.nii.gz"]
    assert len(train) == 4 and not {e["image"] for e in train} & {e["image"] for e in val}
    with pytest.raises(ConfigError, match=r"splits by 'fold'; pass fold= \(one of \[0, 1, 2\]\)"):
        load_datalist(src, split="training")


def test_explicit_validation_key(tmp_path: Path) -> None:
    info = {"training": [{"image": _nifti(tmp_path / "t.nii.gz")}], "validation": [{"image": "v.nii.gz"}]}
    _nifti(tmp_path / "v.nii.gz")
    (tmp_path / "d.json").write_text(json.dumps(info))
    assert Path(load_datalist(tmp_path / "d.json", split="validation")[0]["image"]).name == "v.nii.gz"
    assert len(load_datalist(tmp_path / "d.json", split="all")) == 2
    with pytest.raises(ConfigError, match="explicit 'validation' list; fold=0 cannot apply"):
        load_datalist(tmp_path / "d.json", fold=0)


def test_fraction_is_seeded_and_leaves_validation_alone(tmp_path: Path) -> None:
    src = _fold_json(tmp_path, n=12)  # 8 training entries for fold 0
    a = load_datalist(src, fold=0, fraction=0.3, seed=1)
    assert len(a) == 3 and a == load_datalist(src, fold=0, fraction=0.3, seed=1)
    seeds = {tuple(e["image"] for e in load_datalist(src, fold=0, fraction=0.3, seed=s)) for s in range(6)}
    assert len(seeds) > 1
    assert len(load_datalist(src, split="validation", fold=0, fraction=0.3)) == 4


def test_missing_file_names_it(msd: Path) -> None:
    (msd.parent / "labelsTr" / "c2.nii.gz").unlink()
    with pytest.raises(InputError, match=r"labelsTr/c2\.nii\.gz \(listed in .*dataset\.json\) does not exist; fix the"):
        load_datalist(msd)


@pytest.mark.parametrize("name, payload, match", [
    ("bad.nii.gz", b"this is not gzip at all", "is not a readable NIfTI file"),
    ("bad.nii", b"\x00" * 20, "is not a readable NIfTI file"),
])
def test_corrupt_file_is_reported(tmp_path: Path, name: str, payload: bytes, match: str) -> None:
    (tmp_path / name).write_bytes(payload)
    with pytest.raises(InputError, match=rf"{name} \(listed in .*\) {match}.*re-export it"):
        load_datalist(tmp_path)


def test_truncated_uncompressed_file_is_reported(tmp_path: Path) -> None:
    path = Path(_nifti(tmp_path / "t.nii", shape=(16, 16, 16)))
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(InputError, match=r"t\.nii is truncated \(5000 bytes, the header needs 16736\)"):
        load_datalist(tmp_path)


def test_multichannel_order_is_kept_and_checked(tmp_path: Path) -> None:
    files = [_nifti(tmp_path / f"{m}.nii.gz") for m in ("t2", "flair")]
    (tmp_path / "d.json").write_text(json.dumps({"training": [{"image": files}]}))
    entries = load_datalist(tmp_path / "d.json", channel_names=("T2", "FLAIR"))
    assert [Path(p).name for p in entries[0]["image"]] == ["t2.nii.gz", "flair.nii.gz"]
    with pytest.raises(InputError, match=r"has 2 channel\(s\) but the model expects 1 \(T1\)"):
        load_datalist(tmp_path / "d.json", channel_names=("T1",))


@pytest.mark.parametrize("modality, match", [
    ({"0": "T2", "1": "FLAIR"}, r"lists modalities \['T2', 'FLAIR'\] but the model expects channels \['FLAIR', 'T2'\]"),
    ({"a": "T2", "b": "FLAIR"}, "'modality' must map channel indices to names"),
])
def test_msd_modality_order_must_match(msd: Path, modality: dict, match: str) -> None:
    info = json.loads(msd.read_text())
    info["training"] = [{"image": [e["image"], e["image"]]} for e in info["training"]]
    info["modality"] = modality
    msd.write_text(json.dumps(info))
    with pytest.raises(InputError, match=match):
        load_datalist(msd, channel_names=("FLAIR", "T2"))


@pytest.mark.parametrize("shapes, key, match", [
    (((8, 9, 10), (8, 9, 11)), "image", "the channel files of one image differ in shape"),
    (((8, 9, 10), (8, 9, 11)), "label", "label .* has shape .* but its image has"),
])
def test_shape_mismatches(tmp_path: Path, shapes, key: str, match: str) -> None:
    a, b = (_nifti(tmp_path / f"{i}.nii.gz", shape=s) for i, s in enumerate(shapes))
    entry = {"image": [a, b]} if key == "image" else {"image": a, "label": b}
    (tmp_path / "d.json").write_text(json.dumps({"training": [entry]}))
    with pytest.raises(InputError, match=match):
        load_datalist(tmp_path / "d.json")


@pytest.mark.parametrize("kwargs, match", [
    ({"split": "test"}, "split must be 'training', 'validation' or 'all', got 'test'"),
    ({"fraction": 0.0}, r"fraction must be in \(0, 1\], got 0.0"),
    ({"fold": -1}, "fold must be None or an int >= 0, got -1"),
    ({"fold": 5, "num_folds": 5}, "fold must be < num_folds=5, got 5"),
    ({"num_folds": 1}, "num_folds must be an int >= 2, got 1"),
])
def test_bad_split_arguments(msd: Path, kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        load_datalist(msd, **kwargs)


@pytest.mark.parametrize("content, match", [
    ("{not json", "is not valid JSON"),
    ('{"images": []}', "must be a JSON object with a 'training' list"),
    ('{"training": [{"label": "x.nii"}]}', "every 'training' entry needs an 'image'"),
    ('{"training": [{"image": "x.nii", "fold": "1"}]}', "'fold' must be an int"),
])
def test_malformed_json(tmp_path: Path, content: str, match: str) -> None:
    (tmp_path / "d.json").write_text(content)
    with pytest.raises(InputError, match=match):
        load_datalist(tmp_path / "d.json")


def test_missing_source(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"nope\.json does not exist; pass a dataset\.json"):
        load_datalist(tmp_path / "nope.json")


def test_require_labels(tmp_path: Path) -> None:
    _nifti(tmp_path / "a.nii.gz")
    with pytest.raises(InputError, match="has no 'label'; a segmentation task needs one per image"):
        load_datalist(tmp_path, require_labels=True)


# ---------------------------------------------------------------------------------------------------- transforms

# LPS-like, anisotropic and axis-permuted: file axis 1 runs along -z, axis 2 along +y.
ODD_AFFINE = np.array([[-1.5, 0, 0, 20.0], [0, 0, 2.0, -30.0], [0, -1.0, 0, 40.0], [0, 0, 0, 1]])


def test_orientation_and_spacing_keep_world_coordinates(tmp_path: Path) -> None:
    shape, marker = (10, 12, 14), (2, 3, 4)
    label = np.zeros(shape, np.uint8)
    label[marker] = 3
    entry = {"image": _nifti(tmp_path / "i.nii.gz", shape, ODD_AFFINE),
             "label": _nifti(tmp_path / "l.nii.gz", shape, ODD_AFFINE, data=label)}
    cfg = _cfg(spacing=(1.0, 1.0, 1.0), orientation="RAS")
    out = Compose(base_transforms(cfg, ["image"], "label"))(entry)
    # RAS at 1 mm, origin at the world-minimum corner voxel: x from voxel 9 (20 - 1.5*9), z from voxel 11 (40 - 11)
    expected = np.array([[1, 0, 0, 6.5], [0, 1, 0, -30.0], [0, 0, 1, 29.0], [0, 0, 0, 1]])
    np.testing.assert_allclose(out["image"].affine.numpy(), expected)
    np.testing.assert_allclose(out["label"].affine.numpy(), expected)
    np.testing.assert_allclose(out["image"].meta["original_affine"], ODD_AFFINE)
    assert out["label"].dtype == torch.int64 and set(out["label"].unique().tolist()) == {0, 3}
    voxels = np.argwhere(out["label"][0].numpy() == 3)
    world = (expected[:3, :3] @ voxels.T).T + expected[:3, 3]
    np.testing.assert_allclose(world.mean(0), (ODD_AFFINE @ [*marker, 1])[:3], atol=0.5)


@pytest.mark.parametrize("orientation", ["LPS", "RAS"])
def test_orientation_without_resampling(tmp_path: Path, orientation: str) -> None:
    out = Compose(base_transforms(_cfg(orientation=orientation), ["image"]))(
        {"image": _nifti(tmp_path / "i.nii.gz", (10, 12, 14), ODD_AFFINE)})
    codes = "".join(nib.aff2axcodes(out["image"].affine.numpy()))
    assert codes == orientation and out["image"].shape == (1, 10, 14, 12)


@pytest.mark.parametrize("intensity, values, expected", [
    ("ct_window", [-2000.0, -1000.0, 0.0, 1000.0, 3000.0], [0.0, 0.0, 0.5, 1.0, 1.0]),
    ("minmax", [0.0, 5.0, 10.0, 20.0, 40.0], [0.0, 0.125, 0.25, 0.5, 1.0]),
])
def test_linear_intensities(tmp_path: Path, intensity: str, values, expected) -> None:
    data = np.array(values, np.float32).reshape(5, 1, 1)
    out = Compose(base_transforms(_cfg(intensity=intensity), ["image"]))(
        {"image": _nifti(tmp_path / "i.nii.gz", data=data)})
    np.testing.assert_allclose(out["image"].numpy().ravel(), expected, atol=1e-6)


def test_zscore_nonzero_keeps_background_zero(tmp_path: Path) -> None:
    data = np.zeros((12, 12, 12), np.float32)
    data[3:9, 3:9, 3:9] = np.random.default_rng(1).normal(300, 40, (6, 6, 6))
    out = Compose(base_transforms(_cfg(intensity="zscore_nonzero"), ["image"]))(
        {"image": _nifti(tmp_path / "i.nii.gz", data=data)})["image"][0]
    assert torch.all(out[data == 0] == 0)
    fg = out[torch.from_numpy(data != 0)]
    assert abs(fg.mean().item()) < 1e-4 and abs(fg.std(unbiased=False).item() - 1) < 1e-3


def test_multichannel_files_stack_in_order(tmp_path: Path) -> None:
    files = [_nifti(tmp_path / f"{k}.nii.gz", data=np.full((6, 6, 6), k + 1.0, np.float32)) for k in range(3)]
    out = Compose(base_transforms(_cfg(intensity="ct_window", ct_window=(0.0, 10.0)), ["image"]))({"image": files})
    assert out["image"].shape == (3, 6, 6, 6)
    np.testing.assert_allclose(out["image"][:, 0, 0, 0].numpy(), [0.1, 0.2, 0.3], atol=1e-6)


def test_brats_label_hook(tmp_path: Path) -> None:
    lab = np.zeros((6, 6, 6), np.uint8)
    lab[0, 0, 0], lab[1, 0, 0], lab[2, 0, 0] = 1, 2, 4
    cfg = dataclasses.replace(PRESETS["tiny"], out_channels=3, data=DataConfig(
        spacing=None, multi_label=True, label_names=("TC", "WT", "ET")))
    entry = {"image": _nifti(tmp_path / "i.nii.gz", (6, 6, 6)), "label": _nifti(tmp_path / "l.nii.gz", data=lab)}
    out = finetune_transforms(cfg, train=False)(entry)["label"]
    assert out.shape == (3, 6, 6, 6) and out.dtype == torch.float32
    assert out[:, :3, 0, 0].T.tolist() == [[1, 1, 0], [0, 1, 0], [1, 1, 1]]  # NCR: TC+WT, ED: WT, ET: all three


def _volume(tmp_path: Path, shape=(48, 48, 48)) -> str:
    data = np.random.default_rng(7).normal(100, 20, shape).astype(np.float32)
    return _nifti(tmp_path / "vol.nii.gz", shape, np.diag([1.2, 1.0, 0.8, 1.0]), data=data)


def _offset(view: torch.Tensor) -> np.ndarray:
    """Voxel offset of a crop in the (unflipped, RAS) input grid, from its affine."""
    return np.round(view.affine.numpy()[:3, 3] / np.array([1.2, 1.0, 0.8])).astype(int)


def test_pretrain_views_have_roi_shape_and_overlap(tmp_path: Path) -> None:
    cfg, seen = _cfg(), []
    tf = pretrain_transforms(cfg, margin=8, train=False, target_aug=False, extra=[lambda d: seen.append(d) or d])
    tf.set_random_state(seed=3)
    for _ in range(4):
        out = tf({"image": _volume(tmp_path)})
        x, y = out["image"], out["target"]
        assert x.shape == y.shape == (1, *ROI) and seen[-1] is out
        dx = _offset(y) - _offset(x)
        assert np.all(np.abs(dx) <= 8)
        a = x[(0, *[slice(max(d, 0), 32 + min(d, 0)) for d in dx])]
        b = y[(0, *[slice(max(-d, 0), 32 + min(-d, 0)) for d in dx])]
        torch.testing.assert_close(a, b)  # the overlap holds the same voxels
        if np.any(dx != 0):
            assert not torch.equal(x, y)
    assert len({tuple(_offset(d["image"])) for d in seen}) > 1


def test_target_augmentation_changes_only_the_target(tmp_path: Path) -> None:
    plain = pretrain_transforms(_cfg(), margin=0, train=False, target_aug=False)
    augmented = pretrain_transforms(_cfg(), margin=0, train=False, target_aug=True)
    changed = 0
    for seed in range(6):
        plain.set_random_state(seed=seed)
        augmented.set_random_state(seed=seed)
        a, b = plain({"image": _volume(tmp_path)}), augmented({"image": _volume(tmp_path)})
        torch.testing.assert_close(a["image"], b["image"])  # margin 0: both views are the same crop
        torch.testing.assert_close(a["image"], a["target"])
        changed += not torch.allclose(b["image"], b["target"])
    assert changed >= 3  # P(no augmentation at all) = 0.3 * 0.6 * 0.5 = 0.09 per sample


def test_pretrain_margin_must_be_a_non_negative_int() -> None:
    with pytest.raises(ConfigError, match="margin must be an int >= 0, got -1"):
        pretrain_transforms(_cfg(), margin=-1)


def test_finetune_train_crops_and_val_full_volume(tmp_path: Path) -> None:
    label = np.zeros((40, 30, 36), np.uint8)
    label[10:20, 10:20, 10:20] = 1
    entry = {"image": _nifti(tmp_path / "i.nii.gz", (40, 30, 36)),
             "label": _nifti(tmp_path / "l.nii.gz", data=label)}
    cfg = dataclasses.replace(_cfg(), out_channels=2)
    crops = finetune_transforms(cfg, train=True)(entry)
    assert len(crops) == 2 and all(c["image"].shape == c["label"].shape[:1] + ROI for c in crops)
    assert crops[0]["label"].dtype == torch.int64
    full = finetune_transforms(cfg, train=False)(entry)
    assert full["image"].shape == (1, 40, 30, 36) and torch.equal(full["label"][0], torch.from_numpy(label).long())
    batch = next(iter(make_loader([entry], finetune_transforms(cfg, train=True), batch_size=1, shuffle=False,
                                  num_workers=0, seed=0)))
    assert batch["image"].shape == (2, 1, *ROI)  # two crops of one volume, flattened into the batch


# ------------------------------------------------------------------------------------------------------- loaders


def _epoch(data, seed: int, epoch: int, workers: int, **kw) -> list[dict]:
    tf = None if not isinstance(data, list) else pretrain_transforms(_cfg(), margin=8)
    loader = make_loader(data, tf, batch_size=1, shuffle=False, num_workers=workers, seed=seed, epoch=epoch, **kw)
    return list(loader)


def _same(a: list[dict], b: list[dict]) -> bool:
    return all(torch.equal(p["image"], q["image"]) and torch.equal(p["target"], q["target"]) for p, q in zip(a, b, strict=True))


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_streams_are_per_worker_per_epoch_and_reproducible(tmp_path: Path, workers: int) -> None:
    data = [{"image": _volume(tmp_path)}] * 4  # four copies of one volume: only the random state tells them apart
    e0, e0_again, e1 = _epoch(data, 5, 0, workers), _epoch(data, 5, 0, workers), _epoch(data, 5, 1, workers)
    assert len(e0) == 4 and _same(e0, e0_again)
    assert not any(torch.equal(p["image"], q["image"]) for p, q in zip(e0, e1, strict=True))
    assert not torch.equal(e0[0]["image"], e0[1]["image"])  # with 2 workers: batch 0 from worker 0, 1 from worker 1
    assert not _same(e0, _epoch(data, 6, 0, workers))


def test_cached_dataset_gives_the_same_batches(tmp_path: Path) -> None:
    data = [{"image": _volume(tmp_path)}] * 2
    cached = make_dataset(data, pretrain_transforms(_cfg(), margin=8), cache=True)
    assert _same(_epoch(data, 1, 3, 0), _epoch(cached, 1, 3, 0))


@pytest.mark.parametrize("kwargs, match", [
    ({"batch_size": 0}, "batch_size must be an int >= 1, got 0"),
    ({"num_workers": -1}, "num_workers must be an int >= 0, got -1"),
    ({"epoch": -2}, "epoch must be an int >= 0, got -2"),
    ({"distributed": True}, "distributed=True needs an initialised torch.distributed process group"),
    ({"transform": None}, "make_loader needs transform= when data is a datalist"),
])
def test_loader_bad_arguments(tmp_path: Path, kwargs: dict, match: str) -> None:
    args = {"transform": pretrain_transforms(_cfg()), "batch_size": 1, "shuffle": True, "num_workers": 0,
            "seed": 0, **kwargs}
    with pytest.raises(ConfigError, match=match):
        make_loader([{"image": "x.nii.gz"}], **args)


def test_two_view_sampler_is_reseeded_by_its_pipeline(tmp_path: Path) -> None:
    """`set_random_state` on the pipeline must reach the wrapped sampler and target augmentation; MONAI's unseeded
    transforms share one class-level stream, so advancing it must not change a seeded result."""
    from monai.transforms import Randomizable

    outs = []
    for _ in range(2):
        tf = pretrain_transforms(_cfg(), margin=8)
        tf.set_random_state(seed=11)
        Randomizable.R.random_sample(1000)  # advance the shared default stream
        outs.append(tf({"image": _volume(tmp_path)}))
    assert torch.equal(outs[0]["image"], outs[1]["image"]) and torch.equal(outs[0]["target"], outs[1]["target"])


def test_distributed_loader_uses_a_seeded_sampler(tmp_path: Path) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        data = [{"image": _volume(tmp_path)}] * 8
        orders = [list(make_loader(data, pretrain_transforms(_cfg()), batch_size=1, shuffle=True, num_workers=0,
                                   seed=0, epoch=e, distributed=True).sampler) for e in (0, 0, 1)]
        assert sorted(orders[0]) == list(range(8)) and orders[0] == orders[1] != orders[2]
    finally:
        dist.destroy_process_group()
