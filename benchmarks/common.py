"""Shared helpers for the benchmark scripts: thread setup, side-by-side timing, machine facts, result files.

Every benchmark times the project and its baseline in the same process and run, alternating them after warm-ups,
and reports medians, so that a busy machine slows both sides alike instead of biasing one. Each script ends by
printing one line `P<n> ratio=<x> agreement=<y> ...` and writing `benchmarks/results/<id>.json`.

BLAS note: torch (MKL + oneDNN) and onnxruntime (MLAS) do not use OpenBLAS, so the OPENBLAS_CORETYPE /
OPENBLAS_L2_SIZE settings of this machine do not touch the timed model code. numpy's OpenBLAS is only reached by
numpy/scipy calls (the P3 baseline's masking, which sorts and counts and does no BLAS work); the JSON records the
variables and the OpenBLAS kernel threadpoolctl reports, so a reader can check.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent / "results"
REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # `python benchmarks/bench_x.py` from the repo root imports gmim_hub from here
    sys.path.insert(0, str(REPO_ROOT))


def base_parser(description: str) -> argparse.ArgumentParser:
    """Options every benchmark shares: --quick, --threads, --repeats, --warmup, --no-write."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="a short run (fewer repeats / smaller inputs)")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads for both sides (default 2)")
    p.add_argument("--repeats", type=int, default=None, help="timed runs per side (default depends on --quick)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs per side before timing")
    p.add_argument("--no-write", action="store_true", help="do not write benchmarks/results/<id>.json")
    return p


def set_threads(n: int) -> None:
    """The same intra-op thread count for torch and (through the environment) for OpenMP/MKL children."""
    import torch

    torch.set_num_threads(n)
    os.environ.setdefault("OMP_NUM_THREADS", str(n))


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def in_process(fn: Callable[[], Any], keep: dict[str, Any] | None = None, name: str = "") -> Callable[[], float]:
    """A side for `alternate` that runs `fn` here and returns its seconds (its output kept in keep[name])."""
    def run() -> float:
        dt, out = timed(fn)
        if keep is not None:
            keep[name] = out
        return dt
    return run


def alternate(fns: dict[str, Callable[[], float]], *, repeats: int, warmup: int = 1,
              log: Callable[[str], None] | None = print,
              after_warmup: Callable[[], None] | None = None) -> dict[str, list[float]]:
    """Each fn runs its side once and returns the seconds it took (`in_process` or a `SideProcess`). Every side
    runs `warmup` times, then `repeats` rounds in which each runs once; the order rotates each round so that no
    side always runs first (or always right after the other). `after_warmup` is called once between the phases
    (e.g. to reset counters). Returns seconds per timed run."""
    names = list(fns)
    for name in names:
        for _ in range(warmup):
            dt = fns[name]()
            if log:
                log(f"  warm-up {name}: {dt:.3f} s")
    if after_warmup is not None:
        after_warmup()
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            dt = fns[name]()
            times[name].append(dt)
            if log:
                log(f"  round {r + 1}/{repeats} {name}: {dt:.3f} s")
    return times


def _to_numpy(out: Any) -> Any:
    return out.detach().float().numpy() if hasattr(out, "detach") else out


def _side_worker(conn: Any, builder: str, kwargs: dict[str, Any], threads: int) -> None:
    """Body of a `SideProcess`: build the side, then run it on request and report seconds, output, peak RSS."""
    import importlib
    import resource
    import traceback

    try:
        set_threads(threads)
        module, name = builder.split(":")
        fn = getattr(importlib.import_module(module), name)(**kwargs)
        conn.send(("ok", None))
        last = None
        while True:
            cmd = conn.recv()
            if cmd == "run":
                dt, last = timed(fn)
                conn.send(("ok", dt))
            elif cmd == "output":
                conn.send(("ok", _to_numpy(last)))
            elif cmd == "maxrss":
                conn.send(("ok", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024))
            else:
                break
    except Exception:  # reported to the parent, which raises it
        conn.send(("error", traceback.format_exc()))


class SideProcess:
    """One benchmark side in its own process (spawned), so process-wide settings that a side makes, such as the
    fast backend's malloc tuning, cannot leak into the other side. `builder` is "module:function"; the function
    takes `kwargs` and returns a zero-argument callable (one run of the side). Calling the object runs the side
    once there and returns the seconds measured inside the worker (no pipe overhead)."""

    def __init__(self, builder: str, kwargs: dict[str, Any] | None = None, *, threads: int = 2) -> None:
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_side_worker, args=(child, builder, kwargs or {}, threads), daemon=True)
        self._proc.start()
        self._ask(None)

    def _ask(self, cmd: str | None) -> Any:
        if cmd is not None:
            self._conn.send(cmd)
        status, value = self._conn.recv()
        if status != "ok":
            raise RuntimeError(f"benchmark side failed:\n{value}")
        return value

    def __call__(self) -> float:
        return float(self._ask("run"))

    def output(self) -> Any:
        """The last run's output as a numpy array (float32 for tensors)."""
        return self._ask("output")

    def maxrss(self) -> int:
        """Peak resident memory of the worker so far, bytes."""
        return int(self._ask("maxrss"))

    def close(self) -> None:
        if self._proc.is_alive():
            self._conn.send("stop")
            self._proc.join(timeout=30)


def summary(samples: list[float]) -> dict[str, float]:
    """Median, min, max and the spread of the samples (seconds)."""
    return {"median": statistics.median(samples), "min": min(samples), "max": max(samples), "n": len(samples),
            "samples": [round(s, 4) for s in samples]}


def _cpu_facts() -> dict[str, Any]:
    facts: dict[str, Any] = {"model": platform.processor() or "unknown", "flags_of_interest": []}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return facts
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name":
            facts["model"] = value.strip()
        elif key.strip() == "flags":
            flags = set(value.split())
            wanted = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile", "amx_int8")
            facts["flags_of_interest"] = [f for f in wanted if f in flags]
            break
    return facts


def _blas_facts() -> dict[str, Any]:
    facts: dict[str, Any] = {k: os.environ.get(k) for k in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE",
                                                            "OMP_NUM_THREADS")}
    try:
        import numpy  # noqa: F401  (loads numpy's OpenBLAS so threadpoolctl can see it)
        import threadpoolctl

        facts["threadpools"] = [{k: i.get(k) for k in ("internal_api", "architecture", "num_threads", "version")}
                                for i in threadpoolctl.threadpool_info()]
    except ImportError:
        facts["threadpools"] = "threadpoolctl not installed"
    return facts


def machine_info() -> dict[str, Any]:
    """What the numbers ran on: CPU model and flags, cores, memory, load, library versions, BLAS settings."""
    import torch

    info: dict[str, Any] = {"cpu": _cpu_facts(), "logical_cpus": os.cpu_count(),
                            "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
                            "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
                            "platform": platform.platform(), "blas": _blas_facts()}
    try:
        info["mem_total_gib"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
        info["loadavg"] = list(os.getloadavg())
    except (ValueError, OSError, AttributeError):
        pass
    versions = {"torch": torch.__version__}
    for name in ("monai", "onnxruntime", "openvino", "numpy", "scipy", "gmim_hub"):
        try:
            versions[name] = __import__(name).__version__
        except (ImportError, AttributeError):
            versions[name] = None
    info["versions"] = versions
    info["torch_cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    info["openvino_cpu_capabilities"] = _openvino_capabilities()
    try:  # what `gmim predict --backend auto` runs on this machine
        from gmim_hub.inference.backends import choose_backend

        info["gmim_auto_backend"] = list(choose_backend("auto", "auto", "cpu"))
    except ImportError as e:  # pragma: no cover - a broken install
        info["gmim_auto_backend"] = f"unavailable: {e}"
    return info


def _openvino_capabilities() -> list[str] | None:
    """The OpenVINO CPU plugin's OPTIMIZATION_CAPABILITIES (e.g. BF16 where the CPU has native bf16), or None."""
    try:
        import openvino as ov
    except ImportError:
        return None
    return list(ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))


def write_result(bench_id: str, payload: dict[str, Any], *, enabled: bool = True) -> Path | None:
    """Write benchmarks/results/<bench_id>.json: the payload plus machine facts and a UTC timestamp."""
    if not enabled:
        return None
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    doc = {"id": bench_id, "utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
           "machine": machine_info(), **payload}
    path = RESULTS_DIR / f"{bench_id}.json"
    path.write_text(json.dumps(doc, indent=2) + "\n")
    return path


def final_line(bench_id: str, ratio: float | None, agreement: float | None = None, **extra: Any) -> str:
    """The last line every script prints, e.g. `P1 ratio=3.40 agreement=0.9960 gmim_s=2.01 baseline_s=6.83`
    (no ratio for absolute measures such as P6)."""
    parts = [bench_id] + ([f"ratio={ratio:.2f}"] if ratio is not None else [])
    if agreement is not None:
        parts.append(f"agreement={agreement:.4f}")
    for key, value in extra.items():
        parts.append(f"{key}={value:.4g}" if isinstance(value, float) else f"{key}={value}")
    return " ".join(parts)
