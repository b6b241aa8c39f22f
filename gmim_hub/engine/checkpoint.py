"""Atomic, verified training checkpoints and the RNG state needed to resume a run bit for bit.

A checkpoint `ckpt-{step:08d}.pt` is a plain `torch.save` of a dict of tensors, numbers, strings, lists and dicts,
so it loads with `torch.load(weights_only=True)`: nothing in it is unpickled as code. Beside it,
`ckpt-{step:08d}.pt.sha256` holds its digest in `sha256sum` format (`sha256sum -c` checks it by hand).

Write order, so a kill at any instant leaves every visible `.pt` complete and verifiable:

1. `torch.save` to `ckpt-N.pt.tmp`, flush, fsync;
2. hash the bytes now on disk; write `ckpt-N.pt.sha256.tmp`, fsync, `os.replace` to `ckpt-N.pt.sha256`;
3. `os.replace` `ckpt-N.pt.tmp` -> `ckpt-N.pt`, fsync the directory;
4. prune older checkpoints, keeping the newest `keep` good ones.

A kill before step 3 leaves only `.tmp` files (and maybe an orphan sidecar), which `load_latest_checkpoint`
removes. A `.pt` that fails its digest (bit rot, truncation, a hand copy gone wrong) is skipped with a warning
naming it, and the previous good one is used.
"""

from __future__ import annotations

import logging
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gmim_hub.atomic import atomic_write, is_temp_name, sha256_file
from gmim_hub.errors import ConfigError, WeightsError

logger = logging.getLogger(__name__)

_NAME = re.compile(r"^ckpt-(\d{8})\.pt$")


# ----------------------------------------------------------------------------------------------------------- RNG
def capture_rng_state() -> dict[str, Any]:
    """Python `random`, numpy's global RNG, torch CPU (and every CUDA device's) RNG, as tensors and numbers only,
    so the result survives `torch.load(weights_only=True)`."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": {"version": int(version), "state": torch.tensor(internal, dtype=torch.int64), "gauss": gauss},
        "numpy": {"kind": str(kind), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of `capture_rng_state`. CUDA states are restored only when the device count matches."""
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss"]))
    npy = state["numpy"]
    np.random.set_state((npy["kind"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                         npy["cached"]))
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available():
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
        else:
            logger.warning("checkpoint holds %d CUDA RNG states but %d devices are visible; CUDA RNG not restored",
                           len(cuda), torch.cuda.device_count())


# ---------------------------------------------------------------------------------------------------------- save
def checkpoint_name(step: int) -> str:
    return f"ckpt-{step:08d}.pt"


def save_checkpoint(directory: Path, step: int, state: dict[str, Any], *, keep: int = 2) -> Path:
    """Atomically write `state` as `directory/ckpt-{step:08d}.pt` (+ `.sha256`), then prune older ones.

    Returns the final path. `keep` >= 1 good checkpoints remain (the new one included)."""
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep!r}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / checkpoint_name(step)
    with atomic_write(final, temp_name=final.name + ".tmp") as tmp:  # the fixed .tmp name: see _remove_leftovers
        with open(tmp, "wb") as f:
            torch.save(state, f)
        digest = sha256_file(tmp)
        with atomic_write(_sidecar(final), temp_name=_sidecar(final).name + ".tmp") as side:
            side.write_bytes(f"{digest}  {final.name}\n".encode())
    _prune(directory, keep)
    logger.info("saved checkpoint %s", final)
    return final


def _prune(directory: Path, keep: int) -> None:
    """Delete checkpoints older than the `keep`-th newest *good* one; corrupt ones are never counted as kept."""
    good = 0
    for path in list_checkpoints(directory):
        if good >= keep:
            path.unlink(missing_ok=True)
            _sidecar(path).unlink(missing_ok=True)
        elif verify_checkpoint(path) is None:
            good += 1


# ---------------------------------------------------------------------------------------------------------- load
def list_checkpoints(directory: Path) -> list[Path]:
    """Final-named checkpoints in `directory`, newest (highest step) first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [p for p in directory.iterdir() if _NAME.match(p.name)]
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)), reverse=True)  # type: ignore[union-attr]


def verify_checkpoint(path: Path) -> str | None:
    """None if `path` matches its sha256 sidecar, else the reason it cannot be trusted."""
    side = _sidecar(path)
    if not side.is_file():
        return "its .sha256 file is missing"
    try:
        expected = side.read_text().split()[0].lower()
    except (OSError, IndexError):
        return "its .sha256 file is unreadable"
    actual = sha256_file(path)
    if actual != expected:
        return "sha256 mismatch: truncated or overwritten"
    return None


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Verify and load one checkpoint on the CPU, without unpickling code; a bad file is a `WeightsError`."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"checkpoint {path} does not exist; pass an existing ckpt-XXXXXXXX.pt or use --resume auto")
    reason = verify_checkpoint(path)
    if reason is not None:
        raise WeightsError(f"checkpoint {path.name} is corrupt ({reason}); resume from an older one or start over")
    return _torch_load(path)


def load_latest_checkpoint(directory: Path) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint in `directory` that verifies and loads, as (path, state); None if there is none.

    Leftover `.tmp` files from an interrupted save are removed. Each corrupt checkpoint is reported with a warning
    naming it and the one used instead. If checkpoints exist but none is good, raises `WeightsError`."""
    directory = Path(directory)
    _remove_leftovers(directory)
    bad: list[tuple[Path, str]] = []
    for path in list_checkpoints(directory):
        reason = verify_checkpoint(path)
        if reason is None:
            try:
                state = _torch_load(path)
            except WeightsError as e:
                reason = str(e)
            else:
                for b, why in bad:
                    logger.warning("checkpoint %s is corrupt (%s); falling back to %s", b.name, why, path.name)
                return path, state
        bad.append((path, reason))
    if bad:
        names = ", ".join(f"{b.name} ({why})" for b, why in bad)
        raise WeightsError(f"no usable checkpoint in {directory}: {names}; delete them to start over, or "
                           "run again with a new --output")
    return None


def _torch_load(path: Path) -> dict[str, Any]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a pickle with code, a broken zip: all mean "not a checkpoint we can trust"
        first = re.sub(r"\x1b\[[0-9;]*m", "", str(e)).strip().splitlines()[0][:160] if str(e).strip() else ""
        raise WeightsError(f"checkpoint {path.name} cannot be read ({type(e).__name__}: {first})") from e
    if not isinstance(state, dict):
        raise WeightsError(f"checkpoint {path.name} holds a {type(state).__name__}, not a dict")
    return state


def _remove_leftovers(directory: Path) -> None:
    if not directory.is_dir():
        return
    for p in directory.iterdir():
        orphan_sidecar = p.name.endswith(".pt.sha256") and not (directory / p.name[: -len(".sha256")]).exists()
        if (p.name.startswith("ckpt-") and p.name.endswith(".tmp")) or orphan_sidecar or is_temp_name(p.name):
            logger.info("removing leftover %s from an interrupted checkpoint save", p.name)
            p.unlink(missing_ok=True)


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def choose_checkpoint(resume: str, directory: Path) -> Path | None:
    """The checkpoint a run should resume from: `resume` is "auto" (the newest good one, or None), "never" (None;
    refuses a folder that already holds checkpoints, so an earlier run is never overwritten) or a file path."""
    directory = Path(directory)
    if resume == "never":
        existing = list_checkpoints(directory)
        if existing:
            raise ConfigError(f"{directory} already holds checkpoints ({existing[0].name}, ...) of an earlier run; "
                              "continue it with --resume auto, or choose a new --output")
        return None
    if resume == "auto":
        found = load_latest_checkpoint(directory)
        return found[0] if found is not None else None
    path = Path(resume).expanduser()
    if not path.is_file():
        raise ConfigError(f"--resume {resume!r}: no such checkpoint file; pass 'auto', 'never' or a ckpt-*.pt path")
    return path
