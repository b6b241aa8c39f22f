"""GMIMConfig: validation messages, the strict config.json round trip, presets."""

from __future__ import annotations

import dataclasses
import json

import pytest

from gmim_hub import PRESETS, ConfigError, DataConfig, GMIMConfig, GMIMError, MaskingConfig, get_preset


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"feature_size": 13}, "feature_size must be a positive multiple of 12, got 13"),
        ({"depths": (2, 2, 2)}, "depths must be four positive ints"),
        ({"depths": (2, 0, 2, 2)}, "depths must be four positive ints"),
        ({"num_heads": (5, 6, 12, 24)}, "num_heads[0]=5 must divide the stage width"),
        ({"window_size": 0}, "window_size must be >= 1, got 0"),
        ({"patch_size": 4}, "patch_size must be 2"),
        ({"roi_size": (64, 64, 48)}, "roi_size must be three positive multiples of 32"),
        ({"in_channels": 0}, "in_channels must be >= 1, got 0"),
        ({"out_channels": 0}, "out_channels must be >= 1, got 0"),
        ({"drop_rate": 1.0}, "drop_rate must be in [0, 1), got 1.0"),
        ({"target_momentum": 1.0}, "target_momentum must be in [0, 1), got 1.0"),
        ({"projector_dim": 0}, "projector_dim must be >= 1, got 0"),
        ({"format_version": 3}, "format_version 3 is not supported"),
        ({"data": DataConfig(label_names=("a", "b", "c"))}, "out_channels=2 but data.label_names has 3 names"),
        ({"data": DataConfig(channel_names=("T1", "T2"))}, "in_channels=1 but data.channel_names has 2 names"),
    ],
)
def test_invalid_config_values_are_rejected_with_the_rule(kwargs, message):
    with pytest.raises(ConfigError) as err:
        GMIMConfig(**kwargs)
    assert message in str(err.value)
    assert isinstance(err.value, (GMIMError, ValueError))


@pytest.mark.parametrize(
    ("factory", "message"),
    [
        (lambda: MaskingConfig(base_ratio=1.2), "masking.base_ratio must be in (0, 1), got 1.2"),
        (lambda: MaskingConfig(base_ratio=0.8, scale=0.5), "masking.base_ratio*(1+scale) must be <= 1"),
        (lambda: MaskingConfig(grids=()), "masking.grids must be a non-empty tuple of positive ints"),
        (lambda: DataConfig(modality="PET"), "data.modality must be 'CT' or 'MRI', got 'PET'"),
        (lambda: DataConfig(orientation="XYZ"), "data.orientation must be a 3-letter axis code"),
        (lambda: DataConfig(spacing=(1.0, 0.0, 1.0)), "data.spacing must be None or three positive numbers"),
    ],
)
def test_invalid_nested_values_name_the_nested_field(factory, message):
    with pytest.raises(ConfigError, match=None) as err:
        factory()
    assert message in str(err.value)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_config_json_round_trip_is_exact(tmp_path, name):
    cfg = PRESETS[name]
    path = tmp_path / "config.json"
    cfg.to_json_file(path)
    assert GMIMConfig.from_json_file(path) == cfg
    assert json.loads(path.read_text()) == cfg.to_dict()


def test_presets_can_be_replaced_and_looked_up():
    cfg = dataclasses.replace(PRESETS["tiny"], out_channels=4)
    assert cfg.out_channels == 4 and cfg.feature_size == 12
    assert get_preset("base").feature_size == 48 and get_preset("base").encoder_dim == 768
    with pytest.raises(ConfigError, match="unknown preset 'huge'; choose one of base, brats21, ct_abdomen, tiny"):
        get_preset("huge")


def _dict(**changes):
    d = PRESETS["tiny"].to_dict()
    d.update(changes)
    return d


def test_unknown_keys_are_rejected_by_name():
    d = _dict(foo=1)
    d["data"]["colour"] = "red"
    with pytest.raises(ConfigError) as err:
        GMIMConfig.from_dict(d)
    assert "unknown config key(s) foo" in str(err.value)
    d.pop("foo")
    with pytest.raises(ConfigError, match=r"unknown config key\(s\) data\.colour"):
        GMIMConfig.from_dict(d)


def test_missing_keys_are_rejected_by_name_unless_partial():
    d = _dict()
    del d["window_size"]
    del d["masking"]["scale"]
    with pytest.raises(ConfigError) as err:
        GMIMConfig.from_dict(d)
    assert "missing config key(s)" in str(err.value)
    assert "window_size" in str(err.value)
    d["masking"]["scale"] = 0.3
    assert GMIMConfig.from_dict(d, partial=True).window_size == GMIMConfig().window_size


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"feature_size": "48"}, "feature_size must be int, got str '48'"),
        ({"in_channels": True}, "in_channels must be int, got bool True"),
        ({"depths": [2, 2, 2]}, "depths must have 4 items, got 3"),
        ({"roi_size": 64}, "roi_size must be a list, got int 64"),
        ({"drop_rate": "0.1"}, "drop_rate must be a number, got str '0.1'"),
        ({"use_v2": 1}, "use_v2 must be bool, got int 1"),
    ],
)
def test_wrong_types_are_rejected(changes, message):
    with pytest.raises(ConfigError) as err:
        GMIMConfig.from_dict(_dict(**changes))
    assert message in str(err.value)


def test_a_literal_field_lists_its_choices():
    d = _dict()
    d["data"]["intensity"] = "zscore"
    with pytest.raises(ConfigError, match="data.intensity must be one of 'ct_window', 'zscore_nonzero', 'minmax'"):
        GMIMConfig.from_dict(d)


def test_invalid_json_file_is_a_config_error(tmp_path):
    path = tmp_path / "config.json"
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="is not valid JSON"):
        GMIMConfig.from_json_file(path)
    path.write_text("[1, 2]")
    with pytest.raises(ConfigError, match="must hold a JSON object, got list"):
        GMIMConfig.from_json_file(path)


def test_masking_reach_is_checked_per_insertion_point():
    from gmim_hub.config import masking_reach_problems

    assert masking_reach_problems(PRESETS["tiny"]) == [] and masking_reach_problems(PRESETS["base"]) == []
    # ROI 32: 4^3 tokens at the last point; even the coarsest grid's 8 tokens * 0.65 * 0.5^3 < 1. A segmentation
    # config may have it (pre-training refuses it); the first point still masks, so GMIMConfig accepts it.
    small = dataclasses.replace(PRESETS["tiny"], roi_size=(32, 32, 32))
    assert [p.split(":")[0] for p in masking_reach_problems(small)] == ["insertion point 3 never masks"]
    assert masking_reach_problems(dataclasses.replace(small, masking=MaskingConfig(
        grids=(2, 4, 8), hierarchical_decay=0.0))) == []
    with pytest.raises(ConfigError, match=r"insertion point 0 never masks with masking.grids \[32\]: roi_size "
                                          r"\(64, 64, 64\) gives 1 token\(s\) per cell"):
        dataclasses.replace(PRESETS["tiny"], masking=MaskingConfig(grids=(8, 32)))


def test_a_version_1_dict_upgrades_to_what_it_meant():
    """Round-1 config.json files (and checkpoints) lack the version-2 keys; they mean MONAI 1.5+ merging and the
    distinct-value entropy, so the upgraded dict equals the current dict of that model."""
    from gmim_hub.config import upgrade_config_dict

    tiny = PRESETS["tiny"]
    current = dataclasses.replace(tiny, masking=dataclasses.replace(tiny.masking, entropy_estimator="unique")).to_dict()
    v1 = json.loads(json.dumps(current))
    del v1["patch_merging"]
    for key in ("entropy_estimator", "histogram_bins", "histogram_range"):
        del v1["masking"][key]
    v1["format_version"] = 1
    assert upgrade_config_dict(v1) == current and current["patch_merging"] == "merging"
    assert upgrade_config_dict(current) is current
    assert GMIMConfig.from_dict(v1) == GMIMConfig.from_dict(current)
