"""Cell entropy, grid choice and mask ratios (`gmim_hub/_entropy.py`, `gmim_hub.method`) against docs/method.md
and a transcription of the original's arithmetic (`_original_masking.py`)."""

from __future__ import annotations

import re
import warnings

import numpy as np
import pytest
import torch
from _original_masking import (
    VOLUMES,
    UniqueCfg,
    appendix_cell_ratios,
    appendix_cells,
    appendix_cells_chained,
    appendix_entropy,
    appendix_select_grid,
    block_cell,
    half_flat_volume,
    smooth_volume,
)
from monai.data import MetaTensor
from scipy.stats import entropy as scipy_entropy

from gmim_hub import _entropy as entropy_module
from gmim_hub.config import MaskingConfig
from gmim_hub.errors import ConfigError, InputError
from gmim_hub.masking import (
    cell_entropies,
    cell_entropy,
    cell_mask_ratios,
    check_grids_divide,
    select_grid,
)

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

