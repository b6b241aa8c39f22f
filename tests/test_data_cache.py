"""`--cache none|memory|disk`: the disk cache key follows the preprocessing and the files, entries read back equal to
a fresh computation (affine included), and a fine-tuning run gives the same weights with and without a cache."""

from __future__ import annotations

import dataclasses
import json
import os

import pytest
import torch
from safetensors.torch import load_file

from gmim_hub.data import finetune_transforms, load_datalist
from gmim_hub.data.cache import DiskCacheDataset, cache_mode, make_dataset, transform_fingerprint
from gmim_hub.errors import ConfigError


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from gmim_hub.data import build_demo_dataset

    return build_demo_dataset(tmp_path_factory.mktemp("demo") / "data")


@pytest.fixture(scope="module")
def cfg():
    from gmim_hub.data import demo_config

    base = demo_config()
    return dataclasses.replace(base, roi_size=(64, 32, 32), data=dataclasses.replace(base.data, spacing=(4.0,) * 3))


def _with_spacing(cfg, spacing):
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, spacing=spacing))


def test_cache_mode_accepts_the_old_boolean():
    assert [cache_mode(v) for v in (True, False, None, "disk", "Memory")] == ["memory", "none", "none", "disk",
                                                                             "memory"]
    with pytest.raises(ConfigError, match="cache must be one of none, memory, disk, got 'ram'"):
        cache_mode("ram")


def test_fingerprint_is_stable_and_follows_the_preprocessing(cfg):
    a, b = transform_fingerprint(finetune_transforms(cfg, False)), transform_fingerprint(finetune_transforms(cfg, False))
    assert a == b  # two builds of one pipeline share their entries
    assert transform_fingerprint(finetune_transforms(_with_spacing(cfg, (3.0, 4.0, 4.0)), False)) != a
    zscore = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, intensity="minmax"))
    assert transform_fingerprint(finetune_transforms(zscore, False)) != a
    assert transform_fingerprint(finetune_transforms(cfg, True)) != a  # the training prefix pads to the ROI


def test_disk_cache_entries(demo, cfg, tmp_path):
    data = load_datalist(demo.dataset_json, split="validation", require_labels=True)
    folder = tmp_path / "cache"
    fresh = finetune_transforms(cfg, False)(dict(data[0]))
    first = make_dataset(data, finetune_transforms(cfg, False), cache="disk", cache_dir=folder)
    assert isinstance(first, DiskCacheDataset)
    computed = first[0]
    entries = sorted(folder.iterdir())
    assert len(entries) == 1 and entries[0].suffix == ".pt" and not list(folder.glob(".*.tmp"))
    assert oct(entries[0].stat().st_mode & 0o777) == oct(0o666 & ~_umask())

    hit = make_dataset(data, finetune_transforms(cfg, False), cache="disk", cache_dir=folder)
    hit._pre_transform = lambda item: pytest.fail("the entry was recomputed instead of read back")
    again = hit[0]
    assert sorted(folder.iterdir()) == entries
    for sample in (computed, again):
        for key in ("image", "label"):
            assert torch.equal(sample[key].as_tensor(), fresh[key].as_tensor())
            assert torch.equal(sample[key].affine, fresh[key].affine)  # the geometry survives the cache

    make_dataset(data, finetune_transforms(_with_spacing(cfg, (3.0, 4.0, 4.0)), False), cache="disk",
                 cache_dir=folder)[0]
    assert len(list(folder.iterdir())) == 2  # other spacing: a new entry, the old one is not read

    image = data[0]["image"]
    os.utime(image, ns=(1, 1))  # the image file changed (its mtime did): a new entry
    make_dataset(data, finetune_transforms(cfg, False), cache="disk", cache_dir=folder)[0]
    assert len(list(folder.iterdir())) == 3


def test_disk_cache_rejects_a_file_as_folder(demo, cfg, tmp_path):
    data = load_datalist(demo.dataset_json, split="validation", require_labels=True)
    (tmp_path / "f").write_text("x")
    with pytest.raises(ConfigError, match="is a file; pass --cache-dir with a folder"):
        make_dataset(data, finetune_transforms(cfg, False), cache="disk", cache_dir=tmp_path / "f")


def test_finetune_weights_do_not_depend_on_the_cache(demo, cfg, tmp_path):
    from gmim_hub.engine.finetune import FinetuneArgs, finetune

    datalist = tmp_path / "train_only.json"  # no validation split: the runs are only the two training steps
    datalist.write_text(json.dumps({"training": load_datalist(demo.dataset_json, split="training")}))
    weights = {}
    for mode in ("none", "memory", "disk"):
        args = FinetuneArgs(data=str(datalist), output_dir=tmp_path / mode, steps=2, num_samples=1,
                            val_every=0, cache=mode, log_every=1, precision="fp32", device="cpu", overlap=0.0)
        finetune(args, cfg)
        weights[mode] = load_file(tmp_path / mode / "model" / "model.safetensors")
    assert len(list((tmp_path / "disk" / "cache").glob("*.pt"))) == 1  # the one training volume
    for mode in ("memory", "disk"):
        assert weights[mode].keys() == weights["none"].keys()
        assert all(torch.equal(weights[mode][k], weights["none"][k]) for k in weights["none"])


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
