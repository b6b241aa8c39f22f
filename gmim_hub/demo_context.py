"""What the steps of `gmim demo` share: their settings (`DemoSettings`, `FULL`, `QUICK`), the context they pass along
(`DemoContext`) and the step record (`DemoStep`). `gmim_hub.demo` lists the steps and runs them; the steps live in
`gmim_hub.demo` (data to previews) and `gmim_hub.demo_serving` (export and serving), which both build on this module."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gmim_hub.engine.evaluate import EvalReport
from gmim_hub.errors import ConfigError


@dataclass(frozen=True)
class DemoSettings:
    """Step counts and sizes. The defaults fit the 2-core CPU budget (~8 of the ~15 minutes, see the README).

    Chosen by a sweep (tiny preset, 2 mm, one crop per step): validation Dice plateaus at ~0.85 after ~100
    fine-tuning steps at lr 1e-3; more crops per step or more pre-training steps did not raise it within this budget.
    """

    resolution: int = 2  # mm; the nilearn grids are 1 or 2 mm
    pretrain_steps: int = 40
    pretrain_warmup: int = 4
    pretrain_lr: float = 4e-4
    pretrain_batch_size: int = 2
    finetune_steps: int = 120
    finetune_warmup: int = 6
    finetune_lr: float = 1e-3
    num_samples: int = 1  # ROI crops per volume per fine-tuning step
    val_every: int = 20
    precision: str = "auto"  # fp32 on the CPU (exact, and bf16 was no faster for this tiny model), bf16 on GPUs
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("pretrain_steps", "finetune_steps", "pretrain_batch_size", "num_samples", "val_every"):
            v = getattr(self, name)
            if not (isinstance(v, int) and v >= 1):
                raise ConfigError(f"demo {name} must be an int >= 1, got {v!r}")


FULL = DemoSettings()
QUICK = DemoSettings(pretrain_steps=3, pretrain_warmup=1, pretrain_batch_size=1, finetune_steps=4,
                     finetune_warmup=1, val_every=4)


@dataclass
class DemoContext:
    """What the steps share: settings, where things go, what earlier steps produced, and the summary rows."""

    output_dir: Path
    settings: DemoSettings
    pretrain_callback: Any = None  # a PretrainCallback (the CLI's progress bar), or None
    finetune_callback: Any = None  # a FinetuneCallback, or None
    data: Any = None  # DemoPaths from step "data"
    pretrained_dir: Path | None = None
    model_dir: Path | None = None
    report: EvalReport | None = None
    artifacts: dict[str, Path] = field(default_factory=dict)  # label -> path, printed as "where things went"
    summary: dict[str, str] = field(default_factory=dict)  # label -> value, the final table
    timings: dict[str, float] = field(default_factory=dict)  # step name -> seconds
    reused: list[str] = field(default_factory=list)  # steps whose results an earlier run in this folder had made


@dataclass(frozen=True)
class DemoStep:
    name: str
    title: str
    run: Callable[[DemoContext], None]
