"""Gaussian-weighted sliding-window stitching in numpy only (no torch, no gmim_hub imports).

It runs inside the Triton python-backend stub, copied next to the volume model's `model.py` as `gmim_sliding.py`,
where neither torch nor MONAI may be installed. It reproduces MONAI's `SlidingWindowInferer(mode="gaussian")`, which
`gmim predict` and `gmim infer --mode window` use (tests compare the two). Windows are placed as MONAI places them:
volumes smaller than the window are zero-padded symmetrically, the step is `int(roi * (1 - overlap))`, and the last
window is flush with the far edge. Each window's logits are weighted by a separable Gaussian (sigma = `sigma_scale`
* roi, floored at 1e-3 so the borders still count) and the sum is divided by the summed weights.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator, Sequence

import numpy as np

Slices = tuple[slice, slice, slice]


def gaussian_weights(roi: Sequence[int], sigma_scale: float = 0.125) -> np.ndarray:
    """(D, H, W) float32 importance map: exp(-x^2 / 2 sigma^2) per axis from the window centre (MONAI's, unscaled),
    floored at 1e-3 so the borders still count."""
    w = np.ones((), dtype=np.float64)
    for size in roi:
        x = np.arange(size, dtype=np.float64) - (size - 1) / 2.0
        sigma = max(size * sigma_scale, 1e-6)
        w = np.multiply.outer(w, np.exp(-(x**2) / (2.0 * sigma**2)))
    return np.maximum(w, 1e-3).astype(np.float32)


def window_starts(size: int, roi: int, overlap: float) -> list[int]:
    """Start offsets along one axis of length `size` >= `roi`; the last window ends exactly at `size`."""
    if size <= roi:
        return [0]
    step = max(int(roi * (1.0 - overlap)), 1)
    count = math.ceil((size - roi) / step) + 1
    return sorted({min(i * step, size - roi) for i in range(count)})


def plan_windows(spatial: Sequence[int], roi: Sequence[int], overlap: float) -> list[Slices]:
    """All window positions (as slices into a volume of shape `spatial` >= `roi`), in C order."""
    axes = [window_starts(s, r, overlap) for s, r in zip(spatial, roi, strict=True)]
    starts = itertools.product(*axes)
    return [tuple(slice(a, a + r) for a, r in zip(start, roi, strict=True)) for start in starts]  # type: ignore[misc]


def pad_to_window(image: np.ndarray, roi: Sequence[int]) -> tuple[np.ndarray, Slices]:
    """Zero-pad a (C, X, Y, Z) volume to at least `roi` per axis, symmetrically; returns it and the crop back."""
    pads, crop = [(0, 0)], []
    for size, r in zip(image.shape[1:], roi, strict=True):
        diff = max(r - size, 0)
        pads.append((diff // 2, diff - diff // 2))
        crop.append(slice(diff // 2, diff // 2 + size))
    if all(p == (0, 0) for p in pads):
        return image, tuple(crop)  # type: ignore[return-value]
    return np.pad(image, pads, mode="constant"), tuple(crop)  # type: ignore[return-value]


class Stitcher:
    """Accumulates weighted window logits (K, D, H, W) into a (K, X, Y, Z) volume; `result()` divides by the
    summed weights."""

    def __init__(self, channels: int, spatial: Sequence[int], roi: Sequence[int], sigma_scale: float = 0.125) -> None:
        self.weights = gaussian_weights(roi, sigma_scale)
        self.sum = np.zeros((channels, *spatial), dtype=np.float32)
        self.norm = np.zeros(tuple(spatial), dtype=np.float32)

    def add(self, logits: np.ndarray, where: Sequence[Slices]) -> None:
        """logits: (n, K, D, H, W) for the n windows at `where`."""
        for window, sl in zip(logits, where, strict=True):
            self.sum[(slice(None), *sl)] += window * self.weights
            self.norm[sl] += self.weights

    def result(self) -> np.ndarray:
        return self.sum / self.norm


def window_batches(
    image: np.ndarray, roi: Sequence[int], overlap: float, batch_size: int
) -> Iterator[tuple[list[Slices], np.ndarray]]:
    """Yield (positions, (n, C, D, H, W) float32 batch) with n <= batch_size, over an already padded volume."""
    plan = plan_windows(image.shape[1:], roi, overlap)
    for i in range(0, len(plan), batch_size):
        where = plan[i : i + batch_size]
        yield where, np.stack([image[(slice(None), *sl)] for sl in where]).astype(np.float32, copy=False)


def label_bits(out_channels: int, multi_label: bool) -> int:
    """Bits per label in the packed output: 1 for multi-label 0/1 channels, else the smallest of 1, 2, 4, 8 that can
    hold a class index below `out_channels`."""
    if multi_label:
        return 1
    for bits in (1, 2, 4, 8):
        if out_channels <= 1 << bits:
            return bits
    raise ValueError(f"packed labels hold at most 256 classes, got out_channels={out_channels}")


def pack_labels(labels: np.ndarray, bits: int) -> np.ndarray:
    """uint8 labels (any shape, each < 2**bits) -> 1-D uint8 with 8 // bits labels per byte, in C order, the first
    label of each byte in its low bits, the last byte zero-padded. Lossless; `unpack_labels` inverts it."""
    per = 8 // bits
    flat = np.ascontiguousarray(labels, dtype=np.uint8).reshape(-1)
    if flat.size % per:
        flat = np.concatenate([flat, np.zeros(per - flat.size % per, dtype=np.uint8)])
    groups = flat.reshape(-1, per)
    out = groups[:, 0].copy()
    for i in range(1, per):
        out |= np.left_shift(groups[:, i], np.uint8(bits * i))
    return out


def unpack_labels(packed: np.ndarray, bits: int, shape: Sequence[int]) -> np.ndarray:
    """Inverse of `pack_labels`: 1-D uint8 -> uint8 labels of `shape`. A size that does not fit `shape` raises
    ValueError."""
    per, count = 8 // bits, int(np.prod(shape))
    packed = np.asarray(packed, dtype=np.uint8).reshape(-1)
    if packed.size != -(-count // per):
        raise ValueError(f"{packed.size} packed bytes do not hold {count} labels of {bits} bit(s)")
    mask = np.uint8((1 << bits) - 1)
    out = np.empty((packed.size, per), dtype=np.uint8)
    for i in range(per):
        out[:, i] = np.right_shift(packed, np.uint8(bits * i)) & mask
    return out.reshape(-1)[:count].reshape(tuple(int(s) for s in shape))


def labels_from_logits(logits: np.ndarray, multi_label: bool) -> np.ndarray:
    """(K, X, Y, Z) logits -> uint8 labels: argmax (X, Y, Z), or per-channel sigmoid > 0.5 (K, X, Y, Z)."""
    if multi_label:
        return (logits > 0).astype(np.uint8)
    return np.argmax(logits, axis=0).astype(np.uint8)


def sliding_window_logits(
    image: np.ndarray,
    roi: Sequence[int],
    run: Callable[[np.ndarray], np.ndarray],
    *,
    channels: int,
    overlap: float = 0.5,
    batch_size: int = 4,
    sigma_scale: float = 0.125,
) -> np.ndarray:
    """(C, X, Y, Z) volume -> (K, X, Y, Z) stitched logits, calling `run((n, C, *roi)) -> (n, K, *roi)` in order."""
    padded, crop = pad_to_window(image, roi)
    stitcher = Stitcher(channels, padded.shape[1:], roi, sigma_scale)
    for where, batch in window_batches(padded, roi, overlap, batch_size):
        stitcher.add(run(batch), where)
    return stitcher.result()[(slice(None), *crop)]
