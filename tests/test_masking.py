"""gmim_hub.masking's data-loader side: `GridChoiced`, `MaskSeedd` and `MaskingCollate` draw grids, ratios and
masks in the loader workers. The masking arithmetic itself: test_entropy.py and test_token_masks.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _original_masking import (
    VOLUMES,
    UniqueCfg,
    half_flat_volume,
)
from monai.data import DataLoader, MetaTensor

from gmim_hub.config import MaskingConfig
from gmim_hub.errors import InputError
from gmim_hub.masking import (
    GridChoiced,
    MaskingCollate,
    MaskSeedd,
    cell_mask_ratios,
    collate_mask_info,
    collate_with_mask_info,
    sample_stage_masks,
    select_grid,
    token_grids,
)

# ---- data pipeline -----------------------------------------------------------------------------------------


def test_grid_choice_transform_and_collate():
    cfg = UniqueCfg(grids=(2, 4, 8))
    vols = [half_flat_volume(), VOLUMES["few-values"](), np.zeros((1, 16, 16, 16), np.float32)]
    tf = GridChoiced(keys="image", cfg=cfg)
    data = [tf({"image": MetaTensor(torch.from_numpy(v)), "id": i}) for i, v in enumerate(vols)]
    for d, v in zip(data, vols, strict=True):
        choice = select_grid(v, cfg)
        assert d["mask_grid"] == choice.grid
        assert torch.equal(d["mask_ratios"], cell_mask_ratios(choice.entropy, cfg))
    loader = DataLoader(data, batch_size=3, collate_fn=collate_with_mask_info)
    batch = next(iter(loader))
    assert batch["image"].shape == (3, 1, 16, 16, 16) and batch["id"].tolist() == [0, 1, 2]
    assert batch["mask_grid"] == [d["mask_grid"] for d in data]
    grids, ratios = collate_mask_info([[data[0], data[1]], data[2]])
    assert grids == batch["mask_grid"] and [r.shape for r in ratios] == [(g**3,) for g in grids]
    masks = sample_stage_masks(grids, ratios, token_grids((16,) * 3, 2)[:1], cfg, torch.Generator())
    assert masks[0].shape == (3, 8, 8, 8)


def _seeded_samples(n: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    cfg = UniqueCfg(grids=(2, 4, 8))
    tf = GridChoiced(keys="image", cfg=cfg)
    return [tf({"image": MetaTensor(torch.from_numpy(rng.normal(size=(1, 16, 16, 16)).astype(np.float32)))})
            for _ in range(n)]


def _same(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    return (a is None and b is None) or (a is not None and b is not None and torch.equal(a, b))


def test_masking_collate_draws_the_masks_in_the_loader():
    cfg = MaskingConfig(grids=(2, 4, 8), extra_mask_prob=1.0)
    tg = token_grids((16,) * 3, 2)
    samples = _seeded_samples(4, 0)
    collate = MaskingCollate(cfg, tg)

    def batches(num_workers: int, seed: int) -> list[dict]:
        seeder = MaskSeedd()
        seeder.set_random_state(seed)
        data = [seeder(s) for s in samples]
        return list(DataLoader(data, batch_size=2, num_workers=num_workers, collate_fn=collate))

    one, again, workers, other = batches(0, 7), batches(0, 7), batches(2, 7), batches(0, 8)
    for b in range(2):
        seeds = [int(s) for s in np.random.RandomState(7).randint(0, np.iinfo(np.int64).max, 4, dtype=np.int64)]
        state = np.random.SeedSequence(seeds[2 * b:2 * b + 2]).generate_state(1, np.uint64)[0]
        expected = sample_stage_masks(one[b]["mask_grid"], one[b]["mask_ratios"], tg, cfg,
                                      torch.Generator().manual_seed(int(state) >> 1))
        assert len(one[b]["masks"]) == 4 and "mask_seed" not in one[b]
        assert one[b]["masks"][0].shape == (2, 8, 8, 8) and one[b]["masks"][0].dtype == torch.bool
        for got, ref, rep, wrk in zip(one[b]["masks"], expected, again[b]["masks"], workers[b]["masks"], strict=True):
            assert _same(got, ref) and _same(got, rep) and _same(got, wrk)  # the worker count has no effect
        assert not _same(one[b]["masks"][0], other[b]["masks"][0])


def test_masking_collate_needs_the_seed():
    collate = MaskingCollate(MaskingConfig(grids=(2, 4, 8)), token_grids((16,) * 3, 2))
    with pytest.raises(InputError, match=r"samples \[0, 1\] lack 'mask_seed'; add MaskSeedd after GridChoiced"):
        collate(_seeded_samples(2, 0))


