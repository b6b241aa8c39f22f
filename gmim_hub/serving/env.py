"""The Triton server's own Python environment: the one place where numpy < 2 is required.

The python-backend stub of the `tritonserver` binary that the nvidia-pytriton wheel ships returns empty outputs
(while reporting success) when the Python it embeds has numpy 2. gmim-hub itself, and packages users need next to
it (DICOM, OpenVINO), run on numpy 2. So the server runs in a separate virtual environment holding only what the
server and the python-backend models import (`SERVING_PACKAGES`): the binary with its python backend and stubs,
numpy < 2 and the CPU runtimes (OpenVINO, which the `_cpu` model runs by default, and onnxruntime, its alternative;
OpenVINO 2026.4 installs next to numpy 1.26). The main environment needs none of them (`gmim infer`'s client is
tritonclient).

It is created once (`gmim serve --setup-env`, or the first `gmim serve` / `serve()`, which say so), cached under
`~/.cache/gmim-hub/serving-env/py<X.Y>-<hash>` (`$XDG_CACHE_HOME` honoured; the hash covers `SERVING_PACKAGES`, the
Python version and the machine, so a changed list gets a fresh environment), and checked in its own interpreter
before each server start: every package installed in a version the list allows, every listed module importable.
`$GMIM_SERVING_ENV` (or `gmim serve --serving-env`) names another folder: a new one is created there, one gmim
did not create is checked and never modified.

The stub finds the environment the way the python backend's own `EXECUTION_ENV_PATH` does (it sources the
environment's `bin/activate`): the environment's `bin` first on `PATH`, from which the embedded interpreter takes
its prefix. Here it is set once for the whole server instead of in each `config.pbtxt`, so exported model
repositories carry no host path and still load in NVIDIA's Triton container.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from packaging.requirements import Requirement

from gmim_hub.atomic import write_text
from gmim_hub.errors import ServingError

log = logging.getLogger(__name__)

# (pip requirement, module the python-backend models import, or None): everything the server's environment holds.
# The one list to extend when a model file (gmim_hub/serving/backend/) needs another package.
SERVING_PACKAGES: tuple[tuple[str, str | None], ...] = (
    ("nvidia-pytriton==0.7.0", None),  # tritonserver 2.51 with the python backend and its stubs (found, not imported)
    ("numpy>=1.24,<2", "numpy"),  # the stub returns empty outputs under numpy 2
    ("openvino>=2024.6", "openvino"),  # the `_cpu` window model's default runtime (numpy < 2 allowed up to 2026.x)
    ("onnxruntime>=1.17", "onnxruntime"),  # the `_cpu` window model with parameter runtime=onnxruntime
)
ENV_VARIABLE = "GMIM_SERVING_ENV"
SETUP_HINT = "gmim serve --setup-env"
_DONE = "gmim-serving-env.json"  # written last: the environment is complete and was created by gmim
_BUSY = ".gmim-creating"  # written first: a folder with only this is an interrupted creation

# Run by the environment's own interpreter (isolated: no PYTHONPATH, no user site): versions, imports, paths.
_PROBE = r"""
import importlib, importlib.metadata as md, importlib.util, json, sys, sysconfig
versions, errors = {}, {}
for name, module in json.loads(sys.argv[1]):
    try:
        versions[name] = md.version(name)
    except md.PackageNotFoundError:
        versions[name] = None
        continue
    if module:
        try:
            importlib.import_module(module)
        except Exception as e:
            errors[module] = (f"{type(e).__name__}: {e}".splitlines() or [""])[0][:200]
spec = importlib.util.find_spec("pytriton")
root = spec.submodule_search_locations[0] + "/tritonserver" if spec and spec.submodule_search_locations else None
print(json.dumps({"versions": versions, "import_errors": errors, "triton_root": root,
                  "libdir": sysconfig.get_config_var("LIBDIR") or "", "python": "%d.%d" % sys.version_info[:2]}))
"""


@dataclass(frozen=True)
class ServingEnv:
    """A checked server environment: where its interpreter, the tritonserver folder and libpython are."""

    path: Path
    triton_root: Path  # .../site-packages/pytriton/tritonserver: bin/, backends/python/, python_backend_stubs/
    libdir: str  # the interpreter's libpython folder (first on LD_LIBRARY_PATH, else the stub takes the system one)
    python_version: str  # "3.11": which stub to use
    versions: dict[str, str]

    @property
    def bin(self) -> Path:
        return self.path / "bin"


def requirements(packages: tuple[tuple[str, str | None], ...] = SERVING_PACKAGES) -> list[str]:
    return [req for req, _ in packages]


def env_key(packages: tuple[tuple[str, str | None], ...] = SERVING_PACKAGES) -> str:
    """`py3.11-<12 hex>`: the Python version plus a hash of the package list, the Python version and the machine."""
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    text = json.dumps([requirements(packages), version, platform.machine()])
    return f"py{version}-{hashlib.sha256(text.encode()).hexdigest()[:12]}"


def default_env_dir() -> Path:
    """`$GMIM_SERVING_ENV`, else `<cache>/gmim-hub/serving-env/<env_key()>` (`$XDG_CACHE_HOME` or ~/.cache)."""
    if os.environ.get(ENV_VARIABLE):
        return Path(os.environ[ENV_VARIABLE]).expanduser().absolute()
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "gmim-hub" / "serving-env" / env_key()


def _python(path: Path) -> Path:
    return path / "bin" / "python"


def _ours(path: Path) -> bool:
    return (path / _DONE).is_file() or (path / _BUSY).is_file()


def probe(path: Path) -> dict:
    """What the environment's own interpreter reports: package versions, import errors, tritonserver folder."""
    names = [[Requirement(req).name, module] for req, module in SERVING_PACKAGES]
    try:
        done = subprocess.run([str(_python(path)), "-I", "-c", _PROBE, json.dumps(names)], capture_output=True,
                              text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise ServingError(f"the Triton server environment {path} does not run ({e}); rebuild it: "
                           f"{SETUP_HINT}") from None
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise ServingError(f"the Triton server environment {path} does not run ({last}); rebuild it: {SETUP_HINT}")
    return dict(json.loads(done.stdout))


def problems(info: dict) -> list[str]:
    """Everything wrong with a probed environment, each as a short phrase (empty: usable)."""
    found: list[str] = []
    for req, module in SERVING_PACKAGES:
        r = Requirement(req)
        version = info["versions"].get(r.name)
        if version is None:
            found.append(f"{r.name} is not installed")
        elif not r.specifier.contains(version, prereleases=True):
            found.append(f"{r.name} {version} does not satisfy {req}")
        elif module in info["import_errors"]:
            found.append(f"import {module} fails: {info['import_errors'][module]}")
    root = Path(info["triton_root"]) if info.get("triton_root") else None
    if root is not None and not (root / "bin" / "tritonserver").is_file():
        found.append(f"no tritonserver binary under {root}")
    elif root is not None and not (root / "python_backend_stubs" / info["python"]).is_dir():
        found.append(f"nvidia-pytriton has no python-backend stub for Python {info['python']} (use 3.8-3.13)")
    return found


def check_serving_env(path: str | Path | None = None) -> ServingEnv:
    """The environment at `path` (default `default_env_dir()`), checked; `ServingError` with one line if it is
    missing or anything in it is wrong."""
    path = Path(path) if path is not None else default_env_dir()
    if not _python(path).exists():
        raise ServingError(f"no Triton server environment at {path}; create it with: {SETUP_HINT}")
    info = probe(path)
    found = problems(info)
    if found:
        fix = (f"rebuild it: {SETUP_HINT}" if _ours(path) else f"fix it or use another environment "
               f"(--serving-env or ${ENV_VARIABLE}; without either gmim creates its own)")
        raise ServingError(f"the Triton server environment {path} is not usable ({'; '.join(found)}); {fix}")
    return ServingEnv(path, Path(info["triton_root"]), info["libdir"], info["python"], dict(info["versions"]))


def ensure_serving_env(
    path: str | Path | None = None, *, create: bool = True, repair: bool = False,
    progress: Callable[[str], None] | None = None,
) -> ServingEnv:
    """The checked server environment, created first if it does not exist (and `create`).

    An interrupted creation is removed and started again; a broken environment gmim created is rebuilt only with
    `repair` (`gmim serve --setup-env`), otherwise it is an error saying so. Concurrent callers wait on a lock
    file beside the environment, so it is built once. `progress` gets one line before a creation (default: a
    warning in the log), which downloads the packages from the package index (pip's own settings apply).
    """
    path = Path(path) if path is not None else default_env_dir()
    if path.exists() and not _ours(path):  # someone else's environment: checked, never modified
        if not _python(path).exists():
            raise ServingError(f"{path} is not a Python environment (no bin/python); pass a virtual environment, or "
                               "a new folder for gmim to create one in")
        return check_serving_env(path)
    say = progress or log.warning
    with _locked(path, say):
        if (path / _BUSY).is_file():  # an interrupted creation
            shutil.rmtree(path)
        elif repair and (path / _DONE).is_file():
            try:
                return check_serving_env(path)
            except ServingError as e:
                say(f"rebuilding the Triton server environment: {str(e).split('; rebuild it')[0]}")
                shutil.rmtree(path)
        if not path.exists():
            if not create:
                raise ServingError(f"no Triton server environment at {path}; create it with: {SETUP_HINT}")
            say(f"creating the Triton server's Python environment in {path} (once, a few minutes): "
                f"{', '.join(requirements())}")
            _create(path)
    return check_serving_env(path)


@contextlib.contextmanager
def _locked(path: Path, say: Callable[[str], None]) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / f".{path.name}.lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            say(f"waiting for another process that is setting up {path}")
            fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _create(path: Path) -> None:
    """A virtual environment of this Python with `SERVING_PACKAGES`; removed again if any step fails."""
    log_path = path.parent / f"{path.name}.pip.log"
    try:
        path.mkdir(parents=True)
        (path / _BUSY).write_text("")
        _run([sys.executable, "-m", "venv", str(path)], log_path, "python -m venv", mode="w")
        _run([str(_python(path)), "-m", "pip", "install", "--disable-pip-version-check", "--no-input",
              "--only-binary=:all:", *requirements()], log_path, "pip install")
        info = probe(path)
        found = problems(info)
        if found:
            raise ServingError(f"the new Triton server environment {path} is not usable: {'; '.join(found)}")
        done = {"requirements": requirements(), "versions": info["versions"], "python": info["python"]}
        write_text(path / _DONE, json.dumps(done, indent=2) + "\n")
        (path / _BUSY).unlink()
    except BaseException:
        shutil.rmtree(path, ignore_errors=True)
        raise
    log.info("created the Triton server environment %s (%s)", path, info["versions"])


def _run(cmd: list[str], log_path: Path, what: str, mode: str = "a") -> None:
    with open(log_path, mode) as out:
        out.write(f"$ {' '.join(cmd)}\n")
        out.flush()
        code = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL).returncode
    if code != 0:
        lines = [ln.strip() for ln in log_path.read_text(errors="replace").splitlines() if ln.strip()]
        cause = next((ln for ln in reversed(lines) if ln.startswith("ERROR")), lines[-1] if lines else "no output")
        raise ServingError(f"could not create the Triton server environment: {what} failed ({cause}); it needs the "
                           f"package index once (pip's settings apply) or set {ENV_VARIABLE} to a prepared "
                           f"environment (log: {log_path})")
