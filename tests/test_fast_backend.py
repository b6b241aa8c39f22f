"""The fast CPU backend computes MONAI's Swin UNETR function: exactly (to fp32 rounding) in fp32, and with the same
argmax labels on nearly every voxel in bf16. Correctness only: timings live in benchmarks/, never in tests."""

from __future__ import annotations

import dataclasses
import platform
import subprocess
import sys

import pytest
import torch
from monai.networks.nets import swin_unetr as monai_swin

from gmim_hub.errors import ConfigError
from gmim_hub.inference.fast import (
    CachedBasicLayer,
    CachedWindowAttention,
    FastCPUBackend,
    optimize_for_cpu,
    patch_swin_modules,
)
from gmim_hub.models.segmentation import SegmentationNetwork


@pytest.fixture(scope="module")
def tiny_model(tiny_config) -> SegmentationNetwork:
    torch.manual_seed(0)
    return SegmentationNetwork(dataclasses.replace(tiny_config, out_channels=3)).eval()


def _smooth_volume(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """Noise blurred by average pooling: image-like structure, so labels are not decided by rounding noise."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    return torch.nn.functional.avg_pool3d(x, 5, stride=1, padding=2) * 3


def _reference(model, x: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(x)


@pytest.fixture(scope="module")
def fast_fp32(tiny_model) -> FastCPUBackend:
    """One fast model for every size below, so its per-size caches are exercised in turn."""
    return FastCPUBackend(tiny_model, precision="fp32", malloc_tuning=False)


@pytest.mark.parametrize("shape", [(1, 1, 64, 64, 64), (2, 1, 64, 64, 96)])
def test_fp32_matches_monai(tiny_model, fast_fp32, shape):
    """Cached masks, cached bias and SDPA change no number beyond fp32 rounding, for a batch (run one window at a
    time, the default) and a non-cubic window grid (64x64x96)."""
    x = _smooth_volume(shape)
    fast = fast_fp32
    for _ in range(2):  # second call runs on the cached mask and bias
        out = fast(x)
        assert out.dtype == torch.float32 and out.shape == (shape[0], 3, *shape[2:])
        torch.testing.assert_close(out, _reference(tiny_model, x), atol=2e-4, rtol=1e-4)


def test_bf16_labels_agree(tiny_model):
    x = _smooth_volume((1, 1, 64, 64, 64), seed=1)
    ref = _reference(tiny_model, x)
    out = FastCPUBackend(tiny_model, precision="bf16", malloc_tuning=False)(x)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    agreement = (out.argmax(1) == ref.argmax(1)).float().mean().item()
    assert agreement >= 0.97, agreement
    assert (out - ref).abs().max().item() < 0.25


def test_caller_model_untouched_and_state_dict_kept(tiny_model):
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    fast = optimize_for_cpu(tiny_model, precision="bf16")
    assert all(type(m) is not CachedWindowAttention for m in tiny_model.modules())
    assert next(tiny_model.parameters()).dtype == torch.float32
    assert list(fast.state_dict()) == list(before)
    for key, value in tiny_model.state_dict().items():
        assert torch.equal(value, before[key]), key
    kinds = {type(m) for m in fast.modules()}
    assert CachedWindowAttention in kinds and CachedBasicLayer in kinds
    assert monai_swin.WindowAttention not in kinds
    assert next(fast.parameters()).dtype == torch.bfloat16


def test_patch_counts_modules(tiny_model, tiny_config):
    model = SegmentationNetwork(tiny_config)
    n_blocks = sum(tiny_config.depths)
    assert patch_swin_modules(model) == n_blocks + len(tiny_config.depths)
    assert patch_swin_modules(model) == 0  # already patched: nothing left to swap


def test_model_without_swin_layers_still_runs():
    conv = torch.nn.Conv3d(1, 2, 3, padding=1)
    fast = FastCPUBackend(conv, precision="fp32", malloc_tuning=False)
    x = torch.randn(1, 1, 8, 8, 8)
    torch.testing.assert_close(fast(x), _reference(conv, x))


@pytest.mark.parametrize("bad", ["fp16", "int8", ""])
def test_bad_precision_message(tiny_model, bad):
    with pytest.raises(ConfigError, match=r"precision must be 'fp32' or 'bf16', got"):
        optimize_for_cpu(tiny_model, precision=bad)  # type: ignore[arg-type]


def test_tune_malloc_in_a_fresh_process():
    """The allocator setting is process-wide, so it is checked in a child process: it applies on glibc Linux,
    is idempotent, and a 64 MiB block freed and allocated again no longer page-faults."""
    code = (
        "import resource, sys, torch\n"
        "from gmim_hub.inference.fast import tune_malloc\n"
        "assert tune_malloc() and tune_malloc()\n"
        "for _ in range(3):\n"  # the first allocations map the heap's pages once
        "    torch.empty(1 << 24).fill_(1)\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
        "for _ in range(5):\n"
        "    torch.empty(1 << 24).fill_(1)\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)\n"
    )
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        pytest.skip("glibc only")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert int(out.stdout.strip()) < 1000  # without tuning: ~5 x 16k page faults


@pytest.mark.parametrize("bad", [0, -1])
def test_bad_max_windows_message(tiny_model, bad):
    with pytest.raises(ConfigError, match=r"max_windows must be >= 1, got"):
        FastCPUBackend(tiny_model, max_windows=bad, malloc_tuning=False)


def test_windows_in_chunks_equal_one_pass(tiny_model, fast_fp32):
    """max_windows only changes how many windows share a forward pass, never the logits; with two windows in one
    pass the shifted-window bias must line up with each window's own sub-windows."""
    x = _smooth_volume((2, 1, 64, 64, 64), seed=3)
    together = FastCPUBackend(tiny_model, precision="fp32", max_windows=2, malloc_tuning=False)(x)
    torch.testing.assert_close(fast_fp32(x), together, atol=1e-4, rtol=1e-4)
