"""Exact resume: a `gmim pretrain` run killed with SIGKILL (twice, and with its newest checkpoint then corrupted)
and resumed ends with the same weights, bit for bit, as an uninterrupted run with the same seed.

Safetensors files are compared tensor by tensor, not byte by byte: the header metadata is written in hash-map
order, which varies from process to process."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from _pretrain_fixtures import pretrain_cmd, run_cli, write_config, write_volumes
from safetensors.torch import load_file

from gmim_hub.engine.checkpoint import list_checkpoints
from gmim_hub.engine.logger import read_metrics

pytestmark = pytest.mark.slow

STEPS = 6  # 4 volumes at batch 1: the run crosses an epoch boundary
TRAJECTORY = ("loss", "cc", "rec", "grad_norm", "lr")


def _run_until_checkpoint(cmd: list[str], ckpt_dir: Path, step: int, timeout: float = 600) -> None:
    """Start `cmd`, wait until checkpoint `step` is visible under its final name, then SIGKILL the process group
    (the run and any loader workers it forked)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    target = ckpt_dir / f"ckpt-{step:08d}.pt"
    deadline = time.monotonic() + timeout
    try:
        while not target.exists():
            if proc.poll() is not None:
                raise AssertionError(f"run ended (rc {proc.returncode}) before {target.name}: "
                                     f"{proc.stderr.read().decode()[-2000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no {target.name} after {timeout} s")
            time.sleep(0.05)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed; the test proves nothing"


def _assert_bitwise_equal(a: Path, b: Path) -> None:
    ta, tb = load_file(a), load_file(b)
    assert sorted(ta) == sorted(tb)
    differing = [k for k in ta if ta[k].dtype != tb[k].dtype or ta[k].numpy().tobytes() != tb[k].numpy().tobytes()]
    assert not differing, f"{len(differing)} of {len(ta)} tensors differ, e.g. {differing[:3]}"


def test_sigkill_and_corrupt_checkpoint_resume_bit_exact(tmp_path):
    data = write_volumes(tmp_path / "imgs")
    cfg = write_config(tmp_path / "config.json")
    extra = ("--ckpt-every", "1", "--num-workers", "1")  # a loader worker too: its seeding must survive resume
    ref, run = tmp_path / "uninterrupted", tmp_path / "killed"

    done = run_cli(pretrain_cmd(data, cfg, ref, STEPS, *extra))
    assert done.returncode == 0, done.stderr[-3000:]

    ckpts = run / "checkpoints"
    _run_until_checkpoint(pretrain_cmd(data, cfg, run, STEPS, *extra), ckpts, 2)  # kill 1: mid step 3
    _run_until_checkpoint(pretrain_cmd(data, cfg, run, STEPS, *extra), ckpts, 4)  # kill 2, after resuming
    newest, previous = list_checkpoints(ckpts)[:2]
    blob = newest.read_bytes()
    newest.write_bytes(blob[: len(blob) // 3])  # a truncated checkpoint (disk full, bad copy)

    final = run_cli(pretrain_cmd(data, cfg, run, STEPS, *extra))
    assert final.returncode == 0, final.stderr[-3000:]
    assert (f"checkpoint {newest.name} is corrupt (sha256 mismatch: truncated or overwritten); "
            f"falling back to {previous.name}") in final.stderr

    _assert_bitwise_equal(ref / "model" / "model.safetensors", run / "model" / "model.safetensors")
    # the whole trajectory matches too, and the log reads like one run (no duplicated steps)
    rec_ref, rec_run = read_metrics(ref / "metrics.jsonl"), read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in rec_run] == list(range(1, STEPS + 1))
    assert [{k: r[k] for k in TRAJECTORY} for r in rec_run] == [{k: r[k] for k in TRAJECTORY} for r in rec_ref]
    assert not [p.name for p in ckpts.iterdir() if p.name.endswith(".tmp")]
    assert [p.name for p in list_checkpoints(ckpts)] == [f"ckpt-{STEPS:08d}.pt", f"ckpt-{STEPS - 1:08d}.pt"]

    # --resume auto on the finished run: loads the last checkpoint, trains 0 steps, rewrites the same model
    again = run_cli(pretrain_cmd(data, cfg, run, STEPS, *extra))
    assert again.returncode == 0, again.stderr[-3000:]
    _assert_bitwise_equal(ref / "model" / "model.safetensors", run / "model" / "model.safetensors")
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl")] == list(range(1, STEPS + 1))
