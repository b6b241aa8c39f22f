"""Run every benchmark (each in its own process, one after the other) and print a markdown table of the results in
benchmarks/results/ for the README, with the machine they ran on.

    python benchmarks/run_all.py [--quick] [--only P1,P3] [--table-only]

`--table-only` just renders the table from the JSON files already in benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from benchmarks.common import RESULTS_DIR  # noqa: E402

BENCHES = {  # id -> (script, result file, measure, target)
    "P1": ("bench_p1_window.py", "p1_window", "one 96³ window, fs48", ">= 3.0x, agreement >= 99%"),
    "P2": ("bench_p2_volume.py", "p2_volume", "whole-volume predict, MNI152 1 mm", ">= 3.0x, agreement >= 99.5%"),
    "P3": ("bench_p3_pretrain.py", "p3_pretrain", "pre-training steps/s", ">= 3.0x, masking <= 5%"),
    "P4": ("bench_p4_triton_latency.py", "p4_triton_latency", "one window via Triton vs the fastest in-process backend",
           "latency <= 1.15x"),
    "P5": ("bench_p5_bytes.py", "p5_bytes", "bytes on the wire, server vs client stitching", ">= 20x fewer"),
    "P6": ("bench_p6_memory.py", "p6_memory", "peak RSS of gmim predict, 256³", "<= 4 GB"),
    "P7": ("bench_p7_demo.py", "p7_demo", "the demo's training, malloc defaults vs gmim's CPU setting",
           ">= 2x, same Dice"),
}


def run(bench_id: str, quick: bool) -> tuple[int, str, float]:
    script = HERE / BENCHES[bench_id][0]
    if not script.exists():
        return 127, f"{script.name} missing", 0.0
    cmd = [sys.executable, str(script)] + (["--quick"] if quick else [])
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=HERE.parent)
    lines = (proc.stdout or "").strip().splitlines()
    last = lines[-1] if lines else (proc.stderr or "").strip().splitlines()[-1:] or ["(no output)"]
    return proc.returncode, last if isinstance(last, str) else last[0], time.perf_counter() - t0


def _result_cell(bench_id: str, doc: dict) -> str:
    if bench_id == "P6":
        ok = [r for r in doc.get("runs", []) if r.get("ok")]
        return ", ".join(f"{r['backend']}: {r['peak_rss_gb']:.2f} GB" for r in ok) or "failed"
    if bench_id == "P3":
        sides = doc.get("sides", {})
        frac = sides.get("gmim", {}).get("masking_fraction")
        return f"{doc['ratio']:.2f}x" + (f", masking {frac:.1%} of a step" if frac is not None else "")
    cell = f"{doc['ratio']:.2f}x" if doc.get("ratio") is not None else "n/a"
    if doc.get("agreement") is not None:
        cell += f", agreement {doc['agreement']:.2%}"
    return cell


def table() -> str:
    """Markdown table of the latest results, plus the machine line of the first result found."""
    rows = ["| id | measure | result | target | details |", "|---|---|---|---|---|"]
    machine = None
    for bench_id, (_, stem, measure, target) in BENCHES.items():
        path = RESULTS_DIR / f"{stem}.json"
        if not path.exists():
            rows.append(f"| {bench_id} | {measure} | not run | {target} | |")
            continue
        doc = json.loads(path.read_text())
        machine = machine or doc.get("machine")
        detail = doc.get("measure", "") + (" (quick)" if doc.get("quick") else "") + f", {doc.get('utc', '')}"
        rows.append(f"| {bench_id} | {measure} | {_result_cell(bench_id, doc)} | {target} | {detail} |")
    if machine:
        cpu = machine.get("cpu", {})
        v = machine.get("versions", {})
        rows.append("")
        rows.append(f"Machine: {cpu.get('model')} ({', '.join(cpu.get('flags_of_interest', []))}), "
                    f"{machine.get('usable_cpus')} usable CPUs, {machine.get('torch_threads')} torch threads, "
                    f"{machine.get('mem_total_gib')} GiB; torch {v.get('torch')}, monai {v.get('monai')}, "
                    f"onnxruntime {v.get('onnxruntime')}.")
    return "\n".join(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--only", default="", help="comma-separated ids, e.g. P1,P3")
    p.add_argument("--table-only", action="store_true")
    args = p.parse_args()
    if not args.table_only:
        ids = [i.strip().upper() for i in args.only.split(",") if i.strip()] or list(BENCHES)
        for bench_id in ids:
            code, last, secs = run(bench_id, args.quick)
            print(f"{bench_id}: exit {code} in {secs:.0f} s: {last}", flush=True)
    print(table())


if __name__ == "__main__":
    main()
