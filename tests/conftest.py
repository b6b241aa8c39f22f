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
