"""Kill and resume: SIGKILL `gmim pretrain` and `gmim train` at K moments, resume each time with `--resume auto`, and
check that the final weights equal an uninterrupted run's bit for bit, with no corrupt checkpoint ever left behind.

    python scripts/kill_resume.py                          # both jobs, 10 kills each (tiny preset, CPU)
    python scripts/kill_resume.py --job pretrain --kills 4 --steps 6

For each job: one uninterrupted reference run (its checkpoint timeline is watched to learn the start-up time, the
time per step and how long a checkpoint write takes on this machine right now), then a run in the same settings
that is killed K times, alternating two kinds of moment:

* `write`: during a checkpoint write. The checkpoint folder is polled every millisecond; when the `.tmp` of the
  second checkpoint this attempt writes appears (the first is let through, so the run makes progress), the process
  group is SIGKILLed after a random fraction of a typical write time. Proof that it landed mid-write: the `.tmp`
  is still there afterwards (the engine moves it into place only when complete).
* `random`: at a random instant between half the start-up time and one step after the first checkpoint, measured
  from the process start (imports, data checks, a training step or a checkpoint write may be running).

After every kill, every `ckpt-*.pt` in the folder must match its sha256 sidecar and the newest must load. Finally
the run is resumed to completion and its `model/model.safetensors` compared tensor by tensor (bytes) with the
reference, and its metrics log record by record (timings excluded). Checkpoints are written every step, data
loading runs in-process (`--num-workers 0`). Ends with one line per job:
`kill_resume job=pretrain kills=10 survived=10 mid_write=5 corrupt_left=0 bit_exact=True`.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # `python scripts/kill_resume.py` imports gmim_hub from this checkout
    sys.path.insert(0, str(REPO_ROOT))

_TMP = re.compile(r"^ckpt-(\d{8})\.pt\.tmp$")
_FINAL = re.compile(r"^ckpt-(\d{8})\.pt$")
_TIMING_KEYS = ("time", "elapsed")


@dataclass(frozen=True)
class Job:
    """A `gmim` command without `-o`; checkpoints go to OUT/`ckpt_subdir`."""

    name: str
    argv: tuple[str, ...]
    ckpt_subdir: str
    steps: int

    def cmd(self, out: Path) -> list[str]:
        return [sys.executable, "-m", "gmim_hub.cli.main", *self.argv, "-o", str(out)]


@dataclass
class Timeline:
    """Seconds from the process start: when each checkpoint write began (`.tmp` seen) and ended (final name)."""

    began: dict[int, float] = field(default_factory=dict)
    ended: dict[int, float] = field(default_factory=dict)

    def first_checkpoint(self) -> float:
        return min(self.ended.values())

    def step_time(self) -> float:
        """The shortest gap between two checkpoints (the last one may include a final validation)."""
        ends = sorted(self.ended.values())
        return min((b - a for a, b in zip(ends, ends[1:], strict=False)), default=ends[0])

    def write_time(self) -> float:
        spans = sorted(self.ended[s] - self.began[s] for s in self.ended if s in self.began)
        return spans[len(spans) // 2] if spans else 0.05


@dataclass
class Kill:
    mode: str  # write | random
    at_s: float  # seconds after the process start
    killed: bool  # False: the run finished first
    resumed_from: int  # newest good checkpoint step when the attempt started
    target: int | None = None  # write mode: the checkpoint being written
    mid_write: bool = False  # its .tmp survived the kill: the kill landed inside the write
    tmp_bytes: int = 0  # how much of it was on disk
    newest_after: int = 0
    checkpoints_after: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # corrupt or unloadable checkpoints


@dataclass
class Report:
    job: str
    steps: int
    kills: list[Kill] = field(default_factory=list)
    reference_s: float = 0.0
    killed_series_s: float = 0.0
    step_s: float = 0.0
    write_s: float = 0.0
    bit_exact: bool = False
    differing_tensors: list[str] = field(default_factory=list)
    trajectory_equal: bool = False
    corrupt_left: int = 0
    leftovers_at_end: list[str] = field(default_factory=list)

    @property
    def survived(self) -> int:
        return sum(k.killed and not k.problems for k in self.kills)

    def line(self) -> str:
        return (f"kill_resume job={self.job} kills={len(self.kills)} survived={self.survived} "
                f"mid_write={sum(k.mid_write for k in self.kills)} corrupt_left={self.corrupt_left} "
                f"bit_exact={self.bit_exact}")


# ------------------------------------------------------------------------------------------- watching and killing
def _scan(folder: Path) -> tuple[set[int], set[int]]:
    """(steps with a `.tmp` being written, steps with a final checkpoint) in `folder`."""
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return set(), set()
    tmp = {int(m.group(1)) for n in names if (m := _TMP.match(n))}
    return tmp, {int(m.group(1)) for n in names if (m := _FINAL.match(n))}


def _start(cmd: list[str], log: Path) -> subprocess.Popen:
    with open(log, "ab") as f:  # stdout/stderr of every attempt, for a post-mortem
        return subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)  # its own process group: loader workers die with it


def _killpg(proc: subprocess.Popen) -> bool:
    """SIGKILL the process group; True if the process was still running (so it was really killed)."""
    if proc.poll() is not None:
        return False
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    return proc.returncode == -signal.SIGKILL


def reference_run(job: Job, out: Path, timeout: float) -> Timeline:
    """Run `job` uninterrupted, watching its checkpoint folder."""
    proc, t0, seen = _start(job.cmd(out), out.with_suffix(".log")), time.monotonic(), Timeline()
    ckpts = out / job.ckpt_subdir
    while proc.poll() is None:
        now = time.monotonic() - t0
        if now > timeout:
            _killpg(proc)
            raise RuntimeError(f"the reference {job.name} run took more than {timeout:.0f} s")
        tmp, final = _scan(ckpts)
        for s in tmp:
            seen.began.setdefault(s, now)
        for s in final:
            seen.ended.setdefault(s, now)
        time.sleep(0.001)
    if proc.returncode != 0:
        raise RuntimeError(f"the reference {job.name} run failed (rc {proc.returncode}); see {out}.log")
    return seen


def kill_once(job: Job, out: Path, mode: str, rng: random.Random, timing: Timeline, timeout: float) -> Kill:
    """Start `job` (resuming from whatever `out` holds), SIGKILL it at a `mode` moment, then check the folder."""
    from gmim_hub.engine.checkpoint import list_checkpoints

    ckpts = out / job.ckpt_subdir
    start_step = max((int(_FINAL.match(p.name).group(1)) for p in list_checkpoints(ckpts)), default=0)
    proc, t0 = _start(job.cmd(out), out.with_suffix(".log")), time.monotonic()
    kill = Kill(mode, 0.0, False, start_step)
    if mode == "write":
        kill.target = min(start_step + 2, job.steps)  # let one checkpoint through: every attempt makes progress
        while proc.poll() is None and kill.target not in _scan(ckpts)[0]:
            if time.monotonic() - t0 > timeout:
                break
            time.sleep(0.001)
        time.sleep(rng.uniform(0.0, 0.5) * timing.write_time())  # somewhere inside the write
    else:
        lo = 0.5 * (timing.first_checkpoint() - timing.step_time())
        time.sleep(max(0.0, rng.uniform(lo, timing.first_checkpoint() + timing.step_time())))
    kill.at_s = round(time.monotonic() - t0, 3)
    kill.killed = _killpg(proc)
    if kill.target is not None:
        tmp = ckpts / f"ckpt-{kill.target:08d}.pt.tmp"
        kill.mid_write = kill.killed and tmp.exists()
        kill.tmp_bytes = tmp.stat().st_size if tmp.exists() else 0
    _inspect(out, ckpts, kill)
    return kill


def checkpoint_folders(out: Path) -> list[Path]:
    """OUT/checkpoints and its subfolders (fine-tuning keeps last/ and best/)."""
    root = out / "checkpoints"
    return [root, *sorted(p for p in root.iterdir() if p.is_dir())] if root.is_dir() else []


def corrupt_checkpoints(out: Path) -> list[str]:
    """Every final-named `ckpt-*.pt` under OUT/checkpoints that does not match its sha256 sidecar."""
    from gmim_hub.engine.checkpoint import list_checkpoints, verify_checkpoint

    return [f"{p.parent.name}/{p.name}: {why}" for d in checkpoint_folders(out) for p in list_checkpoints(d)
            if (why := verify_checkpoint(p)) is not None]


def _inspect(out: Path, ckpts: Path, kill: Kill) -> None:
    """Every final-named checkpoint must verify against its sidecar; the newest one to resume from must load."""
    from gmim_hub.engine.checkpoint import list_checkpoints, load_checkpoint
    from gmim_hub.errors import GMIMError

    kill.checkpoints_after = sorted(os.listdir(ckpts)) if ckpts.is_dir() else []
    found = list_checkpoints(ckpts)
    kill.problems = corrupt_checkpoints(out)
    if found and not kill.problems:
        try:
            kill.newest_after = int(load_checkpoint(found[0])["step"])
        except (GMIMError, KeyError) as e:
            kill.problems.append(f"{found[0].name}: {e}")


# ----------------------------------------------------------------------------------------------- comparing
def compare_weights(a: Path, b: Path) -> list[str]:
    """Names of tensors that differ in dtype, shape or any byte (all of them if the key sets differ)."""
    from safetensors.torch import load_file

    ta, tb = load_file(a), load_file(b)
    if sorted(ta) != sorted(tb):
        return sorted(set(ta) ^ set(tb))
    return [k for k in ta if ta[k].dtype != tb[k].dtype or ta[k].shape != tb[k].shape
            or ta[k].numpy().tobytes() != tb[k].numpy().tobytes()]


def _trajectory(out: Path) -> list[dict[str, Any]]:
    from gmim_hub.engine.logger import read_metrics

    return [{k: v for k, v in r.items() if k not in _TIMING_KEYS} for r in read_metrics(out / "metrics.jsonl")]


def kill_resume(job: Job, workdir: Path, kills: int, seed: int = 0, timeout: float = 1800.0,
                log: Any = print) -> Report:
    """The whole experiment for one job in `workdir` (<job>-reference/ and <job>-killed/ inside it)."""
    rng, report = random.Random(seed), Report(job.name, job.steps)
    ref, run = workdir / f"{job.name}-reference", workdir / f"{job.name}-killed"
    t0 = time.monotonic()
    timing = reference_run(job, ref, timeout)
    report.reference_s, report.step_s, report.write_s = time.monotonic() - t0, timing.step_time(), timing.write_time()
    log(f"{job.name}: reference run {report.reference_s:.0f} s ({job.steps} steps; first checkpoint at "
        f"{timing.first_checkpoint():.1f} s, {report.step_s:.1f} s per step, writes take "
        f"{report.write_s * 1e3:.0f} ms)")
    t0 = time.monotonic()
    for i in range(kills):
        k = kill_once(job, run, "write" if i % 2 == 0 else "random", rng, timing, timeout)
        report.kills.append(k)
        where = f"in the write of ckpt {k.target} ({k.tmp_bytes} bytes on disk)" if k.mid_write else k.mode
        log(f"{job.name}: kill {i + 1}/{kills} at {k.at_s:.2f} s, {where}: resumed from {k.resumed_from}, newest good "
            f"now {k.newest_after}; {'OK' if k.killed and not k.problems else k.problems or 'finished before kill'}")
        if not k.killed:
            break
    final = subprocess.run(job.cmd(run), capture_output=True, text=True, timeout=timeout)
    report.killed_series_s = time.monotonic() - t0
    if final.returncode != 0:
        raise RuntimeError(f"the final resume of {job.name} failed (rc {final.returncode}): {final.stderr[-2000:]}")
    report.differing_tensors = compare_weights(ref / "model" / "model.safetensors", run / "model" / "model.safetensors")
    report.bit_exact = not report.differing_tensors
    report.trajectory_equal = _trajectory(ref) == _trajectory(run)
    report.corrupt_left = len(corrupt_checkpoints(run))
    report.leftovers_at_end = sorted(f"{d.name}/{n}" for d in checkpoint_folders(run) for n in os.listdir(d)
                                     if n.endswith(".tmp"))
    return report


# ----------------------------------------------------------------------------------------------------- jobs
def pretrain_job(workdir: Path, steps: int) -> Job:
    """Tiny preset (64^3 ROI) on 3 synthetic 2 mm volumes, native grid, batch 1: epochs end every 3 steps."""
    import dataclasses

    import nibabel as nib
    import numpy as np

    from gmim_hub import PRESETS

    data = workdir / "pretrain-data"
    data.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(3):
        a = rng.normal(100.0, 20.0, (60, 56, 66)).astype(np.float32)
        lo = rng.integers(4, 20, size=3)
        a[lo[0]:lo[0] + 30, lo[1]:lo[1] + 24, lo[2]:lo[2] + 28] += 80.0  # structure, so the grid choice varies
        nib.save(nib.Nifti1Image(a, np.diag([2.0, 2.0, 2.0, 1.0])), data / f"vol{i}.nii.gz")
    tiny = PRESETS["tiny"]
    dataclasses.replace(tiny, data=dataclasses.replace(tiny.data, spacing=None)).to_json_file(workdir / "pre.json")
    argv = ("pretrain", "--data", str(data), "--config", str(workdir / "pre.json"), "--steps", str(steps), "--warmup",
            "1", "--batch-size", "1", "--num-workers", "0", "--seed", "7", "--log-every", "1", "--eval-every", "0",
            "--preview-every", "0", "--ckpt-every", "1")
    return Job("pretrain", argv, "checkpoints", steps)


def train_job(workdir: Path, steps: int, validate: bool = True) -> Job:
    """Fine-tuning on the embedded MNI152 tissue task (2 mm), tiny preset with a 64x64x32 ROI. validate: sliding-
    window validation after the last step (and the best/ checkpoint); False trains on a training-only datalist,
    which skips both validations of the end (the CI test's choice: they are most of a short run's time)."""
    import dataclasses

    from gmim_hub.data import build_demo_dataset, demo_config

    demo = build_demo_dataset(workdir / "train-data")  # built once, outside the killed runs
    dataclasses.replace(demo_config(), roi_size=(64, 64, 32)).to_json_file(workdir / "train.json")
    datalist = demo.dataset_json
    if not validate:
        datalist = workdir / "train-only.json"
        datalist.write_text(json.dumps({"training": [{"image": str(demo.train_image), "label": str(demo.train_label)}],
                                        "labels": json.loads(demo.dataset_json.read_text()).get("labels", {})}))
    argv = ("train", "--data", str(datalist), "--config", str(workdir / "train.json"), "--steps", str(steps),
            "--num-samples", "1", "--val-every", "0", "--log-every", "1", "--ckpt-every", "1", "--device", "cpu",
            "--cache", "--seed", "3")
    return Job("train", argv, "checkpoints/last", steps)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--job", choices=("pretrain", "train", "both"), default="both")
    p.add_argument("--kills", type=int, default=10, help="SIGKILLs per job (half in checkpoint writes)")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: kills + 2)")
    p.add_argument("--seed", type=int, default=0, help="seed of the kill moments")
    p.add_argument("--workdir", type=Path, default=None, help="keep the runs here (default: a temporary folder)")
    p.add_argument("--json", type=Path, default=None, help="also write the reports as JSON here")
    a = p.parse_args(argv)
    if a.kills < 1:
        p.error("--kills must be >= 1")
    steps = a.steps or a.kills + 2  # a write kill advances one checkpoint, a random kill at most about one
    import tempfile

    with tempfile.TemporaryDirectory(prefix="gmim-kill-") as tmp:
        workdir = a.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        builders = {"pretrain": pretrain_job, "train": train_job}
        names = ["pretrain", "train"] if a.job == "both" else [a.job]
        reports = [kill_resume(builders[n](workdir, steps), workdir, a.kills, seed=a.seed) for n in names]
    for r in reports:
        print(f"{r.job}: reference {r.reference_s:.0f} s, killed series {r.killed_series_s:.0f} s; trajectory equal: "
              f"{r.trajectory_equal}; differing tensors: {r.differing_tensors[:3] or 'none'}; "
              f".tmp left at the end: {r.leftovers_at_end or 'none'}")
    if a.json is not None:
        a.json.write_text(json.dumps([{**asdict(r), "survived": r.survived} for r in reports], indent=2) + "\n")
    for r in reports:
        print(r.line())
    ok = all(r.survived == len(r.kills) == a.kills and r.bit_exact and r.trajectory_equal and not r.corrupt_left
             for r in reports)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
