"""Token masks at the insertion points and the voxel loss mask (`gmim_hub/_token_masks.py`, `gmim_hub.method`)
against docs/method.md and a transcription of the original's arithmetic (`_original_masking.py`)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _original_masking import (
    UniqueCfg,
    appendix_token_cell_layout,
    appendix_token_mask,
    smooth_volume,
)
from monai.networks.blocks import PatchEmbed

from gmim_hub import _token_masks as masks_module
from gmim_hub.config import MaskingConfig
from gmim_hub.errors import ConfigError, InputError
from gmim_hub.masking import (
    GridChoiced,
    cell_mask_ratios,
    collate_mask_info,
    sample_stage_masks,
    select_grid,
    token_grids,
    voxel_loss_mask,
)

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


