"""P6: peak resident memory of `gmim predict` on a 256^3 volume (absolute target: <= 4 GB).

Writes a feature_size-48 segmentation model (`save_pretrained`, seeded random weights, ROI 96 unless --roi) and a
256^3 NIfTI (the MNI152 1 mm T1 padded/cropped to 256^3, so the brain sits in a realistic amount of background),
then runs the real CLI in a subprocess under `/usr/bin/time -v` (or, without it, `resource.getrusage` of the
children) for each requested backend, and reports the peak RSS. The run time per backend is reported too.

    python benchmarks/bench_p6_memory.py [--quick] [--backends default,torch] [--roi 96] [--feature-size 48]
"""

from __future__ import annotations

import dataclasses
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere
from benchmarks.common import base_parser, final_line, write_result

LIMIT_BYTES = 4 * 10**9


def write_inputs(folder: Path, feature_size: int, roi: int, size: int) -> tuple[Path, Path]:
    """(model folder, volume path) under `folder`."""
    import nibabel as nib
    import torch
    from nilearn.datasets import load_mni152_template

    from gmim_hub.config import PRESETS, DataConfig
    from gmim_hub.models.hub_models import GMIMForSegmentation

    cfg = dataclasses.replace(PRESETS["base"], feature_size=feature_size, out_channels=4, roi_size=(roi,) * 3,
                              data=DataConfig(modality="MRI", intensity="zscore_nonzero"))
    torch.manual_seed(0)
    model_dir = folder / "model"
    GMIMForSegmentation(cfg).save_pretrained(model_dir)
    mni = load_mni152_template(resolution=1)
    src = np.asarray(mni.get_fdata(), dtype=np.float32)
    vol = np.zeros((size,) * 3, dtype=np.float32)
    sl_src = tuple(slice(max((s - size) // 2, 0), max((s - size) // 2, 0) + min(s, size)) for s in src.shape)
    sl_dst = tuple(slice(max((size - s) // 2, 0), max((size - s) // 2, 0) + min(s, size)) for s in src.shape)
    vol[sl_dst] = src[sl_src]
    path = folder / "volume256.nii.gz"
    nib.save(nib.Nifti1Image(vol, mni.affine), str(path))
    return model_dir, path


BACKENDS = {
    "default": [],  # what a user gets: --backend auto --precision auto (the fast backend, bf16 where native)
    "fast-fp32": ["--backend", "fast", "--precision", "fp32"],
    "torch": ["--backend", "torch", "--precision", "fp32"],
    "torch-bf16": ["--backend", "torch", "--precision", "bf16"],
}


def command(backend: str, model_dir: Path, volume: Path, out: Path, threads: int, overlap: float) -> list[str]:
    """`gmim predict VOLUME OUT --model MODEL ...` with the CLI's default sw_batch_size (4)."""
    if backend not in BACKENDS:
        raise SystemExit(f"unknown backend {backend!r}; use {', '.join(BACKENDS)}")
    gmim = shutil.which("gmim", path=str(Path(sys.executable).parent)) or shutil.which("gmim")
    return [gmim, "predict", str(volume), str(out), "--model", str(model_dir), "--threads", str(threads),
            "--device", "cpu", "--overwrite", "--overlap", str(overlap), *BACKENDS[backend]]


def measure(backend: str, model_dir: Path, volume: Path, out_dir: Path, threads: int, overlap: float) -> dict:
    """Run one prediction; peak RSS in bytes from /usr/bin/time -v, else from getrusage(RUSAGE_CHILDREN)."""
    cmd = command(backend, model_dir, volume, out_dir / f"seg_{backend}.nii.gz", threads, overlap)
    timer = shutil.which("time", path="/usr/bin")
    full = [timer, "-v", *cmd] if timer else cmd
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t0 = time.perf_counter()
    proc = subprocess.run(full, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        return {"backend": backend, "ok": False, "error": (proc.stderr or proc.stdout)[-800:], "wall_s": wall}
    match = re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)
    if match:
        peak, how = int(match.group(1)) * 1024, "/usr/bin/time -v"
    else:  # ru_maxrss of children is the max over all children so far; only exact when it grew
        peak, how = max(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, before) * 1024, "getrusage"
    return {"backend": backend, "ok": True, "peak_rss_bytes": peak, "peak_rss_gb": peak / 1e9, "wall_s": wall,
            "how": how, "command": " ".join(cmd), "cli_summary": proc.stdout.strip().splitlines()[-1:]}


def main() -> None:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--backends", default="default,torch",
                   help=f"comma-separated, each a `gmim predict` run: {', '.join(BACKENDS)}")
    p.add_argument("--overlap", type=float, default=0.5, help="memory does not depend on it; 0 runs 27 windows")
    p.add_argument("--feature-size", type=int, default=48)
    p.add_argument("--roi", type=int, default=96)
    p.add_argument("--size", type=int, default=256, help="volume edge (the target is stated for 256)")
    args = p.parse_args()
    backends = [b for b in args.backends.split(",") if b]
    if args.quick:
        backends = backends[:1]
    rows = []
    with tempfile.TemporaryDirectory(prefix="gmim-p6-") as tmp:
        model_dir, volume = write_inputs(Path(tmp), args.feature_size, args.roi, args.size)
        for backend in backends:
            row = measure(backend, model_dir, volume, Path(tmp), args.threads, args.overlap)
            rows.append(row)
            print(f"{backend:11s} " + (f"peak RSS {row['peak_rss_gb']:.2f} GB in {row['wall_s']:.0f} s"
                                       if row["ok"] else f"FAILED: {row['error']}"))
    best = next((r for r in rows if r["ok"]), None)
    write_result("p6_memory", {
        "measure": f"peak RSS of gmim predict, {args.size}^3 volume, fs{args.feature_size}, roi {args.roi}, "
                   f"overlap {args.overlap}",
        "quick": args.quick, "runs": rows, "limit_bytes": LIMIT_BYTES,
        "target": {"peak_rss_gb": LIMIT_BYTES / 1e9}}, enabled=not args.no_write)
    if best is None:
        print(final_line("P6", None, None, peak_rss_gb="nan", backend="none"))
        return
    print(final_line("P6", None, None, peak_rss_gb=best["peak_rss_gb"], limit_gb=LIMIT_BYTES / 1e9,
                     within_limit=best["peak_rss_bytes"] <= LIMIT_BYTES, backend=best["backend"]))


if __name__ == "__main__":
    main()
