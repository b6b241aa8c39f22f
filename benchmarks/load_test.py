"""Triton under load: N requests at concurrency C against a local Triton server, window and volume models, HTTP and
gRPC mixed, every answer checked against an in-process run.

    python benchmarks/load_test.py                      # 500 requests, concurrency 8 (a few minutes on 2 cores)
    python benchmarks/load_test.py --requests 40 --no-write

What it does: exports a seeded tiny segmenter (64^3 windows, max batch 4) to ONNX, writes a Triton repository
(`tiny_cpu` window model, `tiny_volume` server-side sliding window), starts a real tritonserver (nvidia-pytriton
binary, loopback only), then sends the requests through `gmim_hub.serving.TritonClient` from `concurrency` threads.
Request k goes to the volume model when k % volume_every == volume_every - 1 (else the window model), over HTTP or
gRPC by the parity of k + k // volume_every, so every (model, protocol) pair gets its share. Inputs come from a small
pool of seeded arrays whose expected outputs are computed in-process first: window logits with onnxruntime on the
same ONNX file, volume labels with the same numpy stitching the server runs (`gmim_hub.serving.backend.sliding`)
over local onnxruntime.

A window answer counts as a mismatch if it differs from the local logits by more than `atol` (the server batches
requests together, which may change float rounding in the last bits; the max difference is reported); a volume answer
if any label differs. The run is bounded in count and time (`--max-seconds`: requests not started by then are
skipped and reported). Prints a summary and ends with one line
`load requests=... errors=... mismatches=... rps=... p50_ms=... p99_ms=...`; writes benchmarks/results/load.json.
Timings describe this machine at this moment; they are reported, never asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # `python benchmarks/load_test.py` imports gmim_hub from this checkout
    sys.path.insert(0, str(REPO_ROOT))

RESULTS = REPO_ROOT / "benchmarks" / "results" / "load.json"
WINDOW_MODEL, VOLUME_MODEL = "tiny_cpu", "tiny_volume"


@dataclass(frozen=True)
class LoadSpec:
    """What to send. Volumes of (72, 64, 48) voxels take 2 windows each (overlap and zero padding both exercised)."""

    requests: int = 500
    concurrency: int = 8
    volume_every: int = 4  # every 4th request is a whole volume
    volume_shape: tuple[int, int, int] = (72, 64, 48)
    window_pool: int = 8  # distinct window inputs (cycled)
    volume_pool: int = 4  # distinct volumes (cycled)
    overlap: float = 0.5
    max_seconds: float = 1200.0
    atol: float = 1e-5
    timeout: float = 300.0  # per request: a loaded 2-core machine queues requests for a long time
    seed: int = 0


@dataclass
class Inputs:
    windows: list[np.ndarray]  # (1, C, *roi) float32
    volumes: list[np.ndarray]  # (C, X, Y, Z) float32
    window_logits: list[np.ndarray] = field(default_factory=list)
    volume_labels: list[np.ndarray] = field(default_factory=list)


def make_inputs(spec: LoadSpec, run: Callable[[np.ndarray], np.ndarray], roi: Sequence[int], channels: int,
                batch_size: int) -> Inputs:
    """Seeded input pools and their expected outputs from `run` (local onnxruntime: (n, C, *roi) -> logits)."""
    from gmim_hub.serving.backend.sliding import labels_from_logits, sliding_window_logits

    rng = np.random.default_rng(spec.seed)
    windows = [rng.standard_normal((1, 1, *roi)).astype(np.float32) for _ in range(spec.window_pool)]
    volumes = [rng.standard_normal((1, *spec.volume_shape)).astype(np.float32) for _ in range(spec.volume_pool)]
    inputs = Inputs(windows, volumes)
    inputs.window_logits = [run(w) for w in windows]
    inputs.volume_labels = [labels_from_logits(sliding_window_logits(v, roi, run, channels=channels,
                                                                     overlap=spec.overlap, batch_size=batch_size),
                                               multi_label=False) for v in volumes]
    return inputs


@dataclass
class LoadResult:
    requests: int = 0  # answered or failed (skipped ones excluded)
    errors: int = 0
    mismatches: int = 0
    skipped: int = 0  # not started before max_seconds
    wall_s: float = 0.0
    rps: float = 0.0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    max_abs_diff_window: float = 0.0
    label_voxels_differing: int = 0
    by_kind: dict[str, dict[str, float]] = field(default_factory=dict)  # "window/http" -> {count, p50_ms, p99_ms}
    error_samples: list[str] = field(default_factory=list)

    def line(self) -> str:
        return (f"load requests={self.requests} errors={self.errors} mismatches={self.mismatches} "
                f"rps={self.rps:.2f} p50_ms={self.p50_ms:.0f} p99_ms={self.p99_ms:.0f}")


def _percentiles(ms: list[float]) -> tuple[float, float]:
    return (float(np.percentile(ms, 50)), float(np.percentile(ms, 99))) if ms else (0.0, 0.0)


def run_load(http_url: str, grpc_url: str, spec: LoadSpec, inputs: Inputs) -> LoadResult:
    """Send `spec.requests` requests from `spec.concurrency` threads; check each answer; collect latencies."""
    from gmim_hub.serving.client import TritonClient

    clients = {"http": TritonClient(http_url, protocol="http", timeout=spec.timeout, retries=0),
               "grpc": TritonClient(grpc_url, protocol="grpc", timeout=spec.timeout, retries=0)}
    lock = threading.Lock()
    res = LoadResult()
    latencies: dict[str, list[float]] = {}
    start = time.monotonic()
    deadline = start + spec.max_seconds

    def one(k: int) -> None:
        if time.monotonic() > deadline:
            with lock:
                res.skipped += 1
            return
        volume = k % spec.volume_every == spec.volume_every - 1
        protocol = "http" if (k + k // spec.volume_every) % 2 == 0 else "grpc"  # both protocols for both models
        kind = f"{'volume' if volume else 'window'}/{protocol}"
        pool = inputs.volumes if volume else inputs.windows
        i = (k // spec.volume_every if volume else k) % len(pool)
        t0 = time.perf_counter()
        try:
            if volume:
                out = clients[protocol].infer(VOLUME_MODEL, pool[i], "labels", parameters={"overlap": spec.overlap})
            else:
                out = clients[protocol].infer(WINDOW_MODEL, pool[i], "logits")
        except Exception as e:  # noqa: BLE001 - every failure is counted and sampled, none stops the run
            with lock:
                res.requests += 1
                res.errors += 1
                if len(res.error_samples) < 5:
                    res.error_samples.append(f"request {k} ({kind}): {type(e).__name__}: {e}")
            return
        ms = (time.perf_counter() - t0) * 1000.0
        with lock:
            res.requests += 1
            latencies.setdefault(kind, []).append(ms)
            if volume:
                expected = inputs.volume_labels[i]
                differing = int((out != expected).sum()) if out.shape == expected.shape else expected.size
                res.label_voxels_differing += differing
                res.mismatches += differing > 0
            else:
                expected = inputs.window_logits[i]
                diff = float(np.abs(out - expected).max()) if out.shape == expected.shape else float("inf")
                res.max_abs_diff_window = max(res.max_abs_diff_window, diff)
                res.mismatches += diff > spec.atol

    try:
        with ThreadPoolExecutor(spec.concurrency, thread_name_prefix="load") as pool:
            list(pool.map(one, range(spec.requests)))
    finally:
        for client in clients.values():
            client.close()
    res.wall_s = time.monotonic() - start
    answered = [ms for values in latencies.values() for ms in values]
    res.rps = len(answered) / res.wall_s if res.wall_s > 0 else 0.0
    res.p50_ms, res.p99_ms = _percentiles(answered)
    for kind, values in sorted(latencies.items()):
        p50, p99 = _percentiles(values)
        res.by_kind[kind] = {"count": len(values), "p50_ms": round(p50, 1), "p99_ms": round(p99, 1)}
    return res


def _export_and_serve(workdir: Path, max_batch: int) -> tuple[Any, Any, Any]:
    """A seeded tiny export, its Triton repository, and a started server: (server, onnx window model, manifest)."""
    import torch

    from gmim_hub import PRESETS
    from gmim_hub.export.onnx import OnnxWindowModel, export_onnx
    from gmim_hub.models.segmentation import SegmentationNetwork
    from gmim_hub.serving.repository import write_triton_repository
    from gmim_hub.serving.server import TritonServer, free_port

    torch.manual_seed(0)
    export = export_onnx(SegmentationNetwork(PRESETS["tiny"]).eval(), workdir / "export", name="tiny", max_batch=max_batch)
    write_triton_repository(export.onnx_path.parent, workdir / "repo")
    server = TritonServer(workdir / "repo", models=[WINDOW_MODEL, VOLUME_MODEL], http_port=free_port(),
                          grpc_port=free_port(), metrics_port=free_port(), log_path=workdir / "tritonserver.log")
    ort = OnnxWindowModel.from_export(export.onnx_path.parent, providers=["CPUExecutionProvider"])
    return server, ort, export.manifest


def _shape(text: str) -> tuple[int, int, int]:
    parts = [int(p) for p in text.replace("x", ",").split(",") if p.strip()]
    if len(parts) != 3 or min(parts) < 1:
        raise argparse.ArgumentTypeError(f"expected three sizes such as 72,64,48, got {text!r}")
    return parts[0], parts[1], parts[2]


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    d = LoadSpec()
    p.add_argument("--requests", type=int, default=d.requests)
    p.add_argument("--concurrency", type=int, default=d.concurrency)
    p.add_argument("--volume-every", type=int, default=d.volume_every, help="every k-th request is a volume")
    p.add_argument("--volume-shape", type=_shape, default=d.volume_shape, help="e.g. 72,64,48 or 70,70,70")
    p.add_argument("--max-seconds", type=float, default=d.max_seconds, help="stop starting requests after this")
    p.add_argument("--max-batch", type=int, default=4, help="export max batch (the server's max_batch_size)")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--no-write", action="store_true")
    a = p.parse_args(argv)
    if a.requests < 1 or a.concurrency < 1 or a.volume_every < 1:
        p.error("--requests, --concurrency and --volume-every must be >= 1")
    spec = LoadSpec(requests=a.requests, concurrency=a.concurrency, volume_every=a.volume_every,
                    volume_shape=a.volume_shape, max_seconds=a.max_seconds)
    with tempfile.TemporaryDirectory(prefix="gmim-load-") as tmp:
        t0 = time.monotonic()
        server, ort, manifest = _export_and_serve(Path(tmp), a.max_batch)
        inputs = make_inputs(spec, ort, manifest["window_size"], manifest["out_channels"], a.max_batch)
        print(f"export and expected outputs: {time.monotonic() - t0:.0f} s", flush=True)
        with server:
            print(f"tritonserver ready in {server.startup_s:.1f} s on 127.0.0.1 (http {server.http_port}, "
                  f"grpc {server.grpc_port}); sending {spec.requests} requests at concurrency {spec.concurrency}",
                  flush=True)
            result = run_load(server.http_url, server.grpc_url, spec, inputs)
            still_serving = server.ready()
    for kind, stats in result.by_kind.items():
        print(f"  {kind:12s} n={stats['count']:4.0f} p50 {stats['p50_ms']:8.0f} ms  p99 {stats['p99_ms']:8.0f} ms")
    print(f"wall {result.wall_s:.1f} s, skipped {result.skipped}, max |window diff| {result.max_abs_diff_window:.2e}, "
          f"label voxels differing {result.label_voxels_differing}, server ready afterwards: {still_serving}")
    for sample in result.error_samples:
        print(f"  error: {sample}")
    if not a.no_write:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        record = {"spec": {**asdict(spec), "volume_shape": list(spec.volume_shape)}, "result": asdict(result),
                  "server_ready_after": still_serving, "machine": {"python": platform.python_version(),
                                                                   "platform": platform.platform(),
                                                                   "cpus": os.cpu_count(),
                                                                   "loadavg_after": os.getloadavg()}}
        tmp_out = a.out.with_name(a.out.name + ".tmp")
        tmp_out.write_text(json.dumps(record, indent=2) + "\n")
        tmp_out.replace(a.out)
    print(result.line())
    ok = result.errors == 0 and result.mismatches == 0 and result.skipped == 0 and still_serving
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
