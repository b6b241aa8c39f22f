"""Start and stop a real Triton Inference Server on a CPU host, from the `tritonserver` binary that the
`nvidia-pytriton` wheel ships (version 2.51, python backend only), run from the server's own environment
(`gmim_hub.serving.env`: numpy < 2, openvino, onnxruntime), created on first use.

Three facts of the platform make it work: the backend directory must hold the python backend and a *symlink* to
the stub built for the environment's Python; `LD_LIBRARY_PATH` must start with that interpreter's libpython folder
(else the stub loads the system libpython and models fail to load); and the server environment's `bin` goes first
on `PATH` so the stub imports that environment's packages (numpy < 2, openvino, onnxruntime), not the caller's. Only
python-backend models are loaded (explicit model control): the `onnxruntime_onnx` GPU model in the same repository
is for NVIDIA's container and has no backend here. The server binds loopback by default.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

from gmim_hub.errors import ServingError
from gmim_hub.serving.env import ServingEnv, ensure_serving_env
from gmim_hub.serving.validate import parse_model_config

log = logging.getLogger(__name__)

# in the server log: `failed to load 'NAME' version 1: <cause>\n\nAt:\n<traceback>` (newlines escaped)
_LOAD_ERROR = re.compile(r"failed to load '([^']+)' version \d+: (.*?)(?:\\n|\"$)", re.M)
_ERROR_LINE = re.compile(r"^E\d{4} |error", re.I)
_NOISE = re.compile(r"NVML|DCGM|GPU metrics")  # CPU-only host: expected


def build_backend_dir(senv: ServingEnv, dest: Path) -> Path:
    """`dest/python/` with the python backend's files and a symlink to the stub for the environment's Python."""
    root = senv.triton_root
    stub = root / "python_backend_stubs" / senv.python_version / "triton_python_backend_stub"
    if not stub.is_file():
        raise ServingError(f"nvidia-pytriton has no python-backend stub for Python {senv.python_version}; "
                           "use Python 3.8-3.13")
    python = dest / "python"
    python.mkdir(parents=True, exist_ok=True)
    for f in (root / "backends" / "python").iterdir():
        if f.is_file():
            (python / f.name).symlink_to(f)
    (python / "triton_python_backend_stub").symlink_to(stub)  # a copy does not work: the stub finds its libs by path
    return dest


def server_env(senv: ServingEnv) -> dict[str, str]:
    """The process environment for tritonserver and its stubs: the server environment's libpython and `bin` first;
    no PYTHONPATH/PYTHONHOME, so nothing of the caller's environment (e.g. numpy 2) reaches the stub."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (senv.libdir, env.get("LD_LIBRARY_PATH", "")) if p)
    env["PATH"] = os.pathsep.join(p for p in (str(senv.bin), env.get("PATH", "")) if p)
    env["VIRTUAL_ENV"] = str(senv.path)
    return env


def python_models(repo_dir: Path) -> list[str]:
    """Names of the python-backend models in a repository: the ones this CPU-only server can load."""
    names = []
    for config in sorted(repo_dir.glob("*/config.pbtxt")):
        if parse_model_config(config).backend == "python":
            names.append(config.parent.name)
    return names


def select_models(repo_dir: Path, models: list[str] | None) -> list[str]:
    """`models` (default: every python-backend model of the repository), checked to exist and be loadable here."""
    available = python_models(repo_dir)
    if not models:
        if not available:
            raise ServingError(f"no python-backend models in {repo_dir}; write them with `gmim export triton`")
        return available
    missing = [m for m in models if not (repo_dir / m / "config.pbtxt").is_file()]
    if missing:
        raise ServingError(f"model(s) {', '.join(missing)} not in {repo_dir}; available: {', '.join(available)}")
    foreign = [m for m in models if m not in available]
    if foreign:
        raise ServingError(f"model(s) {', '.join(foreign)} need a backend this CPU-only server lacks (e.g. the "
                           f"onnxruntime GPU model is for NVIDIA's Triton container); serve {', '.join(available)}")
    return list(models)


def check_port_free(host: str, port: int, what: str) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise ServingError(f"{what} port {port} on {host} is in use ({e.strerror}); stop the other server or "
                               f"pass --{what}-port") from None


def free_port(host: str = "127.0.0.1") -> int:
    """A port that is free right now (for tests and `--http-port 0`)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class TritonServer:
    """A tritonserver process serving the python-backend models of `repo_dir` on loopback.

    Use as a context manager (`with serve(repo) as server:`) or call `start()` / `stop()`. `start` returns once
    `/v2/health/ready` answers 200 with every requested model loaded; a model that fails to load makes the server
    exit and `start` raise `ServingError` with the server's error lines. The log goes to `log_path`. The server runs
    from the environment `serving_env` (default: `gmim_hub.serving.env.default_env_dir()`), which `start` creates
    if it does not exist yet (telling `progress`, default a log warning) and checks.
    """

    def __init__(
        self, repo_dir: str | Path, *, models: list[str] | None = None, http_port: int = 8000, grpc_port: int = 8001,
        metrics_port: int = 8002, host: str = "127.0.0.1", log_verbose: int = 0, ready_timeout: float = 120.0,
        log_path: str | Path | None = None, serving_env: str | Path | None = None,
        progress: Callable[[str], None] | None = None,
    ) -> None:
        self.repo_dir = Path(repo_dir).resolve()
        if not self.repo_dir.is_dir():
            raise ServingError(f"model repository {repo_dir} not found; write one with `gmim export triton`")
        self.models = select_models(self.repo_dir, models)
        self.host, self.http_port, self.grpc_port, self.metrics_port = host, http_port, grpc_port, metrics_port
        self.log_verbose, self.ready_timeout = log_verbose, ready_timeout
        self.log_path = Path(log_path) if log_path else Path(tempfile.gettempdir()) / f"gmim-triton-{http_port}.log"
        self.serving_env, self.progress = serving_env, progress
        self.process: subprocess.Popen[bytes] | None = None
        self.startup_s: float | None = None
        self._workdir: tempfile.TemporaryDirectory[str] | None = None

    @property
    def http_url(self) -> str:
        return f"{self.host}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.host}:{self.metrics_port}/metrics"

    def command(self, senv: ServingEnv, backend_dir: Path) -> list[str]:
        cmd = [str(senv.triton_root / "bin" / "tritonserver"), f"--model-repository={self.repo_dir}",
               f"--backend-directory={backend_dir}", "--model-control-mode=explicit",
               *[f"--load-model={m}" for m in self.models],
               f"--http-address={self.host}", f"--http-port={self.http_port}",
               f"--grpc-address={self.host}", f"--grpc-port={self.grpc_port}",
               f"--metrics-address={self.host}", f"--metrics-port={self.metrics_port}",
               f"--log-verbose={self.log_verbose}", "--exit-timeout-secs=30"]
        return cmd

    def start(self) -> TritonServer:
        if self.process is not None:
            return self
        for port, what in ((self.http_port, "http"), (self.grpc_port, "grpc"), (self.metrics_port, "metrics")):
            check_port_free(self.host, port, what)
        senv = ensure_serving_env(self.serving_env, progress=self.progress)
        self._workdir = tempfile.TemporaryDirectory(prefix="gmim-triton-backends-")
        backend_dir = build_backend_dir(senv, Path(self._workdir.name))
        t0 = time.monotonic()
        with open(self.log_path, "wb") as logfile:  # the child keeps its own descriptor
            self.process = subprocess.Popen(self.command(senv, backend_dir), stdout=logfile, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, env=server_env(senv), start_new_session=True)
        log.info("started tritonserver pid %d, log %s", self.process.pid, self.log_path)
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        self.startup_s = time.monotonic() - t0
        return self

    def _wait_ready(self) -> None:
        assert self.process is not None
        deadline = time.monotonic() + self.ready_timeout
        while not self.ready():
            if self.process.poll() is not None:
                raise ServingError(f"tritonserver exited (code {self.process.returncode}) before it was ready: "
                                   f"{self.error_lines()} (full log: {self.log_path})")
            if time.monotonic() > deadline:
                raise ServingError(f"tritonserver was not ready after {self.ready_timeout:.0f} s: "
                                   f"{self.error_lines()} (full log: {self.log_path})")
            time.sleep(0.1)

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.http_url}/v2/health/ready", timeout=1.0) as r:
                return bool(r.status == 200)
        except OSError:
            return False

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def error_lines(self, limit: int = 4) -> str:
        """The cause of a failure, from the server log, on one line: each model's load error (without the python
        traceback), else the last error lines."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "no server log"
        causes = dict.fromkeys(f"model {m}: {why}" for m, why in _LOAD_ERROR.findall(text))
        if causes:
            return " | ".join(list(causes)[:limit])
        lines = [ln.strip() for ln in text.splitlines() if _ERROR_LINE.search(ln) and not _NOISE.search(ln)]
        return " | ".join(list(dict.fromkeys(lines))[-limit:]) or "the server log has no error lines"

    def stop(self, timeout: float = 40.0) -> int | None:
        """SIGTERM (Triton finishes in-flight requests, for up to its exit timeout of 30 s), then SIGKILL to the
        process group after `timeout` s."""
        process, self.process = self.process, None
        code = None
        if process is not None:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout)
                except subprocess.TimeoutExpired:
                    log.warning("tritonserver did not stop within %.0f s; killing it", timeout)
                    os.killpg(process.pid, signal.SIGKILL)
                    process.wait()
            code = process.returncode
        if self._workdir is not None:
            self._workdir.cleanup()
            self._workdir = None
        return code

    def __enter__(self) -> TritonServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def serve(
    repo_dir: str | Path = "triton_models", *, models: list[str] | None = None, http_port: int = 8000,
    grpc_port: int = 8001, metrics_port: int = 8002, host: str = "127.0.0.1", log_verbose: int = 0,
    ready_timeout: float = 120.0, log_path: str | Path | None = None, serving_env: str | Path | None = None,
    progress: Callable[[str], None] | None = None,
) -> TritonServer:
    """Start a server for the python-backend models of `repo_dir` (or `models`) and wait until it is ready.
    Stop it with `.stop()` or use it as a context manager."""
    return TritonServer(repo_dir, models=models, http_port=http_port, grpc_port=grpc_port, metrics_port=metrics_port,
                        host=host, log_verbose=log_verbose, ready_timeout=ready_timeout, log_path=log_path,
                        serving_env=serving_env, progress=progress).start()
