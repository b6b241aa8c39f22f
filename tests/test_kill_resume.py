"""Kill and resume in CI, the short form of `scripts/kill_resume.py` (which kills each job 10 times): `gmim pretrain`
is SIGKILLed 3 times and `gmim train` twice, alternating a kill inside a checkpoint write (the `.tmp` is watched and
the kill lands before it is moved into place) and a kill at a random instant. Each time the run resumes with
`--resume auto` (fine-tuning without its end-of-run validation here, to keep CI short; the script validates).
After every kill each `ckpt-*.pt` left must match its sha256 and the newest must load; at the end the weights must
equal an uninterrupted run's bit for bit and the metrics log must read like one run."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def kr():
    path = Path(__file__).resolve().parent.parent / "scripts" / "kill_resume.py"
    spec = importlib.util.spec_from_file_location("gmim_kill_resume", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _check(report, kills: int) -> None:
    print("\n" + report.line())
    assert len(report.kills) == kills and all(k.killed for k in report.kills), "a run finished before its kill"
    assert report.survived == kills, [k.problems for k in report.kills]  # no corrupt checkpoint after any kill
    assert any(k.mid_write for k in report.kills), "no kill landed inside a checkpoint write"
    assert report.kills[-1].newest_after > report.kills[0].resumed_from  # the runs made progress between kills
    assert report.bit_exact, report.differing_tensors
    assert report.trajectory_equal
    assert report.corrupt_left == 0 and not report.leftovers_at_end


def test_pretrain_survives_sigkills_in_and_between_checkpoint_writes(kr, tmp_path):
    report = kr.kill_resume(kr.pretrain_job(tmp_path, steps=4), tmp_path, kills=3, seed=1, timeout=900, log=print)
    _check(report, kills=3)


def test_train_survives_sigkills_in_and_between_checkpoint_writes(kr, tmp_path):
    job = kr.train_job(tmp_path, steps=3, validate=False)
    report = kr.kill_resume(job, tmp_path, kills=2, seed=2, timeout=900, log=print)
    _check(report, kills=2)
