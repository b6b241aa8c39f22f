"""Learning-rate schedule: linear warmup from 0, then cosine decay to 0, stepped once per optimizer step.

    lr(s) = lr * s / warmup                                           for s < warmup
    lr(s) = lr * 0.5 * (1 + cos(pi * (s - warmup) / (total - warmup)))  otherwise (clamped to 0 after `total`)

The multiplier is a small callable object rather than a closure so that `LambdaLR.state_dict()` records its
parameters (a closure would be saved as None), and the whole scheduler state loads with `weights_only=True`.
"""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from gmim_hub.errors import ConfigError


class WarmupCosine:
    """lr multiplier at step s (0-based, the step about to be taken)."""

    def __init__(self, warmup_steps: int, total_steps: int) -> None:
        if total_steps < 1:
            raise ConfigError(f"steps must be >= 1, got {total_steps!r}")
        if not 0 <= warmup_steps < total_steps:
            raise ConfigError(f"warmup must be in [0, steps), got warmup={warmup_steps!r} with steps={total_steps!r}; "
                              "lower --warmup or raise --steps")
        self.warmup_steps = int(warmup_steps)
        self.total_steps = int(total_steps)

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return step / self.warmup_steps
        progress = min(1.0, (step - self.warmup_steps) / (self.total_steps - self.warmup_steps))
        return 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_cosine_scheduler(optimizer: Optimizer, warmup_steps: int, total_steps: int) -> LambdaLR:
    """A `LambdaLR` whose `get_last_lr()` is lr(s) for the next step s; call `.step()` after each optimizer step."""
    return LambdaLR(optimizer, WarmupCosine(warmup_steps, total_steps))
