"""Run logging on the main rank: `metrics.jsonl` (one JSON object per line) and TensorBoard scalars.

`metrics.jsonl` is the machine-readable record of a run: each training log line holds `step` (optimizer steps
done), `loss`, `cc`, `rec`, `lr`, `grad_norm`, `time` (seconds per step over the logging interval) and `elapsed`;
validation lines hold `step` and `val_loss`, `val_cc`, `val_rec`. On resume from step s, lines with a step > s
(written after that checkpoint by the interrupted run) are dropped, so the file reads like one uninterrupted run.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from gmim_hub.atomic import write_text

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
TB_DIR = "tensorboard"


class RunLogger:
    """Append-only metrics log plus a TensorBoard `SummaryWriter`; every method is a no-op when not `enabled`
    (ranks other than 0)."""

    def __init__(self, output_dir: Path, *, enabled: bool = True, resume_step: int = 0,
                 tensorboard: bool = True) -> None:
        self.enabled = enabled
        self.path = Path(output_dir) / METRICS_FILE
        self._writer: Any = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _truncate_after(self.path, resume_step)
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step drops TensorBoard events the interrupted run wrote after the checkpoint we resume from
            self._writer = SummaryWriter(str(Path(output_dir) / TB_DIR), purge_step=resume_step or None)

    def log(self, step: int, values: Mapping[str, float], *, prefix: str = "train") -> None:
        """Write one record: a JSON line with `step` and `values`, and one TensorBoard scalar per value."""
        if not self.enabled:
            return
        record = {"step": int(step), **{k: _jsonable(v) for k, v in values.items()}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._writer is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)):
                    self._writer.add_scalar(f"{prefix}/{k}", float(v), int(step))

    def close(self) -> None:
        if not self.enabled:
            return
        self._file.close()
        if self._writer is not None:
            self._writer.close()

    def __enter__(self) -> RunLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _jsonable(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no NaN/inf; keep the record parseable by strict readers
    return v


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """All records of a `metrics.jsonl` (a torn last line from a killed run is skipped)."""
    out: list[dict[str, Any]] = []
    if not Path(path).is_file():
        return out
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            logger.warning("skipping an unreadable line in %s (a run killed while writing?)", path)
    return out


def _truncate_after(path: Path, step: int) -> None:
    """Keep only records with step <= `step` (all of them when `step` is 0 and the file is new)."""
    if not path.is_file():
        return
    kept = [r for r in read_metrics(path) if isinstance(r.get("step"), int) and r["step"] <= step]
    write_text(path, "".join(json.dumps(r) + "\n" for r in kept))
