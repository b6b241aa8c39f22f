"""Training engine: checkpoints, schedules, precision, distributed setup, logging and the pre-training loop."""

from gmim_hub.engine.checkpoint import (
    capture_rng_state,
    load_checkpoint,
    load_latest_checkpoint,
    restore_rng_state,
    save_checkpoint,
)

__all__ = [
    "capture_rng_state", "load_checkpoint", "load_latest_checkpoint", "restore_rng_state", "save_checkpoint",
]
