"""Shared fixtures: tiny configs and inputs, so every test runs on CPU in seconds. Append new fixtures below."""

from __future__ import annotations

import pytest
import torch

from gmim_hub import PRESETS, GMIMConfig


@pytest.fixture(scope="session")
def tiny_config() -> GMIMConfig:
    """The `tiny` preset: feature_size 12, depths (2,1,1,1), 64^3 ROI."""
    return PRESETS["tiny"]


@pytest.fixture(scope="session")
def tiny_input() -> torch.Tensor:
    """(1, 1, 64, 64, 64): the smallest volume Swin UNETR takes (its InstanceNorms need > 1 voxel at 1/32)."""
    return torch.randn(1, 1, 64, 64, 64, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="session", autouse=True)
def gmim_cache_dir(tmp_path_factory):
    """One cache folder per test session (ONNX exports and compiled OpenVINO models), never the user's own."""
    mp = pytest.MonkeyPatch()
    path = tmp_path_factory.mktemp("gmim-cache")
    mp.setenv("GMIM_CACHE_DIR", str(path))
    yield path
    mp.undo()
