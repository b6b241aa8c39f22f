"""gmim_hub.masking against docs/method.md and a transcription of the original's masking arithmetic."""

from __future__ import annotations

import re
import warnings

import numpy as np
import pytest
import torch
from monai.data import DataLoader, MetaTensor
from monai.networks.blocks import PatchEmbed
from scipy.stats import entropy as scipy_entropy

from gmim_hub import _entropy as entropy_module
from gmim_hub import _token_masks as masks_module
from gmim_hub.config import MaskingConfig
from gmim_hub.errors import ConfigError, InputError
from gmim_hub.masking import (
    GridChoiced,
    MaskingCollate,
    MaskSeedd,
    cell_entropies,
    cell_entropy,
    cell_mask_ratios,
    check_grids_divide,
    collate_mask_info,
    collate_with_mask_info,
    sample_stage_masks,
    select_grid,
    token_grids,
    voxel_loss_mask,
)


def UniqueCfg(**kw) -> MaskingConfig:
    """The original's cell entropy (distinct values), which the reproductions below compare against."""
    return MaskingConfig(entropy_estimator="unique", **kw)


# ---- the original masking, transcribed statelessly: per-cell loops, np.unique + scipy ----------------------------


def appendix_cells(vol, g):
    c, d, h, w = vol.shape
    v = vol.reshape(c, g, d // g, g, h // g, g, w // g).transpose(1, 3, 5, 0, 2, 4, 6)
    return v.reshape(g**3, -1)


def appendix_entropy(a):
    _, cnt = np.unique(a, return_counts=True)
    return scipy_entropy(cnt, base=2)


def appendix_cells_chained(vol, grids):
    c, d, h, w = vol.shape
    image, out = vol, []
    for g in grids:
        v = image.reshape(c, g, d // g, g, h // g, g, w // g).transpose(0, 1, 3, 5, 2, 4, 6)
        v = v.reshape(c, g**3, -1).transpose(1, 0, 2)
        out.append(v.reshape(g**3, -1))
        image = np.ascontiguousarray(v)
        image = image.reshape(c, d, h, w)
    return out


def appendix_select_grid(vol, grids, legacy):
    cells = appendix_cells_chained(vol, grids) if legacy else [appendix_cells(vol, g) for g in grids]
    hs = [np.array([appendix_entropy(c) for c in cl]) for cl in cells]
    with np.errstate(divide="ignore", invalid="ignore"):
        score = [g**-0.1 * h.std() / h.mean() for g, h in zip(grids, hs, strict=True)]
    best = int(np.argmax(score))
    return grids[best], hs[best], hs


def appendix_cell_ratios(h, r0=0.5, scale=0.3):
    u = sorted(set(h.tolist()))
    levels = np.linspace(1 - scale, 1 + scale, len(u))
    return np.array([r0 * levels[u.index(x)] for x in h])


def appendix_token_cell_layout(n, g):
    """Cell index of every token of an (n, n, n) grid, laid out as the original's mask_token / token_mask."""
    s = n // g
    ids = np.repeat(np.arange(g**3), s**3).reshape(g, g, g, s, s, s)
    return ids.transpose(0, 3, 1, 4, 2, 5).reshape(n, n, n)


def appendix_token_mask(n, g, ratios, rng):
    t = (n // g) ** 3
    m = np.ones((g**3, t))
    for k, r in enumerate(ratios):
        m[k, rng.permutation(t)[: int(t * min(r, 1.0))]] = 0
    s = n // g
    return m.reshape(g, g, g, s, s, s).transpose(0, 3, 1, 4, 2, 5).reshape(n, n, n)


# ---- test volumes ------------------------------------------------------------------------------------------


def smooth_volume(shape, levels, seed):
    """Blocky random field quantised to `levels` values: realistic ties and varied cell entropies."""
    rng = np.random.default_rng(seed)
    c, d, h, w = shape
    coarse = rng.standard_normal((c, d // 4, h // 4, w // 4))
    field = coarse.repeat(4, 1).repeat(4, 2).repeat(4, 3) + 0.3 * rng.standard_normal(shape)
    return np.round((field - field.min()) / np.ptp(field) * (levels - 1)).astype(np.float32)


VOLUMES = {  # 16^3 keeps the per-cell scipy loops fast; 2-grid cells of 512 values exercise long rows
    "uint8-like": lambda: smooth_volume((1, 16, 16, 16), 256, 0),
    "few-values": lambda: smooth_volume((1, 16, 16, 16), 5, 1),
    "two-channel": lambda: smooth_volume((2, 16, 16, 16), 40, 2),
    "continuous": lambda: np.random.default_rng(3).standard_normal((1, 16, 16, 16)).astype(np.float32),
    "background": lambda: smooth_volume((1, 16, 16, 16), 30, 4) * (np.arange(16) < 6)[None, None, None],
    "non-cubic": lambda: smooth_volume((1, 8, 16, 24), 20, 5),
}


def block_cell(values, shape=(4, 4, 4)):
    return np.asarray(values, dtype=np.float32).reshape(shape)


# ---- entropy -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("values", "bits"), [
    ([7.0] * 64, 0.0),
    ([0.0] * 32 + [1.0] * 32, 1.0),
    ([0.0, 1.0, 2.0, 3.0] * 16, 2.0),
    (list(range(8)) * 8, 3.0),
    ([0.0] * 32 + [1.0] * 16 + [2.0] * 16, 1.5),
    ([-0.0] * 32 + [0.0] * 32, 0.0),  # -0.0 == 0.0, as np.unique
])
def test_cell_entropy_hand_checked(values, bits):
    vol = np.zeros((1, 8, 8, 8), np.float32)
    vol[0, 4:, :4, 4:] = block_cell(values)  # cell (1, 0, 1) of the 2-grid = raster index 5
    h = cell_entropy(vol, 2)
    assert h.shape == (8,) and h.dtype == np.float64
    assert h[5] == pytest.approx(bits, abs=1e-12)
    assert np.all(np.delete(h, 5) == 0.0)


def test_cell_entropy_pools_channels():
    vol = np.stack([np.zeros((4, 4, 4)), np.ones((4, 4, 4))]).astype(np.float32)  # each channel constant
    assert cell_entropy(vol, 1).tolist() == [1.0]


@pytest.mark.parametrize("name", sorted(VOLUMES))
@pytest.mark.parametrize("legacy", [False, True])
def test_cell_entropies_equal_scipy_bit_for_bit(name, legacy):
    vol = VOLUMES[name]()
    grids = (2, 4, 8)
    ours = cell_entropies(vol, grids, legacy_chained_cells=legacy)
    cells = appendix_cells_chained(vol, grids) if legacy else [appendix_cells(vol, g) for g in grids]
    for g, h, cl in zip(grids, ours, cells, strict=True):
        ref = np.array([appendix_entropy(c) for c in cl])
        np.testing.assert_array_equal(h, ref, err_msg=f"grid {g}")


@pytest.mark.parametrize("grids", [(2, 4, 8), (8, 4, 2), (3, 6), (4, 6), (2, 3, 6, 12)])
@pytest.mark.parametrize(("levels", "coarsened"), [(3, True), (None, False)])
def test_nested_grids_merge_runs_bit_exactly(grids, levels, coarsened, monkeypatch):
    """Coarser grids are merged from finer ones when the volume has many ties (few levels), and computed directly
    for continuous values or non-nested grids; both paths must equal scipy per cell."""
    calls = []
    real = entropy_module._coarsen_runs
    monkeypatch.setattr(entropy_module, "_coarsen_runs", lambda *a: calls.append(a[1:]) or real(*a))
    noise = np.random.default_rng(7).standard_normal((2, 24, 24, 24)).astype(np.float32)  # all values distinct
    vol = smooth_volume((2, 24, 24, 24), levels, 6) if levels else noise
    ours = cell_entropies(vol, grids)
    for g, h in zip(grids, ours, strict=True):
        np.testing.assert_array_equal(h, [appendix_entropy(c) for c in appendix_cells(vol, g)], err_msg=f"grid {g}")
    nested = any(f % g == 0 for g in grids for f in grids if f > g)
    assert bool(calls) == (coarsened and nested)


def test_legacy_cells_are_spatial_only_for_the_first_grid():
    vol = VOLUMES["uint8-like"]()
    spatial = cell_entropies(vol, (2, 4, 8))
    legacy = cell_entropies(vol, (2, 4, 8), legacy_chained_cells=True)
    np.testing.assert_array_equal(legacy[0], spatial[0])
    assert not np.array_equal(legacy[1], spatial[1]) and not np.array_equal(legacy[2], spatial[2])
    np.testing.assert_array_equal(cell_entropy(vol, 8, legacy_chained_cells=True, preceding_grids=(2, 4)), legacy[2])


@pytest.mark.parametrize("channels", [1, 2])
@pytest.mark.parametrize("legacy", [False, True])
def test_select_grid_and_ratios_equal_appendix_a(channels, legacy):
    """ROI-64 volumes with the paper's grids (4, 8, 16): same grid, same entropies, same ratio vector."""
    vol = smooth_volume((channels, 64, 64, 64), 200, 10 + channels)
    vol[:, :, :, :20] = 0.0  # background: many cells tie at the lowest entropy
    cfg = UniqueCfg(grids=(4, 8, 16), legacy_chained_cells=legacy)
    grid, h_ref, _ = appendix_select_grid(vol, (4, 8, 16), legacy)
    choice = select_grid(vol, cfg)
    assert choice.grid == grid
    np.testing.assert_array_equal(choice.entropy, h_ref)
    ratios = cell_mask_ratios(choice.entropy, cfg)
    assert ratios.dtype == torch.float64 and ratios.shape == (grid**3,)
    np.testing.assert_array_equal(ratios.numpy(), appendix_cell_ratios(h_ref))


@pytest.mark.parametrize("grids", [(4, 8, 16), (16, 8, 4), (2,)])
def test_constant_volume_picks_first_grid_without_warnings(grids):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        choice = select_grid(np.full((1, 32, 32, 32), 3.0, np.float32), UniqueCfg(grids=grids))
    assert choice.grid == grids[0] and np.all(choice.entropy == 0.0)


def half_flat_volume():
    """Left half a 0/1 voxel checkerboard (1 bit in any even cell), right half constant: std/mean = 1 exactly."""
    i = np.indices((16, 16, 16)).sum(0) % 2
    vol = np.where(np.arange(16) < 8, i, 5).astype(np.float32)
    return vol[None]


@pytest.mark.parametrize(("grids", "penalty", "expected"), [
    ((2, 4, 8), 0.0, 2),  # exact tie: the first maximum wins
    ((8, 4, 2), 0.0, 8),
    ((8, 4, 2), 0.1, 2),  # the penalty g^-0.1 breaks the tie towards coarse grids
])
def test_select_grid_ties_and_penalty(grids, penalty, expected):
    assert select_grid(half_flat_volume(), UniqueCfg(grids=grids, grid_penalty=penalty)).grid == expected


def test_select_grid_finds_the_scale_of_the_structure():
    """3-D checkerboard of 4^3 blocks, alternately noisy (0/1) and flat: only the 8-grid (4^3 cells) separates them
    (score 8^-0.1); coarser cells all look alike (score 0), 2^3 cells score 16^-0.1 < 8^-0.1."""
    block = (np.indices((32, 32, 32)) // 4).sum(0) % 2
    vol = np.where(block == 1, np.indices((32, 32, 32)).sum(0) % 2, 0).astype(np.float32)[None]
    choice = select_grid(vol, UniqueCfg(grids=(2, 4, 8, 16)))
    assert choice.grid == 8
    assert sorted(set(choice.entropy.tolist())) == [0.0, 1.0]


def test_select_grid_accepts_tensors_and_metatensors():
    vol = VOLUMES["two-channel"]()
    cfg = UniqueCfg(grids=(2, 4, 8))
    ref = select_grid(vol, cfg)
    for x in (torch.from_numpy(vol), MetaTensor(torch.from_numpy(vol)), torch.from_numpy(vol).half()):
        got = select_grid(x, cfg)
        assert got.grid == ref.grid
        if x.dtype == torch.float32:
            np.testing.assert_array_equal(got.entropy, ref.entropy)


# ---- ratios ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("entropy", "kwargs", "expected"), [
    ([0.0, 0.0, 1.0, 2.0, 2.0, 0.5], {}, [0.35, 0.35, 0.55, 0.65, 0.65, 0.45]),
    ([1.3, 1.3, 1.3], {}, [0.35, 0.35, 0.35]),  # one distinct value -> base*(1-scale), as the original
    ([0.0, 4.0], {"base_ratio": 0.6, "scale": 0.5}, [0.3, 0.9]),
    ([0.0, 1.0, 2.0], {"dynamic": False}, [0.5, 0.5, 0.5]),
    ([1.0, 1.0 + 1e-12, 2.0], {}, [0.35, 0.5, 0.65]),  # exact ranking sees the last-ulp difference
    ([1.0, 1.0 + 1e-12, 2.0], {"entropy_decimals": 6}, [0.35, 0.35, 0.65]),  # rounding merges it
])
def test_cell_mask_ratios_rank_mapping(entropy, kwargs, expected):
    r = cell_mask_ratios(np.array(entropy), MaskingConfig(**kwargs))
    assert r.dtype == torch.float64
    np.testing.assert_allclose(r.numpy(), expected, rtol=1e-6)


# ---- token masks -------------------------------------------------------------------------------------------


def expected_counts(n_tokens, g, ratios, t, rounding="floor"):
    """floor(T_k * r_k * 0.5^t) per cell, with T_k from the floor(i*g/N) mapping of every axis."""
    axes = [np.arange(n) * g // n for n in n_tokens]
    cell = (axes[0][:, None, None] * g + axes[1][None, :, None]) * g + axes[2][None, None, :]
    sizes = np.bincount(cell.ravel(), minlength=g**3)
    x = sizes * ratios.numpy().astype(np.float64) * 0.5**t
    return cell, np.floor(x + 0.5) if rounding == "round" else np.floor(x)


@pytest.mark.parametrize(("roi", "grids"), [(128, (4, 8, 16)), (64, (2, 4, 8)), (96, (4, 8, 16)), (64, (4, 8, 16))])
@pytest.mark.parametrize("rounding", ["floor", "round"])
def test_exact_masked_counts_per_cell_at_every_insertion_point(roi, grids, rounding):
    cfg = MaskingConfig(grids=grids, extra_mask_prob=1.0, count_rounding=rounding)
    rng = np.random.default_rng(roi)
    ratios = [cell_mask_ratios(rng.integers(0, 9, g**3).astype(float), cfg) for g in grids]
    tg = token_grids((roi,) * 3)
    masks = sample_stage_masks(list(grids), ratios, tg, cfg, torch.Generator().manual_seed(0))
    assert len(masks) == 4
    for t, (shape, m) in enumerate(zip(tg, masks, strict=True)):
        for b, g in enumerate(grids):
            cell, want = expected_counts(shape, g, ratios[b], t, rounding)
            got = np.zeros(g**3) if m is None else np.bincount(cell.ravel(), m[b].numpy().ravel(), g**3)
            np.testing.assert_array_equal(got, want, err_msg=f"roi {roi} call {t} grid {g}")


@pytest.mark.parametrize(("n", "g"), [(8, 2), (16, 4), (16, 8), (64, 4), (32, 16)])
def test_token_layout_matches_the_original(n, g):
    """With ratios 0/1 per cell the mask is deterministic; it must equal the original's token layout."""
    rng = np.random.default_rng(n + g)
    ratios = rng.integers(0, 2, g**3).astype(np.float32)
    cfg = MaskingConfig(hierarchical_decay=0.0)
    ours = sample_stage_masks([g], [torch.from_numpy(ratios)], [(n, n, n)], cfg, torch.Generator().manual_seed(0))
    ref = appendix_token_mask(n, g, ratios, rng) == 0
    np.testing.assert_array_equal(ours[0][0].numpy(), ref)
    # and with fractional ratios, the per-cell counts in the original's layout are floor(T * r)
    frac = torch.from_numpy(rng.uniform(0.1, 0.9, g**3).astype(np.float32))
    m = sample_stage_masks([g], [frac], [(n, n, n)], cfg, torch.Generator().manual_seed(1))[0][0].numpy()
    counts = np.bincount(appendix_token_cell_layout(n, g).ravel(), m.ravel(), g**3)
    np.testing.assert_array_equal(counts, np.floor((n // g) ** 3 * frac.numpy().astype(np.float64)))


def test_masks_are_uniform_within_a_cell():
    cfg = MaskingConfig(hierarchical_decay=0.0)
    gen = torch.Generator().manual_seed(0)
    hits = sum(sample_stage_masks([1], [torch.tensor([0.5])], [(4, 4, 4)], cfg, gen)[0][0].double()
               for _ in range(400))
    freq = hits / 400
    assert freq.sum() == pytest.approx(32.0)
    assert float(freq.min()) > 0.38 and float(freq.max()) < 0.62  # binomial(400, 0.5): sd 0.025


def test_same_seed_same_masks_different_seed_different_masks():
    cfg = MaskingConfig(grids=(2, 4, 8), extra_mask_prob=0.5)
    tg = token_grids((64, 64, 64))
    ratios = [torch.full((g**3,), 0.5) for g in (2, 8)]

    def draw(seed):
        return sample_stage_masks([2, 8], ratios, tg, cfg, torch.Generator().manual_seed(seed))

    a, b, c = draw(7), draw(7), draw(8)
    assert [m is None for m in a] == [m is None for m in b]
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True) if x is not None)
    assert not torch.equal(a[0], c[0])


def test_torch_sort_path_gives_the_same_masks(monkeypatch):
    """Off the CPU the row sort is torch.sort instead of numpy's; the keys are distinct, so masks are identical."""
    cfg = MaskingConfig(grids=(2, 4, 8), extra_mask_prob=1.0)
    args = ([2, 8], [torch.full((8,), 0.4), torch.full((512,), 0.6)], token_grids((64, 64, 64)), cfg)
    ref = sample_stage_masks(*args, torch.Generator().manual_seed(3))
    monkeypatch.setattr(masks_module, "_sort_last", lambda x: torch.sort(x, dim=-1).values)
    got = sample_stage_masks(*args, torch.Generator().manual_seed(3))
    assert all(torch.equal(a, b) for a, b in zip(ref, got, strict=True) if a is not None)


@pytest.mark.parametrize("per_sample", [True, False])
def test_extra_mask_draws_per_sample_or_per_batch(per_sample):
    cfg = MaskingConfig(grids=(2,), extra_mask_prob=0.3, per_sample_draws=per_sample)
    gen = torch.Generator().manual_seed(0)
    applied = []
    for _ in range(20):
        masks = sample_stage_masks([2] * 16, [torch.full((8,), 0.5)] * 16, [(8, 8, 8)] * 2, cfg, gen)
        applied.append(torch.zeros(16, dtype=torch.bool) if masks[1] is None else masks[1].flatten(1).any(1))
    applied = torch.stack(applied)  # (20 calls, 16 samples)
    mixed = ((applied.sum(1) > 0) & (applied.sum(1) < 16)).any()
    assert bool(mixed) == per_sample
    assert 0.15 < applied.double().mean() < 0.45


def test_samples_get_independent_masks():
    masks = sample_stage_masks([4, 4], [torch.full((64,), 0.5)] * 2, [(16, 16, 16)], MaskingConfig(),
                               torch.Generator().manual_seed(0))
    assert not torch.equal(masks[0][0], masks[0][1])


def test_no_extra_masks_when_decay_is_zero():
    cfg = MaskingConfig(hierarchical_decay=0.0, extra_mask_prob=1.0)
    masks = sample_stage_masks([4], [torch.full((64,), 0.5)], token_grids((64,) * 3), cfg, torch.Generator())
    assert masks[0] is not None and masks[1:] == [None, None, None]


@pytest.mark.parametrize("roi", [(64, 64, 64), (96, 96, 96), (128, 128, 128), (64, 96, 128)])
def test_mask_shapes_for_rois(roi):
    cfg = UniqueCfg(extra_mask_prob=1.0, count_rounding="round")
    vol = smooth_volume((1, *roi), 50, 0)
    choice = select_grid(vol, cfg)
    grids = [choice.grid, 4, 16]
    ratios = [cell_mask_ratios(choice.entropy, cfg), torch.full((64,), 0.5), torch.full((4096,), 0.5)]
    tg = token_grids(roi)
    n0 = tuple(r // 2 for r in roi)
    assert tg == [n0, n0, tuple(n // 2 for n in n0), tuple(n // 4 for n in n0)]
    masks = sample_stage_masks(grids, ratios, tg, cfg, torch.Generator().manual_seed(0))
    for shape, m in zip(tg, masks, strict=True):
        assert m is None or (m.dtype == torch.bool and tuple(m.shape) == (3, *shape))
    assert voxel_loss_mask(masks, 2, "union").shape == (3, 1, *roi)


# ---- voxel loss mask ---------------------------------------------------------------------------------------


def test_voxel_mask_first_aligns_with_patch_embedding():
    m0 = torch.rand((2, 4, 4, 4), generator=torch.Generator().manual_seed(0)) < 0.5
    vm = voxel_loss_mask([m0, None], patch_size=2, mode="first")
    assert vm.shape == (2, 1, 8, 8, 8) and vm.dtype == torch.bool
    ref = 1 - m0.numpy().repeat(2, 1).repeat(2, 2).repeat(2, 3)  # the original, 1 = visible
    np.testing.assert_array_equal(vm[:, 0].numpy(), ref == 0)
    # MONAI's stride-2 patch embedding: a voxel only affects the token the mask maps it to
    embed = PatchEmbed(patch_size=2, in_chans=1, embed_dim=4, spatial_dims=3).eval()
    x = torch.zeros(1, 1, 8, 8, 8)
    with torch.no_grad():
        base = embed(x)
        for z, y, w in [(0, 0, 0), (3, 6, 1), (7, 7, 7), (4, 1, 5)]:
            x2 = x.clone()
            x2[0, 0, z, y, w] = 1.0
            changed = (embed(x2) - base).abs().sum(1)[0] > 0
            assert changed.nonzero().tolist() == [[z // 2, y // 2, w // 2]]


def test_voxel_mask_union_of_all_stages():
    gen = torch.Generator().manual_seed(1)
    m0, m2, m3 = (torch.rand((1, n, n, n), generator=gen) < 0.3 for n in (8, 4, 2))
    vm = voxel_loss_mask([m0, None, m2, m3], patch_size=2, mode="union")[0, 0]
    z, y, x = np.indices((16, 16, 16))
    ref = np.zeros((16, 16, 16), dtype=bool)
    for m, f in ((m0, 2), (m2, 4), (m3, 8)):  # each stage's token covers f^3 voxels
        ref |= m[0].numpy()[z // f, y // f, x // f]
    np.testing.assert_array_equal(vm.numpy(), ref)
    assert torch.equal(voxel_loss_mask([m0, None, m2, m3], 2, "first"), voxel_loss_mask([m0], 2, "union"))


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


# ---- errors ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("volume", "match"), [
    (np.zeros((32, 32, 32), np.float32), r"4-D \(C, D, H, W\).*volume\[None\]"),
    (np.zeros((1, 1, 32, 32, 32), np.float32), r"4-D"),
    (np.full((1, 32, 32, 32), np.nan, np.float32), r"32768 non-finite"),
    (np.pad(np.full((1, 1, 1, 1), np.inf), ((0, 0), (0, 31), (0, 31), (0, 31))), r"1 non-finite"),
    (np.zeros((1, 0, 32, 32)), r"empty"),
    (np.zeros((1, 32, 32, 32), complex), r"real numbers"),
])
def test_bad_volumes(volume, match):
    with pytest.raises(InputError, match=match):
        select_grid(volume, UniqueCfg())


@pytest.mark.parametrize(("size", "hint"), [((40, 40, 40), "[2, 4, 5, 8, 10, 20, 40]"), ((64, 64, 72), "[2, 4, 8]")])
def test_grids_that_do_not_divide_the_roi(size, hint):
    with pytest.raises(ConfigError, match=r"grid 16 does not divide .*choose masking.grids .*divide roi_size"):
        select_grid(np.zeros((1, *size), np.float32), UniqueCfg(grids=(4, 8, 16)))
    with pytest.raises(ConfigError, match=re.escape(f"{size} (masking.grids=(4, 8, 16))") + ".*" + re.escape(hint)):
        check_grids_divide(size, (4, 8, 16))


def test_bad_mask_inputs():
    cfg, gen, tg = MaskingConfig(), torch.Generator(), [(8, 8, 8)]
    with pytest.raises(InputError, match=r"one grid and one ratio tensor per sample, got 2 grids and 1"):
        sample_stage_masks([4, 4], [torch.zeros(64)], tg, cfg, gen)
    with pytest.raises(InputError, match=r"sample 0: ratios must have shape \(grid\*\*3,\) = \(64,\) for grid 4"):
        sample_stage_masks([4], [torch.zeros(8)], tg, cfg, gen)
    with pytest.raises(InputError, match=r"finite and in \[0, 1\]"):
        sample_stage_masks([1], [torch.tensor([1.5])], tg, cfg, gen)
    with pytest.raises(InputError, match=r"token grids must be \(Nd, Nh, Nw\)"):
        sample_stage_masks([1], [torch.tensor([0.5])], [(8, 8)], cfg, gen)
    with pytest.raises(InputError, match=r"entropy must be a non-empty 1-D array"):
        cell_mask_ratios(np.zeros((2, 2)), cfg)
    with pytest.raises(InputError, match=r"non-finite"):
        cell_mask_ratios(np.array([0.0, np.nan]), cfg)
    with pytest.raises(ConfigError, match=r"multiples of 4\*patch_size=8, got \(60, 64, 64\)"):
        token_grids((60, 64, 64))


def test_bad_loss_mask_inputs():
    m0 = torch.zeros((1, 4, 4, 4), dtype=torch.bool)
    with pytest.raises(InputError, match=r"masks\[0\] must be the bool .* got nothing"):
        voxel_loss_mask([None, m0])
    with pytest.raises(InputError, match=r"got torch.float32"):
        voxel_loss_mask([m0.float()])
    with pytest.raises(ConfigError, match=r"'first' or 'union', got 'all'"):
        voxel_loss_mask([m0], 2, "all")  # type: ignore[arg-type]
    with pytest.raises(InputError, match=r"does not tile the voxel grid \(8, 8, 8\)"):
        voxel_loss_mask([m0, torch.zeros((1, 3, 3, 3), dtype=torch.bool)], 2, "union")
    with pytest.raises(ConfigError, match=r"exactly one image key"):
        GridChoiced(keys=("image", "label"))
    with pytest.raises(InputError, match=r"lack 'mask_grid'/'mask_ratios'; add GridChoiced"):
        collate_mask_info([{"image": 0}])


def _original_counts(n_distinct, tokens, calls, r0=0.5, scale=0.3, h=0.5, dtype=np.float64):
    """The original's arithmetic, float64 throughout: r = r0 * linspace(1-s, 1+s, n)[rank]; per call
    n = int(T * min(r, 1)), then r = r * h. (dtype=float32 stores r in float32, as gmim-hub did before.)"""
    r = (r0 * np.linspace(1 - scale, 1 + scale, n_distinct)).astype(dtype).astype(np.float64)
    out = []
    for _ in range(calls):
        out.append(np.floor(tokens[:, None] * np.minimum(r, 1.0)))
        r = (r * h).astype(dtype).astype(np.float64)
    return np.stack(out)  # (calls, len(tokens), n_distinct)


def test_legacy_counts_equal_the_float64_original_over_many_cases():
    """(distinct entropies, tokens per cell, call) cases: all ranks of 1..199 distinct values and of every tenth
    count in 1600..2590 (where float32 ratios start to go wrong), tokens per cell of ROI 128 (4096 .. 1), calls
    0..3. (A scan of all 1..4096 distinct counts, 168M cases, found 194 that float32 ratios get wrong.)"""
    cfg = MaskingConfig(grids=(4, 8, 16))
    tokens = np.array([4096, 512, 64, 8, 1], dtype=np.float64)
    sizes = torch.from_numpy(tokens.astype(np.int64))[:, None]
    cases = float32_wrong = 0
    for n_distinct in [*range(1, 200), *range(1600, 2600, 10)]:
        ratios = cell_mask_ratios(np.arange(n_distinct, dtype=np.float64), cfg)  # cell k has rank k
        per_call = masks_module._call_ratios([ratios], cfg.hierarchical_decay, 4)
        ours = np.stack([masks_module._masked_counts(sizes, r[None], "floor").numpy() for (r,) in per_call])
        expected = _original_counts(n_distinct, tokens, 4)
        np.testing.assert_array_equal(ours, expected, err_msg=f"{n_distinct} distinct values")
        float32_wrong += int((_original_counts(n_distinct, tokens, 4, dtype=np.float32) != expected).sum())
        cases += expected.size
    assert cases > 4_000_000
    assert float32_wrong > 0  # the check is sharp enough to see what float32 ratios got wrong


# ---- the histogram cell entropy ----------------------------------------------------------------------------


@pytest.mark.parametrize(("grids", "legacy"), [((2, 4, 8), False), ((2, 4, 8), True), ((8, 4), False)])
def test_histogram_entropy_equals_scipy_on_numpy_histograms(grids, legacy):
    """Each cell: np.histogram over the stated range (values outside clipped into the end bins), scipy entropy."""
    vol = np.random.default_rng(5).normal(0.0, 1.5, (2, 16, 16, 16)).astype(np.float32)  # some values beyond +-3
    ours = cell_entropies(vol, grids, legacy_chained_cells=legacy, estimator="histogram", bins=20,
                          value_range=(-3.0, 3.0))
    rows = dict(zip(grids, appendix_cells_chained(vol, grids), strict=True)) if legacy else {
        g: appendix_cells(vol, g) for g in grids}
    for g, h in zip(grids, ours, strict=True):
        want = [scipy_entropy(np.histogram(np.clip(c, -3.0, 3.0), bins=20, range=(-3.0, 3.0))[0], base=2)
                for c in rows[g]]
        np.testing.assert_allclose(h, want, rtol=0, atol=1e-12)


def test_histogram_entropy_sees_content_not_interpolation():
    """A smooth field on 16 integer levels (native), then linearly resampled x1.5 (40k distinct values): the
    "unique" cell entropies jump by up to 8 bits; 16 fixed bins over the range keep them within 0.1 bit."""
    from scipy import ndimage

    f = ndimage.gaussian_filter(np.random.default_rng(0).normal(size=(32, 32, 32)), 3)
    native = (np.round((f - f.min()) / np.ptp(f) * 15) / 15).astype(np.float32)
    resampled = ndimage.zoom(native, 1.5, order=1).astype(np.float32)  # 48^3: the same cells cover the same anatomy
    hist = {"estimator": "histogram", "bins": 16, "value_range": (0.0, 1.0)}
    for kw, worst in (({}, 5.0), (hist, 0.1)):
        before, after = (cell_entropies(v[None], (2, 4), **kw) for v in (native, resampled))
        shift = max(float(np.abs(a - b).max()) for a, b in zip(before, after, strict=True))
        assert shift > worst if not kw else shift < worst


def test_histogram_estimator_needs_a_range():
    vol = np.zeros((1, 8, 8, 8), np.float32)
    with pytest.raises(ConfigError, match="needs an intensity range: set masking.histogram_range"):
        select_grid(vol, MaskingConfig(grids=(2, 4)))
    assert select_grid(vol, MaskingConfig(grids=(2, 4)), value_range=(0.0, 1.0)).grid == 2
    assert select_grid(vol, MaskingConfig(grids=(2, 4), histogram_range=(0.0, 1.0))).grid == 2
