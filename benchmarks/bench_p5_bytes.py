"""P5: bytes on the wire to segment one whole volume through Triton: server-side stitching (`gmim infer --mode
volume`: the preprocessed volume in, uint8 labels out) against client-side stitching (`--mode window`: every 96^3
window out as float32, its float32 logits back). Target: window bytes / volume bytes >= 20.

Both modes go through the real client (`gmim_hub.serving.infer_files`) against a real local server (see
bench_p4_triton_latency.triton_stack), on the MNI152 1 mm T1 written as NIfTI; the bytes are the tensor payloads
the client counts (HTTP framing excluded, the same for both). The label maps of the two modes are compared too.

The ratio depends on the number of classes K (window mode returns K logit channels per window) and on the number
of windows: `--out-channels`, `--crop`. `--quick` crops the volume to 144^3 (8 windows instead of 48).

    python benchmarks/bench_p5_bytes.py [--quick] [--feature-size 12] [--out-channels 4] [--crop N]
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere
from benchmarks.bench_p2_volume import mni_volume
from benchmarks.bench_p4_triton_latency import triton_stack
from benchmarks.common import base_parser, final_line, set_threads, write_result


def run_mode(stack, volume: Path, out: Path, mode: str) -> dict:
    from gmim_hub.serving import infer_files

    t0 = time.perf_counter()
    report = infer_files(volume, out, model=stack.name, url=stack.server.http_url, mode=mode, overwrite=True,
                         timeout=600.0)
    return {"mode": mode, "requests": report.requests, "bytes_sent": report.bytes_sent,
            "bytes_received": report.bytes_received, "bytes_total": report.bytes_sent + report.bytes_received,
            "seconds": time.perf_counter() - t0}


def main() -> None:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--feature-size", type=int, default=12)
    p.add_argument("--out-channels", type=int, default=4)
    p.add_argument("--crop", type=int, default=None, help="central crop edge (default: whole volume; 144 quick)")
    args = p.parse_args()
    set_threads(args.threads)
    import nibabel as nib

    crop = args.crop or (144 if args.quick else None)
    vol, affine = mni_volume(crop)
    rows = {}
    with tempfile.TemporaryDirectory(prefix="gmim-p5-") as tmp, \
            triton_stack(args.feature_size, args.out_channels) as stack:
        volume = Path(tmp) / "mni.nii.gz"
        nib.save(nib.Nifti1Image(vol, affine), str(volume))
        for mode in ("volume", "window"):
            rows[mode] = run_mode(stack, volume, Path(tmp) / f"seg_{mode}.nii.gz", mode)
            print(f"{mode:7s} {rows[mode]['requests']:3d} requests, sent {rows[mode]['bytes_sent'] / 1e6:.1f} MB, "
                  f"received {rows[mode]['bytes_received'] / 1e6:.1f} MB, {rows[mode]['seconds']:.0f} s")
        labels = {m: np.asarray(nib.load(str(Path(tmp) / f"seg_{m}.nii.gz")).dataobj) for m in rows}
    ratio = rows["window"]["bytes_total"] / rows["volume"]["bytes_total"]
    agree = float((labels["window"] == labels["volume"]).mean())
    write_result("p5_bytes", {
        "measure": f"bytes for one volume {'x'.join(map(str, vol.shape))}, fs{args.feature_size}, "
                   f"K={args.out_channels}, roi 96, overlap 0.5", "quick": args.quick, "ratio": ratio,
        "ratio_meaning": "window-mode bytes / volume-mode bytes (higher is better)", "agreement": agree,
        "modes": rows, "target": {"ratio": 20.0}}, enabled=not args.no_write)
    print(final_line("P5", ratio, agree, window_mb=rows["window"]["bytes_total"] / 1e6,
                     volume_mb=rows["volume"]["bytes_total"] / 1e6, out_channels=args.out_channels))


if __name__ == "__main__":
    main()
