"""gmim_hub.losses against hand-computed values (docs/method.md, "Objective")."""

from __future__ import annotations

import pytest
import torch

from gmim_hub.config import LossConfig
from gmim_hub.errors import ConfigError, InputError
from gmim_hub.losses import LossOutput, cross_correlation_loss, gmim_loss, masked_reconstruction_loss


def loop_cross_correlation(z_x, z_y, lambd):
    """Spec 3.2 written out element by element."""
    b, n, p = z_x.shape
    total = 0.0
    for s in range(b):
        for i in range(p):
            for j in range(p):
                c = sum(float(z_x[s, k, i]) * float(z_y[s, k, j]) for k in range(n)) / n
                total += (c - 1) ** 2 if i == j else lambd * c**2
    return total / b


def test_cross_correlation_hand_computed():
    # C = Z_x^T Z_y / 2 = [[0.5, 1.5], [1, 2]]: on-diagonal 0.25 + 1, off-diagonal 2.25 + 1 (times lambd)
    z_x = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]])
    z_y = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    assert float(cross_correlation_loss(z_x, z_y, lambd=0.1)) == pytest.approx(1.25 + 0.1 * 3.25)
    assert float(cross_correlation_loss(z_x, z_y, lambd=0.0)) == pytest.approx(1.25)


def test_cross_correlation_is_a_batch_mean_of_per_sample_losses():
    z_x = torch.tensor([[[1.0, 2.0], [3.0, 4.0]], [[2.0, 0.0], [0.0, 2.0]]])
    z_y = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[1.0, 0.0], [0.0, 1.0]]])
    # sample 2: C = identity -> loss 0
    assert float(cross_correlation_loss(z_x, z_y, lambd=0.1)) == pytest.approx((1.575 + 0.0) / 2)


@pytest.mark.parametrize("lambd", [0.0, 0.005, 1.0])
def test_cross_correlation_matches_element_loop(lambd):
    gen = torch.Generator().manual_seed(0)
    z_x, z_y = torch.randn(2, 5, 3, generator=gen), torch.randn(2, 5, 3, generator=gen)
    got = float(cross_correlation_loss(z_x, z_y, lambd=lambd))
    assert got == pytest.approx(loop_cross_correlation(z_x, z_y, lambd), rel=1e-5)


def test_cross_correlation_zero_for_decorrelated_identical_views():
    z = torch.tensor([[[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0], [-1.0, -1.0]]])  # orthogonal columns, C = I
    assert float(cross_correlation_loss(z, z)) == pytest.approx(0.0, abs=1e-12)


def test_cross_correlation_standardize():
    gen = torch.Generator().manual_seed(1)
    z = torch.randn(2, 16, 4, generator=gen)
    scale, shift = torch.tensor([2.0, 0.5, 3.0, 1.0]), torch.tensor([5.0, -1.0, 0.0, 2.0])
    plain = cross_correlation_loss(z, z, standardize=True)
    affine = cross_correlation_loss(z * scale + shift, z, standardize=True)  # per-feature affine is removed
    assert float(affine) == pytest.approx(float(plain), rel=1e-4)
    # one feature, tokens [1, 3]: standardised to [-1, 1]/sqrt(1 + 1e-5), so C = 1/(1 + 1e-5)
    one = torch.tensor([[[1.0], [3.0]]])
    want = (1 / (1 + 1e-5) - 1) ** 2
    assert float(cross_correlation_loss(one, one, standardize=True)) == pytest.approx(want, rel=1e-3)
    assert float(cross_correlation_loss(one, one, standardize=False)) == pytest.approx((5.0 - 1) ** 2)


def recon_case():
    pred = torch.zeros(1, 2, 2, 2, 2)
    target = torch.arange(16, dtype=torch.float32).view(1, 2, 2, 2, 2)
    mask = torch.zeros(1, 1, 2, 2, 2, dtype=torch.bool)
    mask[0, 0, 0, 0, 0] = mask[0, 0, 1, 1, 1] = True  # voxels 0 and 7 in each channel: values 0, 7, 8, 15
    return pred, target, mask


@pytest.mark.parametrize(("normalize", "denominator"), [("all_voxels", 16), ("masked_voxels", 4)])
def test_masked_reconstruction_hand_computed(normalize, denominator):
    pred, target, mask = recon_case()
    got = masked_reconstruction_loss(pred, target, mask, normalize=normalize)
    assert float(got) == pytest.approx((0 + 49 + 64 + 225) / denominator)


def test_all_voxels_equals_the_original_mse_on_zeroed_tensors():
    gen = torch.Generator().manual_seed(2)
    pred, target = torch.randn(2, 3, 4, 4, 4, generator=gen), torch.randn(2, 3, 4, 4, 4, generator=gen)
    mask = torch.rand(2, 1, 4, 4, 4, generator=gen) < 0.4
    visible = (~mask).float()
    original = torch.nn.MSELoss()(pred * (1 - visible), target * (1 - visible))
    assert float(masked_reconstruction_loss(pred, target, mask)) == pytest.approx(float(original), rel=1e-6)


def test_reconstruction_edge_cases():
    pred, target, mask = recon_case()
    empty = torch.zeros_like(mask)
    assert float(masked_reconstruction_loss(pred, target, empty, "masked_voxels")) == 0.0  # guarded, not NaN
    assert float(masked_reconstruction_loss(pred, target, None)) == pytest.approx(float((target**2).mean()))
    half = masked_reconstruction_loss(pred.half(), target.half(), mask)
    assert half.dtype == torch.float32


def test_gmim_loss_combines_and_backpropagates():
    gen = torch.Generator().manual_seed(3)
    z_x = torch.randn(2, 8, 4, generator=gen, requires_grad=True)
    z_y = torch.randn(2, 8, 4, generator=gen)
    pred = torch.randn(2, 1, 4, 4, 4, generator=gen, requires_grad=True)
    target = torch.randn(2, 1, 4, 4, 4, generator=gen)
    mask = torch.rand(2, 1, 4, 4, 4, generator=gen) < 0.5
    cfg = LossConfig(alpha_cc=0.005, alpha_rec=1.0, lambd=0.005, rec_normalize="masked_voxels")
    out = gmim_loss(z_x, z_y, pred, target, mask, cfg)
    assert isinstance(out, LossOutput)
    with torch.no_grad():
        cc = float(cross_correlation_loss(z_x, z_y, 0.005))
        rec = float(masked_reconstruction_loss(pred, target, mask, "masked_voxels"))
    assert float(out.cross_correlation.detach()) == pytest.approx(cc)
    assert float(out.reconstruction.detach()) == pytest.approx(rec)
    assert float(out.total.detach()) == pytest.approx(0.005 * cc + rec)
    out.total.backward()
    assert z_x.grad is not None and z_x.grad.abs().sum() > 0
    assert pred.grad is not None and (pred.grad[~mask.expand_as(pred)] == 0).all()  # visible voxels get no grad


def test_losses_run_in_full_precision_under_autocast():
    gen = torch.Generator().manual_seed(4)
    z_x, z_y = torch.randn(2, 64, 32, generator=gen), torch.randn(2, 64, 32, generator=gen)
    pred, target = torch.randn(2, 1, 8, 8, 8, generator=gen), torch.randn(2, 1, 8, 8, 8, generator=gen)
    mask = torch.rand(2, 1, 8, 8, 8, generator=gen) < 0.5
    ref = gmim_loss(z_x, z_y, pred, target, mask, LossConfig())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = gmim_loss(z_x, z_y, pred, target, mask, LossConfig())
    assert got.total.dtype == torch.float32
    assert float(got.total) == pytest.approx(float(ref.total), rel=1e-6)


def test_bad_loss_inputs():
    z = torch.zeros(2, 4, 3)
    with pytest.raises(InputError, match=r"\(B, N, P\).*z_x \(2, 4, 3\) and z_y \(2, 4, 5\)"):
        cross_correlation_loss(z, torch.zeros(2, 4, 5))
    with pytest.raises(InputError, match=r"z_x \(4, 3\)"):
        cross_correlation_loss(z[0], z[0])
    pred, target, mask = recon_case()
    with pytest.raises(InputError, match=r"both be \(B, C, D, H, W\), got \(1, 2, 2, 2, 2\) and \(1, 1, 2, 2, 2\)"):
        masked_reconstruction_loss(pred, target[:, :1], mask)
    with pytest.raises(InputError, match=r"voxel_mask must be bool \(B, 1, D, H, W\) = \(1, 1, 2, 2, 2\).*"
                                         r"torch.float32 \(1, 1, 2, 2, 2\)"):
        masked_reconstruction_loss(pred, target, mask.float())
    with pytest.raises(InputError, match=r"got torch.bool \(1, 2, 2, 2, 2\)"):
        masked_reconstruction_loss(pred, target, mask.expand(1, 2, 2, 2, 2))
    with pytest.raises(ConfigError, match=r"'all_voxels' or 'masked_voxels', got 'mean'"):
        masked_reconstruction_loss(pred, target, mask, "mean")  # type: ignore[arg-type]
