"""save_pretrained / from_pretrained / from_pretrained_encoder: bit-exact round trips, strict loading with useful
errors, Hub cache resolution (offline included) and the model card."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from gmim_hub import ConfigError, GMIMForPretraining, GMIMForSegmentation, WeightsError
from gmim_hub.hub import render_model_card

REV = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tiny_config):
    torch.manual_seed(10)
    root = tmp_path_factory.mktemp("saved")
    seg = GMIMForSegmentation(tiny_config).eval()
    pre = GMIMForPretraining(tiny_config).eval()
    seg.save_pretrained(root / "seg")
    pre.save_pretrained(root / "pre")
    return SimpleNamespace(root=root, seg=seg, pre=pre)


def _copy(saved, kind: str, dst: Path) -> Path:
    return Path(shutil.copytree(saved.root / kind, dst / kind))


def _rewrite_weights(folder: Path, edit) -> None:
    """Apply `edit(tensors)` to folder/model.safetensors, keeping the header metadata."""
    path = folder / "model.safetensors"
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata=meta)


def _fill_cache(cache: Path, repo_id: str, src: Path, names=("config.json", "model.safetensors", "README.md")) -> str:
    """A hand-written Hub cache: models--ORG--NAME/refs/main holds the revision, files in snapshots/<revision>/."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(REV)
    snap = repo / "snapshots" / REV
    snap.mkdir(parents=True)
    for n in names:
        shutil.copy(src / n, snap / n)
    return REV


def _assert_same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_saved_folder_holds_exactly_config_weights_and_card(saved, tiny_config):
    folder = saved.root / "seg"
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    assert json.loads((folder / "config.json").read_text()) == tiny_config.to_dict()
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        assert f.metadata()["gmim_hub.model_kind"] == "segmentation"


def test_segmenter_round_trip_is_bit_exact(saved, tiny_input):
    loaded = GMIMForSegmentation.from_pretrained(saved.root / "seg")
    assert not loaded.training and loaded.hub_revision is None and loaded.config == saved.seg.config
    _assert_same_state(saved.seg, loaded)
    with torch.no_grad():
        assert torch.equal(saved.seg(tiny_input), loaded(tiny_input))


def test_pretraining_round_trip_is_bit_exact(saved, tiny_input):
    loaded = GMIMForPretraining.from_pretrained(str(saved.root / "pre"))
    assert not loaded.training
    _assert_same_state(saved.pre, loaded)
    y = tiny_input.flip(-2)
    with torch.no_grad():
        a, b = saved.pre(tiny_input, y), loaded(tiny_input, y)
    for name in ("z_x", "z_y", "reconstruction"):
        assert torch.equal(getattr(a, name), getattr(b, name))


def test_renamed_key_fails_strictly_and_lists_both_names(saved, tmp_path):
    folder = _copy(saved, "seg", tmp_path)
    _rewrite_weights(folder, lambda t: t.__setitem__("out.conv.conv.kernel", t.pop("out.conv.conv.weight")))
    with pytest.raises(WeightsError) as err:
        GMIMForSegmentation.from_pretrained(folder)
    msg = str(err.value)
    assert "1 missing (out.conv.conv.weight)" in msg and "1 unexpected (out.conv.conv.kernel)" in msg
    assert str(folder) in msg and "\n" not in msg
    model, info = GMIMForSegmentation.from_pretrained(folder, strict=False, output_loading_info=True)
    assert info["missing_keys"] == ["out.conv.conv.weight"] and info["unexpected_keys"] == ["out.conv.conv.kernel"]
    assert torch.equal(model.swinViT.patch_embed.proj.weight, saved.seg.swinViT.patch_embed.proj.weight)


def test_config_that_does_not_fit_the_weights_reports_shapes(saved, tmp_path):
    folder = _copy(saved, "seg", tmp_path)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["out_channels"] = 3
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(WeightsError, match=r"mis-shaped \(out\.conv\.conv\.weight: file \[2, 12, 1, 1, 1\] vs "
                                           r"model \[3, 12, 1, 1, 1\]"):
        GMIMForSegmentation.from_pretrained(folder)


@pytest.mark.parametrize(
    ("cls", "kind", "hint"),
    [
        (GMIMForSegmentation, "pre", "This folder holds a pre-training checkpoint; use "
                                     "GMIMForSegmentation.from_pretrained_encoder"),
        (GMIMForPretraining, "seg", "This folder holds a segmentation model; load it with "
                                    "GMIMForSegmentation.from_pretrained"),
    ],
)
def test_loading_the_wrong_kind_says_what_to_use(saved, cls, kind, hint):
    with pytest.raises(WeightsError) as err:
        cls.from_pretrained(saved.root / kind)
    assert hint in str(err.value)
    assert "missing" in str(err.value) and "unexpected" in str(err.value)


def test_truncated_safetensors_is_named(saved, tmp_path):
    folder = _copy(saved, "seg", tmp_path)
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(WeightsError) as err:
        GMIMForSegmentation.from_pretrained(folder)
    assert str(path) in str(err.value) and "truncated or corrupt" in str(err.value)


class _Payload:
    """Unpickling this creates a marker file: stands in for a malicious pytorch_model.bin."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_folder_with_only_pickled_weights_is_refused_unopened(saved, tmp_path):
    folder = tmp_path / "bin_only"
    folder.mkdir()
    shutil.copy(saved.root / "seg" / "config.json", folder)
    marker = tmp_path / "was_unpickled"
    torch.save({"x": _Payload(marker)}, folder / "pytorch_model.bin")
    with pytest.raises(WeightsError) as err:
        GMIMForSegmentation.from_pretrained(folder)
    msg = str(err.value)
    assert "no model.safetensors, only pickle-based weights (pytorch_model.bin)" in msg
    assert "gmim convert" in msg
    assert not marker.exists()


def test_folder_without_files_says_what_is_missing(saved, tmp_path, tiny_config):
    (tmp_path / "empty").mkdir()
    with pytest.raises(WeightsError, match="has no model.safetensors \\(found: nothing\\)"):
        GMIMForSegmentation.from_pretrained(tmp_path / "empty")
    folder = _copy(saved, "seg", tmp_path)
    (folder / "config.json").unlink()
    with pytest.raises(WeightsError, match="has no config.json; save the model with save_pretrained, or pass config"):
        GMIMForSegmentation.from_pretrained(folder)
    assert GMIMForSegmentation.from_pretrained(folder, config=tiny_config).config == tiny_config


@pytest.mark.parametrize("bad", ["../x", "a/../../b", "a/b/c", "./x", "a/./b", "org/bad name", "~/x", "/abs/x"])
def test_path_like_or_invalid_repo_ids_are_rejected(bad, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(WeightsError) as err:
        GMIMForSegmentation.from_pretrained(bad, local_files_only=True)
    assert f"{bad!r} is not an existing local directory and not a valid Hub repo id" in str(err.value)


def test_hub_cache_resolves_offline_with_revision(saved, tmp_path):
    cache = tmp_path / "hub"
    rev = _fill_cache(cache, "org/tiny-seg", saved.root / "seg")
    model = GMIMForSegmentation.from_pretrained("org/tiny-seg", cache_dir=cache, local_files_only=True)
    assert model.hub_revision == rev and model.hub_source == "org/tiny-seg"
    _assert_same_state(saved.seg, model)
    pinned = GMIMForSegmentation.from_pretrained("org/tiny-seg", revision=rev, cache_dir=cache,
                                                 local_files_only=True)
    assert pinned.hub_revision == rev
    with pytest.raises(WeightsError, match="of org/tiny-seg@v2 is not in the local cache at .*local_files_only=True"):
        GMIMForSegmentation.from_pretrained("org/tiny-seg", revision="v2", cache_dir=cache, local_files_only=True)


def test_cached_repo_with_only_pickled_weights_points_to_convert(saved, tmp_path):
    cache = tmp_path / "hub"
    _fill_cache(cache, "org/old", saved.root / "seg", names=("config.json",))
    torch.save({"w": torch.zeros(1)}, cache / "models--org--old" / "snapshots" / REV / "pytorch_model.bin")
    with pytest.raises(WeightsError, match=r"only pickle-based weights \(pytorch_model.bin\).*gmim convert"):
        GMIMForSegmentation.from_pretrained("org/old", cache_dir=cache, local_files_only=True)


_OFFLINE_SCRIPT = """
import sys, torch
from safetensors.torch import load_file
from gmim_hub import GMIMForSegmentation, WeightsError
m = GMIMForSegmentation.from_pretrained("org/tiny-seg")
ref = load_file(sys.argv[1])
same = len(ref) == len(m.state_dict()) and all(torch.equal(v, ref[k]) for k, v in m.state_dict().items())
print("LOADED", m.hub_revision, same, m.training)
try:
    GMIMForSegmentation.from_pretrained("org/not-cached")
except WeightsError as e:
    print("ERROR", e)
"""


def test_offline_hub_cache_in_a_subprocess(saved, tmp_path):
    """HF_HUB_OFFLINE is read when huggingface_hub is imported, hence a fresh interpreter."""
    home = tmp_path / "hf"
    rev = _fill_cache(home / "hub", "org/tiny-seg", saved.root / "seg")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(home), "HF_HUB_CACHE": str(home / "hub")}
    env.pop("HF_ENDPOINT", None)
    proc = subprocess.run([sys.executable, "-c", _OFFLINE_SCRIPT, str(saved.root / "seg" / "model.safetensors")],
                          env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == f"LOADED {rev} True False"
    assert lines[1].startswith("ERROR config.json of org/not-cached@main is not in the local cache at "
                               f"{home / 'hub' / 'models--org--not-cached'} and HF_HUB_OFFLINE is set")
    assert "run once online" in lines[1] and "pass a local directory" in lines[1]


def test_from_pretrained_encoder_loads_n_of_m_in_train_mode(saved, caplog):
    with caplog.at_level(logging.INFO, logger="gmim_hub"):
        seg = GMIMForSegmentation.from_pretrained_encoder(saved.root / "pre")
    n = sum(1 for k in seg.state_dict() if k.startswith("swinViT."))
    assert f"loaded {n} of {len(seg.state_dict())} tensors" in caplog.text
    assert seg.training and seg.base_model == str((saved.root / "pre").resolve())
    enc = saved.pre.swinViT.state_dict()
    assert all(torch.equal(v, enc[k.removeprefix("swinViT.")]) for k, v in seg.state_dict().items()
               if k.startswith("swinViT."))


def test_from_pretrained_encoder_takes_a_fitting_config_and_rejects_others(saved, tiny_config):
    import dataclasses

    seg = GMIMForSegmentation.from_pretrained_encoder(
        saved.root / "pre", config=dataclasses.replace(tiny_config, out_channels=3))
    assert seg.out.conv.conv.out_channels == 3
    with pytest.raises(ConfigError, match="feature_size 24 vs 12"):
        GMIMForSegmentation.from_pretrained_encoder(
            saved.root / "pre", config=dataclasses.replace(tiny_config, feature_size=24))


def test_from_pretrained_encoder_rejects_a_missing_encoder_key(saved, tmp_path):
    folder = _copy(saved, "pre", tmp_path)
    _rewrite_weights(folder, lambda t: t.pop("swinViT.layers1.0.blocks.0.attn.qkv.weight"))
    with pytest.raises(WeightsError, match=r"1 missing \(swinViT\.layers1\.0\.blocks\.0\.attn\.qkv\.weight\)"):
        GMIMForSegmentation.from_pretrained_encoder(folder)


def _front_matter(text: str) -> dict:
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def test_model_card_metadata_and_body(saved):
    text = (saved.root / "seg" / "README.md").read_text()
    meta = _front_matter(text)
    assert meta["library_name"] == "gmim-hub" and meta["pipeline_tag"] == "image-segmentation"
    assert meta["license"] == "apache-2.0"
    assert {"medical", "3d", "swin-unetr", "self-supervised", "gmim", "gmim-segmentation"} <= set(meta["tags"])
    assert "base_model" not in meta and "model-index" not in meta
    assert "Research use only, not for diagnosis" in text
    assert "doi:10.1016/j.compbiomed.2024.108547" in text and "GMIMForSegmentation.from_pretrained(" in text
    assert "| ROI (sliding window) | 64 x 64 x 64 |" in text


def test_fine_tuned_card_has_base_model_and_results(saved, tmp_path, tiny_config):
    cache = tmp_path / "hub"
    rev = _fill_cache(cache, "org/tiny-pre", saved.root / "pre")
    seg = GMIMForSegmentation.from_pretrained_encoder("org/tiny-pre", cache_dir=cache, local_files_only=True)
    assert seg.base_model == "org/tiny-pre" and seg.base_model_revision == rev
    seg.save_pretrained(tmp_path / "ft", metrics={"dice": 0.8, "dice/tumour": 0.7}, eval_dataset="Toy Brains",
                        card_data={"license": "cc-by-4.0", "tags": ["brain"]})
    meta = _front_matter((tmp_path / "ft" / "README.md").read_text())
    assert meta["base_model"] == "org/tiny-pre" and meta["license"] == "cc-by-4.0" and "brain" in meta["tags"]
    result = meta["model-index"][0]["results"][0]
    assert result["dataset"] == {"name": "Toy Brains", "type": "toy-brains"}
    assert result["metrics"] == [{"type": "dice", "value": 0.8, "name": "dice"},
                                 {"type": "dice", "value": 0.7, "name": "dice (tumour)"}]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"metrics": {"dice": 0.5}}, "metrics need eval_dataset="),
        ({"metrics": {"dice": float("nan")}, "eval_dataset": "d"}, "metrics['dice'] must be a finite number"),
        ({"metrics": {"dice": True}, "eval_dataset": "d"}, "metrics['dice'] must be a finite number, got True"),
        ({"metrics": {"/x": 0.5}, "eval_dataset": "d"}, "metric name '/x' must look like 'dice'"),
        ({"card_data": {"library_name": "x"}}, "card_data may not set library_name"),
    ],
)
def test_bad_model_card_arguments(tiny_config, kwargs, message):
    with pytest.raises(ConfigError) as err:
        render_model_card(tiny_config, model_kind="segmentation", **kwargs)
    assert message in str(err.value)


def test_loading_leaves_the_global_rng_alone(saved):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    GMIMForSegmentation.from_pretrained(saved.root / "seg")
    assert torch.equal(torch.rand(3), expected)


def test_dtype_device_and_push_arguments(saved, tmp_path):
    model = GMIMForSegmentation.from_pretrained(saved.root / "seg", dtype="bfloat16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.swinViT.layers1[0].blocks[0].attn.relative_position_index.dtype == torch.int64
    with pytest.raises(ConfigError, match="dtype must be a floating torch dtype"):
        GMIMForSegmentation.from_pretrained(saved.root / "seg", dtype="int8")
    with pytest.raises(ConfigError, match="device must be a torch device such as 'cpu'"):
        GMIMForSegmentation.from_pretrained(saved.root / "seg", device="gpu0")
    with pytest.raises(ConfigError, match="push_to_hub=True needs repo_id"):
        saved.seg.save_pretrained(tmp_path / "never", push_to_hub=True)
    assert not (tmp_path / "never").exists()
