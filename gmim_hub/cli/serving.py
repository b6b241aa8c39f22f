"""`gmim serve` and `gmim infer`: a local Triton server and its client."""

from __future__ import annotations

import signal
import time
from pathlib import Path
from types import FrameType
from typing import Annotated

import typer
from rich.progress import Progress

from gmim_hub.cli import options as opt
from gmim_hub.cli._common import console, key_value_table, print_warning
from gmim_hub.errors import ServingError


def register(app: typer.Typer) -> None:
    app.command("serve")(serve)
    app.command("infer")(infer)


def serve(
    repo: Annotated[Path, typer.Argument(help="Triton model repository.")] = Path("triton_models"),
    http_port: Annotated[int, typer.Option(help="HTTP/REST port.")] = 8000,
    grpc_port: Annotated[int, typer.Option(help="gRPC port.")] = 8001,
    metrics_port: Annotated[int, typer.Option(help="Prometheus metrics port.")] = 8002,
    host: Annotated[str, typer.Option(help="Address to bind (loopback by default).")] = "127.0.0.1",
    models: Annotated[str | None, typer.Option(help="Comma-separated models (default: every python model).")] = None,
    log_file: Annotated[Path | None, typer.Option(help="Server log (default: a temporary file).")] = None,
    log_verbose: Annotated[int, typer.Option(help="Triton's --log-verbose level.")] = 0,
    setup_env: Annotated[bool, typer.Option("--setup-env", help="Only create (or repair) and check the server's own "
                                            "Python environment (numpy<2, openvino, onnxruntime, tritonserver), then exit.")]
    = False,
    serving_env: Annotated[Path | None, typer.Option(help="The server's Python environment (default: "
                                                     "$GMIM_SERVING_ENV, else one gmim creates under ~/.cache).")]
    = None,
) -> None:
    """Serve a model repository with a local Triton server (CPU, python backend) until Ctrl-C or SIGTERM.

    The server runs in its own Python environment, created on first use under ~/.cache/gmim-hub/serving-env
    (or the folder $GMIM_SERVING_ENV names)."""
    if setup_env:
        _setup_env(serving_env)
        return
    _serve(repo, http_port, grpc_port, metrics_port, host, models, log_file, log_verbose, serving_env)


def _setup_env(serving_env: Path | None) -> None:
    from gmim_hub.serving.env import ensure_serving_env

    senv = ensure_serving_env(serving_env, repair=True, progress=console.print)
    console.print(key_value_table("Triton server environment ready", [
        ("path", str(senv.path)), ("python", senv.python_version),
        *((name, version) for name, version in senv.versions.items()),
    ]))


def _serve(repo: Path, http_port: int, grpc_port: int, metrics_port: int, host: str, models: str | None,
           log_file: Path | None, log_verbose: int, serving_env: Path | None) -> None:
    from gmim_hub.serving.server import TritonServer

    server = TritonServer(repo, models=[m.strip() for m in models.split(",") if m.strip()] if models else None,
                          http_port=http_port, grpc_port=grpc_port, metrics_port=metrics_port, host=host,
                          log_verbose=log_verbose, log_path=log_file, serving_env=serving_env, progress=console.print)

    def on_sigterm(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        with console.status(f"starting Triton for {repo}..."):
            server.start()
        console.print(key_value_table(f"Triton ready in {server.startup_s:.1f} s", [
            ("HTTP", f"http://{server.http_url}"), ("gRPC", server.grpc_url), ("metrics", server.metrics_url),
            ("models", ", ".join(server.models)), ("log", str(server.log_path)),
        ]))
        console.print("Ctrl-C to stop")
        while server.running():
            time.sleep(0.5)
        raise ServingError(f"tritonserver exited unexpectedly: {server.error_lines()} (log: {server.log_path})")
    except KeyboardInterrupt:
        console.print("stopping Triton (finishing in-flight requests)...")
    finally:
        server.stop()
        signal.signal(signal.SIGTERM, previous)
    console.print("stopped")


def infer(
    input: Annotated[Path, typer.Argument(help="Volume file (NIfTI, NRRD, MetaImage), DICOM series folder, or a "
                                               "folder of these.")],
    output: Annotated[Path, typer.Argument(help="Output .nii.gz/.nrrd/.mha/.dcm (DICOM SEG) file (or folder for a "
                                                "folder input).")],
    model: Annotated[str, typer.Option(help="Export name or served model name.")],
    url: Annotated[str | None, typer.Option(help="Server host:port (default 127.0.0.1:8000 http, :8001 grpc).")]
    = None,
    protocol: Annotated[str, typer.Option(help="http or grpc.")] = "http",
    mode: Annotated[str, typer.Option(help="volume (server stitches, labels back) or window (client stitches).")]
    = "volume",
    concurrency: Annotated[int, typer.Option(help="Requests in flight in window mode.")] = 4,
    batch_size: Annotated[int | None, typer.Option(help="Windows per request (default: max batch / 2).")] = None,
    timeout: Annotated[float, typer.Option(help="Seconds per request.")] = 60.0,
    retries: Annotated[int, typer.Option(help="Retries of a failed connection, with backoff.")] = 3,
    overlap: Annotated[float, typer.Option(help="Sliding-window overlap in [0, 1).")] = 0.5,
    manifest: Annotated[Path | None, typer.Option(help="Local manifest.json to check the served model against.")]
    = None,
    overwrite: opt.Overwrite = False,
    max_memory_gb: opt.MaxMemoryGb = None,
    strict_input: opt.StrictInput = False,
    series: opt.Series = None,
    out_format: opt.OutFormat = None,
) -> None:
    """Segment volumes on a Triton server; outputs keep the input's shape and affine."""
    from gmim_hub.serving.infer import infer_files

    if protocol not in ("http", "grpc"):
        raise ServingError(f"--protocol must be http or grpc, got {protocol!r}")
    url = url or ("127.0.0.1:8000" if protocol == "http" else "127.0.0.1:8001")
    with Progress(console=console, transient=True) as bar:
        task = bar.add_task(f"{mode} inference on {url}", total=None)
        report = infer_files(
            input, output, model=model, url=url, protocol=protocol, mode=mode,  # type: ignore[arg-type]
            concurrency=concurrency,
            timeout=timeout, retries=retries, overlap=overlap, batch_size=batch_size, manifest=manifest,
            overwrite=overwrite, progress=lambda done, total: bar.update(task, completed=done, total=total),
            max_memory_gb=max_memory_gb, strict_input=strict_input,
            on_warning=print_warning,
            out_format=out_format, series=series,
        )
    console.print(key_value_table(f"gmim infer via {report.model} ({report.mode} mode)", [
        ("outputs", ", ".join(map(str, report.outputs))), ("requests", str(report.requests)),
        ("sent", f"{report.bytes_sent / 1e6:.1f} MB"), ("received", f"{report.bytes_received / 1e6:.1f} MB"),
        ("time", f"{report.seconds:.1f} s"),
    ]))
