"""P4: latency of one (1, 1, 96, 96, 96) window through a local Triton server (HTTP, binary tensors) against the
FASTEST in-process backend on this machine. Target: Triton / fastest in-process <= 1.15.

Setup (all real): a seeded Swin UNETR (`--feature-size`, default 12) exported with `gmim_hub.export.export_onnx`,
a model repository from `gmim_hub.serving.write_triton_repository`, the nvidia-pytriton `tritonserver` started by
`gmim_hub.serving.serve` on free loopback ports, and `gmim_hub.serving.TritonClient` over HTTP. The server's
window model (`<name>_cpu`) runs OpenVINO at precision "auto" (bf16 where the CPU plugin lists BF16, else f32)
with `--threads` threads. In-process peers, same weights, same threads: gmim's `OpenVINOBackend` on the same
export and precision (what `_cpu` wraps; its output must be identical), `FastCPUBackend` bf16 (in its own process,
because it tunes malloc process-wide) where the CPU has native bf16, and onnxruntime fp32. All sides alternate
after warm-ups; the ratio divides Triton's median by the smallest in-process median. Agreement = share of voxels
with the same argmax as onnxruntime fp32.

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


def bench_config(feature_size: int, out_channels: int = 4):
    from gmim_hub.config import PRESETS, DataConfig

    return dataclasses.replace(PRESETS["base"], feature_size=feature_size, out_channels=out_channels, roi_size=ROI,
                               data=DataConfig(modality="MRI", intensity="zscore_nonzero"))


def seeded_model(feature_size: int, out_channels: int = 4):
    """The benchmark's weights: seed 0, identical in every process."""
    import torch

    from gmim_hub.models.segmentation import SegmentationNetwork

    torch.manual_seed(0)
    return SegmentationNetwork(bench_config(feature_size, out_channels)).eval()


def fast_side(feature_size: int):
    """Runs in its own process (`SideProcess`): `FastCPUBackend` bf16 on the seeded weights."""
    import torch

    from gmim_hub.inference.fast import FastCPUBackend

    fast = FastCPUBackend(seeded_model(feature_size), precision="bf16")
    x = torch.from_numpy(mni_window())
    return lambda: fast(x)


@contextlib.contextmanager
def triton_stack(feature_size: int, out_channels: int = 4, max_batch: int = 2, threads: int = 0
                 ) -> Iterator[TritonStack]:
    """Export a seeded model, write its Triton repository and serve its python-backend models; stopped on exit."""
    from gmim_hub.export.onnx import export_onnx
    from gmim_hub.serving import serve, write_triton_repository
    from gmim_hub.serving.server import free_port

    with tempfile.TemporaryDirectory(prefix="gmim-triton-bench-") as tmp:
        model = seeded_model(feature_size, out_channels)
        name = f"bench_fs{feature_size}"
        result = export_onnx(model, Path(tmp) / "export", name=name, max_batch=max_batch)
        repo = Path(tmp) / "repo"
        write_triton_repository(result.onnx_path.parent, repo, name=name, threads=threads)
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
    import openvino as ov
    import torch

    from benchmarks.common import SideProcess
    from gmim_hub.export.onnx import OnnxWindowModel
    from gmim_hub.inference.openvino_backend import OpenVINOBackend
    from gmim_hub.inference.openvino_runtime import bf16_supported, choose_precision
    from gmim_hub.serving import TritonClient

    precision = choose_precision(ov.Core(), "auto")  # the rule `_cpu` applies in the server
    x = mni_window()
    outputs: dict[str, np.ndarray] = {}
    fast = SideProcess("benchmarks.bench_p4_triton_latency:fast_side", {"feature_size": args.feature_size},
                       threads=args.threads) if bf16_supported(ov.Core()) else None
    try:
        with triton_stack(args.feature_size, threads=args.threads) as stack, \
                tempfile.TemporaryDirectory(prefix="gmim-ov-cache-") as cache:
            local_ov = OpenVINOBackend(stack.export_dir, precision=precision, threads=args.threads, cache_dir=cache)
            local_ort = OnnxWindowModel.from_export(stack.export_dir, providers=["CPUExecutionProvider"],
                                                    threads=args.threads)
            xt = torch.from_numpy(x)
            with TritonClient(stack.server.http_url, protocol="http") as client:  # type: ignore[attr-defined]
                sides = {
                    "triton": in_process(lambda: client.infer(f"{stack.name}_cpu", x, "logits"), outputs, "triton"),
                    f"openvino-{precision}": in_process(lambda: local_ov(xt).numpy(), outputs, "openvino"),
                    "onnxruntime-fp32": in_process(lambda: local_ort(x), outputs, "onnxruntime"),
                }
                if fast is not None:
                    sides["fast-bf16"] = fast
                times = alternate(sides, repeats=repeats, warmup=max(args.warmup, 2))
                startup = stack.server.startup_s  # type: ignore[attr-defined]
        if fast is not None:
            outputs["fast"] = fast.output()
    finally:
        if fast is not None:
            fast.close()
    stats = {n: summary(t) for n, t in times.items()}
    local = {n: s["median"] for n, s in stats.items() if n != "triton"}
    fastest = min(local, key=local.__getitem__)
    ratio = stats["triton"]["median"] / local[fastest]
    ref = outputs["onnxruntime"].argmax(1)
    agree = {k: float((v.argmax(1) == ref).mean()) for k, v in outputs.items() if k != "onnxruntime"}
    identical = bool(np.array_equal(outputs["triton"], outputs["openvino"]))
    for name, s in stats.items():
        print(f"{name:18s} median {s['median'] * 1000:.1f} ms  samples {s['samples']}")
    print(f"fastest in-process: {fastest}; triton == in-process openvino: {identical}; server startup {startup:.1f} s")
    write_result("p4_triton_latency", {
        "measure": f"one (1,1,96,96,96) window, fs{args.feature_size}, HTTP binary tensors to the `_cpu` model "
                   f"(OpenVINO {precision}) vs the fastest in-process backend",
        "quick": args.quick, "repeats": repeats, "threads": args.threads, "served_precision": precision,
        "ratio": ratio, "ratio_meaning": f"triton / fastest in-process ({fastest}); lower is better",
        "fastest_in_process": fastest, "ratios_vs_each": {n: stats["triton"]["median"] / m for n, m in local.items()},
        "triton_equals_in_process_openvino": identical, "agreement_vs_onnxruntime_fp32": agree,
        "server_startup_s": startup, "sides": stats, "target": {"ratio_max": 1.15}}, enabled=not args.no_write)
    print(final_line("P4", ratio, agree["triton"], triton_s=stats["triton"]["median"],
                     fastest=fastest, fastest_s=local[fastest], feature_size=args.feature_size))


if __name__ == "__main__":
    main()
