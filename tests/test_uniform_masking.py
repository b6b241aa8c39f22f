"""MaskingConfig(strategy="uniform"): the SimMIM-style baseline of the ablation, on a real MRI crop."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from gmim_hub.config import GMIMConfig, MaskingConfig, masking_reach_problems
from gmim_hub.errors import ConfigError
from gmim_hub.masking import (
    GridChoiced,
    MaskingCollate,
    MaskSeedd,
    cell_mask_ratios,
    sample_stage_masks,
    select_grid,
    token_grids,
)

ROI = 32


@pytest.fixture(scope="module")
def t1_crop() -> np.ndarray:
    """A (1, 32, 32, 32) crop of the MNI152 T1 (nilearn) on the edge of the head: half brain, half background."""
    datasets = pytest.importorskip("nilearn.datasets")
    t1 = np.asarray(datasets.load_mni152_template(resolution=2).dataobj, dtype=np.float32)
    crop = t1[2:2 + ROI, 40:40 + ROI, 30:30 + ROI]
    assert 0.2 < float((crop > 0.05).mean()) < 0.8  # both brain and background in the crop
    return ((crop - crop.mean()) / crop.std())[None]


def _masks(images: list[np.ndarray], cfg: MaskingConfig, seed: int) -> list[torch.Tensor | None]:
    tf, seeder = GridChoiced("image", cfg, value_range=(-3.0, 3.0)), MaskSeedd()
    seeder.set_random_state(seed)
    samples = [seeder(tf({"image": MetaTensor(torch.from_numpy(im))})) for im in images]
    return MaskingCollate(cfg, token_grids((ROI,) * 3, 2))(samples)["masks"]


def test_uniform_masks_exactly_the_ratio_at_every_point_over_the_whole_grid(t1_crop):
    cfg = MaskingConfig(grids=(2, 4, 8), strategy="uniform", extra_mask_prob=1.0)
    masks = _masks([t1_crop, t1_crop], cfg, seed=0)
    for t, m in enumerate(masks):
        n = m[0].numel()
        expected = math.floor(n * 0.5 * 0.5**t) / n  # one cell: floor(N * r * h^t) tokens of N
        assert m is not None and m.float().mean(dim=(1, 2, 3)).tolist() == [expected] * 2


def test_uniform_does_not_look_at_the_image(t1_crop):
    cfg = MaskingConfig(grids=(2, 4, 8), strategy="uniform", extra_mask_prob=0.5)
    noise = np.random.default_rng(0).normal(size=t1_crop.shape).astype(np.float32)
    flat = np.zeros_like(t1_crop)
    a, b = _masks([t1_crop, noise], cfg, seed=3), _masks([flat, -t1_crop], cfg, seed=3)
    for x, y in zip(a, b, strict=True):
        assert (x is None and y is None) or torch.equal(x, y)


def test_uniform_mean_ratio_matches_adaptive_and_is_spatially_even(t1_crop):
    """Mean over many draws: uniform masks base_ratio of the tokens in the brain and in the background alike;
    adaptive masks high-entropy cells more, with the same nominal mean (the middle of its ratio range)."""
    uniform = MaskingConfig(grids=(2, 4, 8), strategy="uniform")
    adaptive = MaskingConfig(grids=(2, 4, 8))
    tg = token_grids((ROI,) * 3, 2)[:1]
    gen = torch.Generator().manual_seed(0)
    brain = torch.from_numpy(t1_crop[0, ::2, ::2, ::2] > t1_crop.min() + 0.1)  # token-level foreground
    u = torch.stack([sample_stage_masks([1], [torch.tensor([0.5], dtype=torch.float64)], tg, uniform, gen)[0][0]
                     for _ in range(200)]).float()
    assert abs(u.mean().item() - uniform.mean_uniform_ratio) < 1e-3
    assert abs(u[:, brain].mean().item() - 0.5) < 0.01 and abs(u[:, ~brain].mean().item() - 0.5) < 0.01
    choice = select_grid(t1_crop, adaptive, (-3.0, 3.0))
    ratios = cell_mask_ratios(choice.entropy, adaptive)
    assert ratios.min() == pytest.approx(0.35) and ratios.max() == pytest.approx(0.65)  # centred on base_ratio
    a = sample_stage_masks([choice.grid], [ratios], tg, adaptive, gen)[0][0].float()
    assert a[brain].mean() > a[~brain].mean() + 0.05  # the adaptive masks depend on the image; uniform's do not


def test_uniform_ratio_option_and_its_validation():
    assert MaskingConfig(strategy="uniform", uniform_ratio=0.42).mean_uniform_ratio == 0.42
    assert MaskingConfig(strategy="uniform").mean_uniform_ratio == 0.5
    with pytest.raises(ConfigError, match="masking.strategy must be 'adaptive' or 'uniform'"):
        MaskingConfig(strategy="random")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"masking.uniform_ratio must be None or in \(0, 1\)"):
        MaskingConfig(strategy="uniform", uniform_ratio=1.0)
    # one cell spanning the token grid: a small ROI whose finest adaptive grid could not mask still can
    cfg = GMIMConfig(feature_size=12, roi_size=(32,) * 3, masking=MaskingConfig(grids=(2, 4, 8), strategy="uniform"))
    assert masking_reach_problems(cfg) == []
    assert GMIMConfig.from_dict(cfg.to_dict()) == cfg
