"""Mixed precision: autocast contexts and the one optimizer step that handles scaling and clipping correctly.

`auto` picks bf16 autocast on CUDA GPUs that support it and fp16 with a `GradScaler` on older GPUs. On the CPU
`auto` means fp32, for two measured reasons: oneDNN's bf16 conv3d weight gradient is not deterministic (the same
step twice gives different low bits, even on one thread), which would break bit-exact resume; and on the AVX512-BF16
CPU we measured, bf16 autocast was ~10% *slower* for the tiny model. `--precision bf16` still runs bf16 on the CPU. Unlike the original, clipping still applies under AMP: the gradients are unscaled
*before* `clip_grad_norm_`, so the threshold is in real units.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Literal

import torch
from torch import Tensor

from gmim_hub.errors import ConfigError

PrecisionMode = Literal["fp32", "bf16", "fp16", "auto"]
_MODES = ("fp32", "bf16", "fp16", "auto")


def resolve_precision(mode: str, device: torch.device) -> Literal["fp32", "bf16", "fp16"]:
    """The concrete precision `mode` means on `device`."""
    if mode not in _MODES:
        raise ConfigError(f"precision must be one of {', '.join(_MODES)}, got {mode!r}")
    if mode != "auto":
        if mode == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise ConfigError("precision bf16 is not supported by this GPU; use --precision fp16 or auto")
        return mode  # type: ignore[return-value]
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


def autocast_context(device: torch.device, mode: str) -> contextlib.AbstractContextManager:
    """Autocast for the forward pass and loss; a no-op for fp32."""
    resolved = resolve_precision(mode, device)
    if resolved == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if resolved == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


@contextlib.contextmanager
def deterministic_kernels(requested: bool | None, device: torch.device) -> Iterator[bool]:
    """Turn torch's deterministic algorithms on (warn-only) for the block when `requested`, or, for None, when the
    run is on the CPU; restores the previous setting after. Yields whether they are on.

    Why the CPU default: the Swin relative-position-bias gradient (an index_put with accumulate) differs from run to
    run on 2+ CPU threads without them, which breaks bit-exact resume. On GPUs they cost speed, so they are off."""
    previous = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    on = requested if requested is not None else device.type == "cpu"
    torch.use_deterministic_algorithms(on, warn_only=True)
    try:
        yield on
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])


def make_grad_scaler(device: torch.device, mode: str) -> torch.amp.GradScaler | None:
    """A `GradScaler` for fp16 only: bf16 has fp32's exponent range and needs no loss scaling."""
    if resolve_precision(mode, device) != "fp16":
        return None
    return torch.amp.GradScaler(device.type)


def optimizer_step(
    loss: Tensor,
    optimizer: torch.optim.Optimizer,
    params: Iterable[Tensor],
    scaler: torch.amp.GradScaler | None,
    max_norm: float | None,
) -> float:
    """backward, unscale, clip, step, update. Returns the total gradient norm before clipping, in real units.

    A non-finite norm means no update: with fp16 the scaler skips the step and lowers its scale (routine); without
    a scaler the step is skipped here too (clipping would turn inf gradients into NaN weights) and the caller
    should stop, as the gradient has genuinely overflowed."""
    params = [p for p in params if p.requires_grad]
    optimizer.zero_grad(set_to_none=True)
    if scaler is None:
        loss.backward()
    else:
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)  # before clipping: otherwise the norm is measured in scaled units
    if max_norm is not None and max_norm > 0:
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    else:
        norm = torch.linalg.vector_norm(
            torch.stack([torch.linalg.vector_norm(p.grad) for p in params if p.grad is not None])
        )
    if scaler is None:
        if torch.isfinite(norm):
            optimizer.step()
    else:
        scaler.step(optimizer)
        scaler.update()
    return float(norm)
