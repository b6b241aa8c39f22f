"""P1: one (1, 1, 96, 96, 96) window through a feature_size-48 Swin UNETR, gmim's fastest CPU backend against
MONAI's `SwinUNETR` in eager fp32, same weights, same threads, same run, alternating.

gmim side (the headline ratio): what `gmim predict --backend auto` runs on this CPU, i.e. `gmim-openvino` when the
openvino package is installed, else `gmim` = `gmim_hub.inference.fast.FastCPUBackend(model, precision="bf16")` (whole network in bf16,
SDPA window attention, cached masks and bias, malloc tuning); the fast backend is always timed. Baseline: `monai.networks.nets.SwinUNETR` under
`torch.inference_mode()` in fp32. Each side runs in its own spawned worker process (the fast backend changes a
process-wide malloc setting that must not speed up the baseline); the parent alternates them and each worker times
its own forward pass. Agreement = share of voxels whose argmax label equals the baseline's. The input is a 96^3
crop of the MNI152 1 mm T1 (z-scored), or seeded noise without nilearn; the weights are a seeded random
initialisation, the same in every worker (no trained feature_size-48 weights ship with any installable package).

`--levers` also times other ways of running the same weights (see SIDES), `--onnx` adds onnxruntime fp32, and
`--profile` prints where the fast path spends its time.

`--openvino` adds the OpenVINO peers (bf16 and f32, compiled straight from a plain ONNX export, as a user of
OpenVINO would run it) and gmim's own `OpenVINOBackend` (what `gmim predict --backend auto` runs when openvino is installed).

    python benchmarks/bench_p1_window.py [--quick] [--levers] [--onnx] [--openvino] [--profile]
"""

from __future__ import annotations

import dataclasses
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere
from benchmarks.common import SideProcess, alternate, base_parser, final_line, set_threads, summary, write_result

SIDES = {
    "baseline": "MONAI SwinUNETR eager fp32 (torch.inference_mode)",
    "gmim": "FastCPUBackend(precision='bf16'): bf16 weights+activations, SDPA, cached masks, malloc tuning",
    "gmim-no-malloc-tuning": "FastCPUBackend(precision='bf16', malloc_tuning=False)",
    "fast-fp32": "FastCPUBackend(precision='fp32'): SDPA + cached masks + malloc tuning, fp32 numbers",
    "bf16-cast": "MONAI SwinUNETR with weights and input cast to bf16 (no other change)",
    "bf16-autocast": "MONAI SwinUNETR fp32 under torch.autocast('cpu', bfloat16)",
    "ort-fp32": "onnxruntime fp32 (opset 17 export), 2 intra-op threads, spinning, ENABLE_ALL",
    "openvino-bf16": "peer: OpenVINO CPU plugin on a plain opset-17 torch.onnx export, INFERENCE_PRECISION_HINT=bf16, "
                     "PERFORMANCE_HINT=LATENCY, INFERENCE_NUM_THREADS=threads",
    "openvino-fp32": "peer: the same with INFERENCE_PRECISION_HINT=f32",
    "gmim-openvino": "gmim's OpenVINOBackend (gmim export onnx, compiled by OpenVINO, bf16 where the CPU plugin lists "
                     "BF16, static batch 1, compiled-model cache)",
}
PEERS = ["openvino-bf16", "openvino-fp32", "gmim-openvino"]
LEVERS = ["gmim-no-malloc-tuning", "fast-fp32", "bf16-cast", "bf16-autocast"]


def window_config(feature_size: int = 48, out_channels: int = 4):
    from gmim_hub.config import PRESETS

    return dataclasses.replace(PRESETS["base"], feature_size=feature_size, out_channels=out_channels,
                               use_v2=False, roi_size=(96, 96, 96))


def mni_window(size: int = 96) -> torch.Tensor:
    """(1, 1, size, size, size): a central crop of the MNI152 1 mm template, z-scored over the brain."""
    try:
        from nilearn.datasets import load_mni152_template

        vol = torch.from_numpy(load_mni152_template(resolution=1).get_fdata()).float()
    except ImportError:
        return torch.randn(1, 1, size, size, size, generator=torch.Generator().manual_seed(0))
    starts = [(s - size) // 2 for s in vol.shape]
    crop = vol[starts[0]:starts[0] + size, starts[1]:starts[1] + size, starts[2]:starts[2] + size]
    brain = crop[crop > 0]
    return ((crop - brain.mean()) / brain.std()).clamp(-5, 5)[None, None].contiguous()


def build_side(kind: str, feature_size: int) -> Callable[[], torch.Tensor]:
    """Runs in a side's own process: seeded weights (identical in every process) and one way of running them."""
    from gmim_hub.inference.fast import FastCPUBackend
    from gmim_hub.models.segmentation import monai_swin_unetr

    if kind not in SIDES:
        raise ValueError(f"unknown side {kind!r}; choose from {sorted(SIDES)}")
    torch.manual_seed(0)
    model = monai_swin_unetr(window_config(feature_size)).eval()
    x = mni_window(96)
    if kind in ("gmim", "gmim-no-malloc-tuning", "fast-fp32"):
        fast = FastCPUBackend(model, precision="fp32" if kind == "fast-fp32" else "bf16",
                              malloc_tuning=kind != "gmim-no-malloc-tuning")
        return lambda: fast(x)
    if kind == "ort-fp32":
        return _ort_runner(model, x)
    if kind in ("openvino-bf16", "openvino-fp32"):
        return _openvino_runner(model, x, "bf16" if kind == "openvino-bf16" else "f32")
    if kind == "gmim-openvino":
        return _gmim_openvino_runner(model, x, feature_size)
    if kind == "bf16-cast":
        model, x = model.to(torch.bfloat16), x.to(torch.bfloat16)
    autocast = kind == "bf16-autocast"

    def run() -> torch.Tensor:
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            return model(x).float()
    return run


def _ort_runner(model, x: torch.Tensor) -> Callable[[], torch.Tensor]:
    """onnxruntime fp32 with the torch thread count as intra-op threads, spinning allowed, ENABLE_ALL."""
    import onnxruntime as ort

    path = _export_plain(model, x)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = torch.get_num_threads()
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1")
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    arr = x.numpy()
    return lambda: torch.from_numpy(sess.run(None, {"x": arr})[0])


def _export_plain(model, x: torch.Tensor) -> Path:
    """What a peer does: an opset-17 torch.onnx export of the MONAI model (static shapes), into a temporary folder."""
    path = Path(tempfile.mkdtemp(prefix="gmim-p1-")) / "window.onnx"
    torch.onnx.export(model, (x,), str(path), dynamo=False, opset_version=17, input_names=["x"],
                      output_names=["logits"])
    return path


def _openvino_runner(model, x: torch.Tensor, hint: str) -> Callable[[], torch.Tensor]:
    """The OpenVINO peer: `compile_model(onnx, "CPU", ...)` with the precision hint and the torch thread count."""
    import openvino as ov

    compiled = ov.Core().compile_model(str(_export_plain(model, x)), "CPU", {
        "INFERENCE_PRECISION_HINT": hint, "PERFORMANCE_HINT": "LATENCY",
        "INFERENCE_NUM_THREADS": str(torch.get_num_threads())})
    request, arr = compiled.create_infer_request(), x.numpy()

    def run() -> torch.Tensor:
        request.infer({0: arr})
        return torch.from_numpy(request.get_output_tensor(0).data.copy())
    return run


def _gmim_openvino_runner(model, x: torch.Tensor, feature_size: int) -> Callable[[], torch.Tensor]:
    """gmim's OpenVINO path: `export_onnx` + `OpenVINOBackend` with auto precision, its cache in a temporary folder
    (so the timed runs never depend on an earlier benchmark's cache). Same weights, in a `SegmentationNetwork`."""
    from gmim_hub.export.onnx import export_onnx
    from gmim_hub.inference.backends import choose_backend
    from gmim_hub.inference.openvino_backend import OpenVINOBackend
    from gmim_hub.models.segmentation import SegmentationNetwork

    segmenter = SegmentationNetwork(window_config(feature_size)).eval()
    segmenter.load_state_dict(model.state_dict(), strict=True)
    root = Path(tempfile.mkdtemp(prefix="gmim-p1-ov-"))
    export = export_onnx(segmenter, root, name="p1", max_batch=1)
    _, precision = choose_backend("openvino", "auto", "cpu")
    backend = OpenVINOBackend(export.onnx_path.parent, precision=precision, threads=torch.get_num_threads(),
                              cache_dir=root / "openvino")
    return lambda: backend(x)


def agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.argmax(1) == b.argmax(1)).float().mean().item()


def profile_fast(run: Callable[[], torch.Tensor], rows: int = 18) -> str:
    """Self-time table of one call (after one untimed call, so caches and the heap are warm)."""
    from torch.profiler import ProfilerActivity, profile

    run()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def table(times, outputs, rss) -> dict[str, dict]:
    """Per side: timing summary, speed-up and argmax agreement against the baseline, peak RSS; printed."""
    base = summary(times["baseline"])["median"]
    rows = {}
    for name, t in times.items():
        s = summary(t)
        rows[name] = {**s, "speedup_vs_baseline": base / s["median"], "peak_rss_gb": rss[name] / 1e9,
                      "agreement_vs_baseline": agreement(outputs[name], outputs["baseline"]),
                      "description": SIDES[name]}
        print(f"{name:22s} median {s['median']:.3f} s  x{rows[name]['speedup_vs_baseline']:.2f}  agreement "
              f"{rows[name]['agreement_vs_baseline']:.4f}  rss {rss[name] / 1e9:.2f} GB  samples {s['samples']}")
    return rows


def main() -> None:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--feature-size", type=int, default=48)
    p.add_argument("--levers", action="store_true", help="also time the other ways of running (see SIDES)")
    p.add_argument("--onnx", action="store_true", help="also export and time onnxruntime fp32")
    p.add_argument("--openvino", action="store_true", help="also time the OpenVINO peers and gmim's OpenVINO backend")
    p.add_argument("--profile", action="store_true", help="print a torch.profiler table of the gmim side")
    p.add_argument("--sides", default="", help="comma-separated extra sides instead of --levers/--onnx")
    args = p.parse_args()
    set_threads(args.threads)
    repeats = args.repeats or (3 if args.quick else 7)
    extra = [s for s in args.sides.split(",") if s] or (
        (LEVERS if args.levers else []) + (["ort-fp32"] if args.onnx else []) + (PEERS if args.openvino else []))
    default = default_side()
    names = list(dict.fromkeys(["baseline", "gmim", default, *extra]))
    sides = {n: SideProcess("benchmarks.bench_p1_window:build_side", {"kind": n, "feature_size": args.feature_size},
                            threads=args.threads) for n in names}
    try:
        times = alternate(dict(sides), repeats=repeats, warmup=args.warmup)
        outputs = {n: torch.from_numpy(s.output()) for n, s in sides.items()}
        rss = {n: s.maxrss() for n, s in sides.items()}
    finally:
        for side in sides.values():
            side.close()
    rows = table(times, outputs, rss)
    if args.profile:
        print(profile_fast(build_side("gmim", args.feature_size)))
    ratio, agree = rows[default]["speedup_vs_baseline"], rows[default]["agreement_vs_baseline"]
    peers = {n: rows[n]["median"] for n in rows if n in ("ort-fp32", "openvino-bf16", "openvino-fp32")}
    best_peer = min(peers, key=peers.get) if peers else None
    vs_peer = peers[best_peer] / rows[default]["median"] if best_peer else None
    write_result("p1_window", {
        "measure": f"one (1,1,96,96,96) window, Swin UNETR fs{args.feature_size} use_v2=False out_channels=4",
        "gmim_side": default, "gmim_backend": SIDES[default], "baseline": SIDES["baseline"], "quick": args.quick,
        "repeats": repeats, "threads_per_side": args.threads, "process_per_side": True, "ratio": ratio,
        "agreement": agree, "best_peer": best_peer, "ratio_vs_best_peer": vs_peer, "runners": rows,
        "target": {"ratio": 3.0, "agreement": 0.99, "ratio_vs_best_peer": 1.0}}, enabled=not args.no_write)
    extra_fields = {"vs_best_peer": vs_peer, "best_peer": best_peer} if best_peer else {}
    print(final_line("P1", ratio, agree, gmim_s=rows[default]["median"], baseline_s=rows["baseline"]["median"],
                     side=default, **extra_fields))


def default_side() -> str:
    """The side that runs what `gmim predict --backend auto` runs on this CPU."""
    from gmim_hub.inference.backends import choose_backend

    return "gmim-openvino" if choose_backend("auto", "auto", "cpu")[0] == "openvino" else "gmim"


if __name__ == "__main__":
    main()
