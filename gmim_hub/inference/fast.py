"""Fast CPU inference of Swin UNETR windows: the whole network in bf16, fused attention, cached masks.

Why: MONAI's eager fp32 Swin UNETR spends most of a 96^3 window in convolutions that a CPU with AVX512-BF16 (or
AMX) runs ~2-3x faster in bf16, and much of the rest in work that does not depend on the input at all: the
shifted-window attention mask and the relative-position bias are rebuilt in every forward pass, then added to a
(windows, heads, 343, 343) score tensor in separate passes over memory. Here:

- every weight and activation is bf16 (no autocast: autocast re-casts the fp32 weights in every call), the logits
  come back as fp32;
- `WindowAttention` runs `F.scaled_dot_product_attention` (oneDNN/flash kernel: scores never hit memory whole)
  with the bias and mask added once per input size and cached;
- `BasicLayer` caches its shifted-window mask per padded size;
- glibc's malloc is told to keep freed large blocks (`tune_malloc`): by default every activation above 32 MiB is a
  fresh mmap, and the kernel zero-fills each of its pages again on first touch: ~700k page faults and ~1 s of
  system time per feature_size-48 window here, more than a third of the bf16 window's own time.

The patched network computes the same function as MONAI's (state-dict keys unchanged; the optimisation works on a
copy, so the caller's model is untouched). Only the rounding differs: argmax labels agree with fp32 on >99% of
voxels (see `benchmarks/bench_p1_window.py`).
"""

from __future__ import annotations

import copy
import logging
from collections import OrderedDict
from typing import Literal

import torch
import torch.nn.functional as F
from monai.networks.nets import swin_unetr as monai_swin
from torch import Tensor, nn

from gmim_hub.errors import ConfigError
from gmim_hub.malloc import tune_malloc, tune_malloc_unless_disabled

logger = logging.getLogger(__name__)

FastPrecision = Literal["fp32", "bf16"]
_CACHE_SIZE = 4  # input sizes remembered per module (a predictor uses one window size)

__all__ = ["FastCPUBackend", "optimize_for_cpu", "tune_malloc"]

class _LRU(OrderedDict):
    """A tiny bounded cache: (key -> value), oldest entry evicted past `_CACHE_SIZE`."""

    def put(self, key, value):
        self[key] = value
        self.move_to_end(key)
        while len(self) > _CACHE_SIZE:
            self.popitem(last=False)
        return value


class CachedWindowAttention(monai_swin.WindowAttention):
    """MONAI `WindowAttention` (same parameters) whose forward uses SDPA with a cached additive bias.

    x: (B*nW, N, C) window tokens; mask: (nW, N, N) additive shifted-window mask or None. The bias handed to SDPA
    is (1, heads, N, N) without a mask and (nW, heads, N, N) with one, built once per (mask, N, dtype)."""

    _bias_cache: _LRU

    def _bias(self, mask: Tensor | None, n: int, dtype: torch.dtype) -> Tensor:
        cache = self.__dict__.setdefault("_bias_cache", _LRU())
        key = (id(mask) if mask is not None else None, n, dtype)
        hit = cache.get(key)
        if hit is not None and hit[0] is mask:
            return hit[1]
        index = self.relative_position_index[:n, :n].reshape(-1)  # type: ignore[index]
        rel = self.relative_position_bias_table[index].reshape(n, n, -1).permute(2, 0, 1).float()  # (heads, N, N)
        bias = rel[None] if mask is None else rel[None] + mask.float()[:, None]
        return cache.put(key, (mask, bias.to(dtype).contiguous()))[1]

    def forward(self, x: Tensor, mask: Tensor | None) -> Tensor:  # type: ignore[override]
        b, n, c = x.shape
        heads = self.num_heads
        q, k, v = self.qkv(x).reshape(b, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4).unbind(0)
        bias = self._bias(mask, n, q.dtype)
        nw = bias.shape[0]
        if nw == 1 or nw == b:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=self.scale)
        else:  # several volumes in the batch: one call per volume, so the (nW, ...) bias lines up with its windows
            out = torch.cat([F.scaled_dot_product_attention(q[i:i + nw], k[i:i + nw], v[i:i + nw], attn_mask=bias,
                                                            scale=self.scale) for i in range(0, b, nw)])
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class CachedBasicLayer(monai_swin.BasicLayer):
    """MONAI `BasicLayer` whose shifted-window attention mask is computed once per padded input size."""

    def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]
        if x.ndim != 5 or getattr(self, "use_hyena", False):
            return super().forward(x)
        b, c, d, h, w = x.shape
        window_size, shift_size = monai_swin.get_window_size((d, h, w), self.window_size, self.shift_size)
        padded = tuple(-(-s // ws) * ws for s, ws in zip((d, h, w), window_size, strict=True))
        cache = self.__dict__.setdefault("_mask_cache", _LRU())
        key = (padded, tuple(window_size), tuple(shift_size), x.device)
        mask = cache.get(key)
        if mask is None:
            mask = cache.put(key, monai_swin.compute_mask(list(padded), window_size, shift_size, x.device))
        x = x.permute(0, 2, 3, 4, 1)
        for blk in self.blocks:
            x = blk(x, mask)
        x = x.reshape(b, d, h, w, -1)
        if self.downsample is not None:
            x = self.downsample(x)
        return x.permute(0, 4, 1, 2, 3)


_SWAPS = {monai_swin.WindowAttention: CachedWindowAttention, monai_swin.BasicLayer: CachedBasicLayer}


def patch_swin_modules(model: nn.Module) -> int:
    """Swap MONAI's `WindowAttention` / `BasicLayer` instances in `model` for the cached versions, in place.
    Only exact class matches are swapped (a subclass may override forward for a reason). Returns the count."""
    count = 0
    for module in model.modules():
        new_cls = _SWAPS.get(type(module))
        if new_cls is not None:
            module.__class__ = new_cls
            count += 1
    return count


def optimize_for_cpu(model: nn.Module, *, precision: FastPrecision = "bf16", inplace: bool = False) -> nn.Module:
    """An inference copy of a Swin UNETR (`SegmentationNetwork`, MONAI `SwinUNETR`, ...) for fast CPU windows.

    precision="bf16" casts weights (and so activations) to bf16: about 3x faster than eager fp32 on CPUs with
    AVX512-BF16/AMX, ~1% of argmax labels may flip. "fp32" keeps the numbers and only adds the attention and mask
    caching. The result is in eval mode; call it under `torch.inference_mode()` with inputs of its dtype, or use
    `FastCPUBackend`, which does both."""
    if precision not in ("fp32", "bf16"):
        raise ConfigError(f"precision must be 'fp32' or 'bf16', got {precision!r}")
    fast = model if inplace else copy.deepcopy(model)
    fast.eval()
    n = patch_swin_modules(fast)
    if n == 0:
        logger.warning("no MONAI Swin UNETR attention layers found in %s; only the dtype changes",
                       type(model).__name__)
    fast.to(torch.bfloat16 if precision == "bf16" else torch.float32)
    return fast


class FastCPUBackend:
    """Window runner for `Predictor`: (B, C, D, H, W) float32 -> (B, K, D, H, W) float32 logits on the CPU.

    Wraps `optimize_for_cpu`; windows are cast to the model's dtype and logits back to float32. At most
    `max_windows` windows go through the network at once: batching windows buys little on a CPU, while each
    feature_size-48 96^3 window holds ~1.5 GB of activations, so `sw_batch_size=4` in one pass would quadruple the
    peak memory. `malloc_tuning` calls `tune_malloc()` (process-wide, see there); turn it off when the process must
    return memory to the OS. `inplace=True` converts `model` itself instead of a copy (saves its fp32 weights)."""

    def __init__(self, model: nn.Module, *, precision: FastPrecision = "bf16", max_windows: int = 1,
                 malloc_tuning: bool = True, inplace: bool = False) -> None:
        if max_windows < 1:
            raise ConfigError(f"max_windows must be >= 1, got {max_windows!r}")
        if malloc_tuning:
            tune_malloc_unless_disabled()
        self.precision, self.max_windows = precision, int(max_windows)
        self.dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        self.config = getattr(model, "config", None)
        self.model = optimize_for_cpu(model, precision=precision, inplace=inplace)

    def __call__(self, x: Tensor) -> Tensor:
        n = self.max_windows
        with torch.inference_mode():
            outs = [self.model(x[i:i + n].to("cpu", self.dtype)).float() for i in range(0, x.shape[0], n)]
        return outs[0] if len(outs) == 1 else torch.cat(outs)
