"""P4: latency of one (1, 1, 96, 96, 96) window through a local Triton server (HTTP, binary tensors) against the
same ONNX file in onnxruntime in this process. Target: Triton / in-process <= 1.15.

Setup (all real): a seeded Swin UNETR (`--feature-size`, default 12) exported with `gmim_hub.export.export_onnx`,
a model repository from `gmim_hub.serving.write_triton_repository`, the nvidia-pytriton `tritonserver` started by
`gmim_hub.serving.serve` on free loopback ports, and `gmim_hub.serving.TritonClient` over HTTP. The server's
window model (`<name>_cpu`) runs onnxruntime with intra_op_num_threads=0 (every core); the in-process session gets
the same number of threads (`--threads`, the machine's 2 cores). The two alternate, after warm-ups. Agreement =
share of voxels with the same argmax (the tensors should be identical).

    python benchmarks/bench_p4_triton_latency.py [--quick] [--feature-size 12]
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere
from benchmarks.common import alternate, base_parser, final_line, in_process, set_threads, summary, write_result

ROI = (96, 96, 96)


@dataclasses.dataclass
class TritonStack:
    export_dir: Path
    server: object
    name: str


@contextlib.contextmanager
def triton_stack(feature_size: int, out_channels: int = 4, max_batch: int = 2) -> Iterator[TritonStack]:
    """Export a seeded model, write its Triton repository and serve its python-backend models; stopped on exit."""
    import torch

    from gmim_hub.config import PRESETS, DataConfig
    from gmim_hub.export.onnx import export_onnx
    from gmim_hub.models.segmentation import SegmentationNetwork
    from gmim_hub.serving import serve, write_triton_repository
    from gmim_hub.serving.server import free_port

    cfg = dataclasses.replace(PRESETS["base"], feature_size=feature_size, out_channels=out_channels, roi_size=ROI,
                              data=DataConfig(modality="MRI", intensity="zscore_nonzero"))
    with tempfile.TemporaryDirectory(prefix="gmim-triton-bench-") as tmp:
        torch.manual_seed(0)
        model = SegmentationNetwork(cfg).eval()
        name = f"bench_fs{feature_size}"
        result = export_onnx(model, Path(tmp) / "export", name=name, max_batch=max_batch)
        repo = Path(tmp) / "repo"
        write_triton_repository(result.onnx_path.parent, repo, name=name)
        ports = {"http_port": free_port(), "grpc_port": free_port(), "metrics_port": free_port()}
        server = serve(repo, models=[f"{name}_cpu", f"{name}_volume"], **ports)
        try:
            yield TritonStack(result.onnx_path.parent, server, name)
        finally:
            server.stop()


def mni_window() -> np.ndarray:
    from benchmarks.bench_p1_window import mni_window as crop

    return crop(96).numpy()


def main() -> None:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--feature-size", type=int, default=12)
    args = p.parse_args()
    set_threads(args.threads)
    repeats = args.repeats or (5 if args.quick else 15)
    from gmim_hub.export.onnx import OnnxWindowModel
    from gmim_hub.serving import TritonClient

    x = mni_window()
    outputs: dict[str, np.ndarray] = {}
    with triton_stack(args.feature_size) as stack:
        local = OnnxWindowModel.from_export(stack.export_dir, providers=["CPUExecutionProvider"],
                                            threads=args.threads)
        with TritonClient(stack.server.http_url, protocol="http") as client:  # type: ignore[attr-defined]
            sides = {"triton": in_process(lambda: client.infer(f"{stack.name}_cpu", x, "logits"), outputs, "triton"),
                     "onnxruntime": in_process(lambda: local(x), outputs, "onnxruntime")}
            times = alternate(sides, repeats=repeats, warmup=max(args.warmup, 2))
            startup = stack.server.startup_s  # type: ignore[attr-defined]
    stats = {n: summary(t) for n, t in times.items()}
    ratio = stats["triton"]["median"] / stats["onnxruntime"]["median"]
    agree = float((outputs["triton"].argmax(1) == outputs["onnxruntime"].argmax(1)).mean())
    max_diff = float(np.abs(outputs["triton"] - outputs["onnxruntime"]).max())
    for name, s in stats.items():
        print(f"{name:12s} median {s['median'] * 1000:.1f} ms  samples {s['samples']}")
    print(f"max |triton - onnxruntime| = {max_diff:.3g}; server startup {startup:.1f} s")
    write_result("p4_triton_latency", {
        "measure": f"one (1,1,96,96,96) window, fs{args.feature_size}, HTTP binary tensors vs in-process ORT",
        "quick": args.quick, "repeats": repeats, "ratio": ratio, "ratio_meaning": "triton / in-process (lower is "
        "better)", "agreement": agree, "max_abs_diff": max_diff, "server_startup_s": startup, "sides": stats,
        "target": {"ratio_max": 1.15}}, enabled=not args.no_write)
    print(final_line("P4", ratio, agree, triton_s=stats["triton"]["median"],
                     onnxruntime_s=stats["onnxruntime"]["median"], feature_size=args.feature_size))


if __name__ == "__main__":
    main()
