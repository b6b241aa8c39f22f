"""Checkpoints: atomic writes, integrity checks with fallback, pruning, RNG capture; plus schedule and precision."""

from __future__ import annotations

import logging
import math
import random

import numpy as np
import pytest
import torch

from gmim_hub.engine.checkpoint import (
    capture_rng_state,
    list_checkpoints,
    load_checkpoint,
    load_latest_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from gmim_hub.engine.precision import autocast_context, make_grad_scaler, optimizer_step, resolve_precision
from gmim_hub.engine.schedule import WarmupCosine, warmup_cosine_scheduler
from gmim_hub.errors import ConfigError, WeightsError


def _draws() -> tuple:
    return random.random(), float(np.random.rand()), np.random.randn(), torch.rand(3).tolist(), torch.randn(1).item()


def test_rng_roundtrip_through_weights_only_file(tmp_path):
    random.seed(1)
    np.random.seed(2)
    np.random.randn()  # leaves a cached gaussian in numpy's state
    torch.manual_seed(3)
    state = capture_rng_state()
    expected = _draws()
    torch.save(state, tmp_path / "rng.pt")
    random.seed(99)
    np.random.seed(99)
    torch.manual_seed(99)
    restore_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert _draws() == expected


def _state(step: int) -> dict:
    return {"step": step, "w": torch.full((4,), float(step)), "rng": capture_rng_state()}


def test_save_is_atomic_and_prunes(tmp_path):
    for step in (10, 20, 30):
        path = save_checkpoint(tmp_path, step, _state(step), keep=2)
        assert path.name == f"ckpt-{step:08d}.pt"
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["ckpt-00000020.pt", "ckpt-00000020.pt.sha256", "ckpt-00000030.pt", "ckpt-00000030.pt.sha256"]
    assert not list(tmp_path.glob("*.tmp"))
    path, state = load_latest_checkpoint(tmp_path)
    assert path.name == "ckpt-00000030.pt" and state["step"] == 30 and torch.equal(state["w"], torch.full((4,), 30.0))


@pytest.mark.parametrize("damage", ["garbage", "truncate", "flip_byte"])
def test_corrupt_newest_falls_back_with_warning(tmp_path, caplog, damage):
    for step in (20, 40):
        save_checkpoint(tmp_path, step, _state(step))
    newest = tmp_path / "ckpt-00000040.pt"
    data = newest.read_bytes()
    if damage == "garbage":
        newest.write_bytes(b"not a checkpoint at all")
    elif damage == "truncate":
        newest.write_bytes(data[: len(data) // 2])
    else:
        newest.write_bytes(data[:100] + bytes([data[100] ^ 0xFF]) + data[101:])
    with caplog.at_level(logging.WARNING, logger="gmim_hub.engine.checkpoint"):
        path, state = load_latest_checkpoint(tmp_path)
    assert path.name == "ckpt-00000020.pt" and state["step"] == 20
    assert ("checkpoint ckpt-00000040.pt is corrupt (sha256 mismatch: truncated or overwritten); "
            "falling back to ckpt-00000020.pt") in caplog.text
    with pytest.raises(WeightsError, match=r"ckpt-00000040.pt is corrupt \(sha256 mismatch"):
        load_checkpoint(newest)


def test_prune_keeps_good_ones_when_one_is_corrupt(tmp_path):
    save_checkpoint(tmp_path, 10, _state(10))
    save_checkpoint(tmp_path, 20, _state(20))
    (tmp_path / "ckpt-00000020.pt").write_bytes(b"rot")
    save_checkpoint(tmp_path, 30, _state(30), keep=2)
    # the corrupt 20 does not count as kept: 30 and 10 are the two good ones
    assert [p.name for p in list_checkpoints(tmp_path)] == ["ckpt-00000030.pt", "ckpt-00000020.pt",
                                                             "ckpt-00000010.pt"]


def test_interrupted_save_leftovers_are_ignored_and_removed(tmp_path):
    save_checkpoint(tmp_path, 5, _state(5))
    # what a kill between "write tmp" and "rename" leaves behind: a .tmp file and maybe an orphan sidecar
    (tmp_path / "ckpt-00000010.pt.tmp").write_bytes(b"half a checkpoi")
    (tmp_path / "ckpt-00000010.pt.sha256").write_text("0" * 64 + "  ckpt-00000010.pt\n")
    path, state = load_latest_checkpoint(tmp_path)
    assert path.name == "ckpt-00000005.pt" and state["step"] == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt-00000005.pt", "ckpt-00000005.pt.sha256"]


def test_missing_sidecar_is_not_trusted(tmp_path, caplog):
    save_checkpoint(tmp_path, 1, _state(1))
    save_checkpoint(tmp_path, 2, _state(2))
    (tmp_path / "ckpt-00000002.pt.sha256").unlink()
    with caplog.at_level(logging.WARNING):
        path, _ = load_latest_checkpoint(tmp_path)
    assert path.name == "ckpt-00000001.pt"
    assert "ckpt-00000002.pt is corrupt (its .sha256 file is missing); falling back to ckpt-00000001.pt" in caplog.text


def test_no_checkpoints_returns_none_and_all_corrupt_raises(tmp_path):
    assert load_latest_checkpoint(tmp_path / "missing") is None
    assert load_latest_checkpoint(tmp_path) is None
    save_checkpoint(tmp_path, 3, _state(3))
    (tmp_path / "ckpt-00000003.pt").write_bytes(b"x")
    with pytest.raises(WeightsError, match=r"no usable checkpoint in .*ckpt-00000003.pt \(sha256 mismatch"):
        load_latest_checkpoint(tmp_path)


class _Evil:
    def __reduce__(self):
        return (eval, ("__import__('os').environ.__setitem__('GMIM_PWNED', '1')",))


def test_pickle_with_code_is_refused_without_running_it(tmp_path, monkeypatch):
    """A checkpoint with a valid sidecar but a code-carrying pickle inside: weights_only refuses it."""
    import hashlib

    monkeypatch.delenv("GMIM_PWNED", raising=False)
    path = tmp_path / "ckpt-00000007.pt"
    torch.save({"payload": _Evil()}, path)
    (tmp_path / "ckpt-00000007.pt.sha256").write_text(hashlib.sha256(path.read_bytes()).hexdigest() + "  x\n")
    with pytest.raises(WeightsError, match=r"ckpt-00000007.pt cannot be read \(UnpicklingError"):
        load_checkpoint(path)
    import os

    assert "GMIM_PWNED" not in os.environ


def test_bad_keep_and_missing_path(tmp_path):
    with pytest.raises(ValueError, match="keep must be >= 1, got 0"):
        save_checkpoint(tmp_path, 1, {}, keep=0)
    with pytest.raises(WeightsError, match="does not exist; pass an existing ckpt-XXXXXXXX.pt"):
        load_checkpoint(tmp_path / "nope.pt")


# -------------------------------------------------------------------------------------------------- schedule
@pytest.mark.parametrize(("step", "expected"), [
    (0, 0.0), (250, 0.5), (499, 499 / 500), (500, 1.0), (2250, 0.5), (4000, 0.0), (5000, 0.0),
])
def test_warmup_cosine_values(step, expected):
    assert WarmupCosine(500, 4000)(step) == pytest.approx(expected, abs=1e-12)


def test_scheduler_lr_per_step_and_state_roundtrip():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=4e-4)
    sched = warmup_cosine_scheduler(opt, 10, 30)
    lrs = []
    for _ in range(30):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert lrs[0] == 0.0 and lrs[5] == pytest.approx(2e-4) and lrs[10] == pytest.approx(4e-4)
    assert lrs[20] == pytest.approx(4e-4 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    state = sched.state_dict()
    assert state["lr_lambdas"][0] == {"warmup_steps": 10, "total_steps": 30}  # recorded, not None
    opt2 = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=4e-4)
    sched2 = warmup_cosine_scheduler(opt2, 1, 2)
    sched2.load_state_dict(state)
    assert sched2.lr_lambdas[0].total_steps == 30 and sched2.last_epoch == 30


@pytest.mark.parametrize(("warmup", "total", "msg"), [
    (10, 10, r"warmup must be in \[0, steps\), got warmup=10 with steps=10"),
    (-1, 10, r"warmup must be in \[0, steps\), got warmup=-1"),
    (0, 0, "steps must be >= 1, got 0"),
])
def test_schedule_bad_values(warmup, total, msg):
    with pytest.raises(ConfigError, match=msg):
        WarmupCosine(warmup, total)


# ------------------------------------------------------------------------------------------------- precision
def test_precision_resolution_and_errors():
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) == "fp32"  # bf16 conv3d grads are not deterministic on CPU
    assert resolve_precision("fp32", cpu) == "fp32"
    assert make_grad_scaler(cpu, "bf16") is None
    with pytest.raises(ConfigError, match="precision must be one of fp32, bf16, fp16, auto, got 'half'"):
        resolve_precision("half", cpu)
    with autocast_context(cpu, "bf16"):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16


def test_fp16_scaler_unscales_before_clipping():
    """With a GradScaler, the norm handed to clipping is the true one, so clipping works in real units."""
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.tensor([3.0, 4.0]))
    opt = torch.optim.SGD([w], lr=1.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    loss = (w * torch.tensor([3.0, 4.0])).sum()  # grad = (3, 4), norm 5
    norm = optimizer_step(loss, opt, [w], scaler, max_norm=1.0)
    assert norm == pytest.approx(5.0)
    assert w.detach().tolist() == pytest.approx([3.0 - 0.6, 4.0 - 0.8], abs=1e-5)  # clipped to norm 1
