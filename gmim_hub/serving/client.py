"""A small Triton client (HTTP or gRPC, from `tritonclient`) for the models `gmim export triton` writes.

Tensors always travel as binary data. Transient failures (connection refused or reset, timeouts, 502/503/504,
gRPC UNAVAILABLE/DEADLINE_EXCEEDED/RESOURCE_EXHAUSTED) are retried with exponential backoff; a request the server
rejects (bad shape, bad dtype, model error) is not, and its message becomes one `ServingError` line. Each worker
thread has its own connection, so `infer_many` keeps several requests in flight for the dynamic batcher.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import numpy as np

from gmim_hub.errors import ServingError
from gmim_hub.serving.pbtxt import MANIFEST_PARAMETER

log = logging.getLogger(__name__)

T = TypeVar("T")
Protocol = Literal["http", "grpc"]
_RETRY_STATUS = {"502", "503", "504", "StatusCode.UNAVAILABLE", "StatusCode.RESOURCE_EXHAUSTED"}
_TIMEOUT_STATUS = {"StatusCode.DEADLINE_EXCEEDED", "408"}
_NP_TO_TRITON = {np.dtype(np.float32): "FP32", np.dtype(np.float64): "FP64", np.dtype(np.float16): "FP16",
                 np.dtype(np.uint8): "UINT8", np.dtype(np.int32): "INT32", np.dtype(np.int64): "INT64"}


@dataclass(frozen=True)
class ModelSpec:
    """What the server says about one model: tensors as {name: (TYPE_*, dims without the batch axis)}."""

    name: str
    max_batch_size: int
    inputs: dict[str, tuple[str, list[int]]]
    outputs: dict[str, tuple[str, list[int]]]
    manifest: dict[str, Any] | None


class _Transient(Exception):
    """A failure worth retrying: the server is unreachable or busy (`timeout=False`), or a request timed out."""

    def __init__(self, message: str, timeout: bool = False) -> None:
        super().__init__(message)
        self.timeout = timeout


class TritonClient:
    """Blocking client; `url` is host:port (HTTP default port 8000, gRPC 8001)."""

    def __init__(self, url: str = "127.0.0.1:8000", *, protocol: Protocol = "http", timeout: float = 60.0,
                 retries: int = 3, backoff: float = 0.5) -> None:
        if protocol not in ("http", "grpc"):
            raise ServingError(f"protocol must be 'http' or 'grpc', got {protocol!r}")
        if timeout <= 0 or retries < 0 or backoff < 0:
            raise ServingError(f"timeout must be > 0 and retries, backoff >= 0; got {timeout}, {retries}, {backoff}")
        self.url = url.split("://", 1)[-1].rstrip("/")
        self.protocol, self.timeout, self.retries, self.backoff = protocol, float(timeout), int(retries), backoff
        self.bytes_sent = self.bytes_received = self.requests = 0
        self._local = threading.local()
        self._lock = threading.Lock()
        self._clients: list[Any] = []
        self._pool: ThreadPoolExecutor | None = None
        self._pool_size = 0

    @property
    def display_url(self) -> str:
        return f"{self.protocol}://{self.url}"

    def _module(self) -> Any:
        try:
            if self.protocol == "http":
                import tritonclient.http as module
            else:
                import tritonclient.grpc as module
        except ImportError as e:
            raise ServingError(f"tritonclient is not installed ({e}); install the serve extra: "
                               "pip install 'gmim-hub[serve]'") from e
        return module

    def _client(self) -> Any:
        client = getattr(self._local, "client", None)
        if client is None:
            module = self._module()
            if self.protocol == "http":
                client = module.InferenceServerClient(self.url, connection_timeout=self.timeout,
                                                      network_timeout=self.timeout)
            else:
                client = module.InferenceServerClient(self.url)
            self._local.client = client
            with self._lock:
                self._clients.append(client)
        return client

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        with self._lock:
            clients, self._clients = self._clients, []
        for client in clients:
            client.close()
        self._local = threading.local()

    def __enter__(self) -> TritonClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------------------------------- transport
    def _call(self, what: str, fn: Callable[[Any], T]) -> T:
        """Run fn(client), retrying transient failures; every failure becomes one ServingError line."""
        for attempt in range(self.retries + 1):
            try:
                return self._once(what, fn)
            except _Transient as e:
                if attempt == self.retries:
                    if e.timeout:
                        raise ServingError(f"{what} on {self.display_url} timed out after {self.timeout:g} s "
                                           f"({self.retries} retries); raise --timeout") from None
                    raise ServingError(f"cannot reach Triton at {self.display_url} ({what}: {e}): is `gmim serve` "
                                       "running?") from None
                delay = self.backoff * 2**attempt
                log.warning("%s failed (%s); retry %d/%d in %.1f s", what, e, attempt + 1, self.retries, delay)
                time.sleep(delay)
        raise AssertionError("unreachable")  # pragma: no cover

    def _once(self, what: str, fn: Callable[[Any], T]) -> T:
        from tritonclient.utils import InferenceServerException

        try:
            return fn(self._client())
        except TimeoutError as e:
            raise _Transient(str(e) or "timed out", timeout=True) from e
        except OSError as e:  # connection refused / reset
            raise _Transient(str(e) or type(e).__name__) from e
        except InferenceServerException as e:
            status = str(e.status())
            if status in _TIMEOUT_STATUS:
                raise _Transient(_message(e), timeout=True) from e
            if status in _RETRY_STATUS:
                raise _Transient(_message(e)) from e
            raise ServingError(f"{what}: {_message(e)}") from None

    def _timeout(self) -> dict[str, float]:
        """gRPC calls take a per-call deadline; the HTTP client has its network timeout from the constructor."""
        return {"client_timeout": self.timeout} if self.protocol == "grpc" else {}

    def is_model_ready(self, model: str) -> bool:
        return bool(self._call(f"model {model}", lambda c: c.is_model_ready(model, **self._timeout())))

    def check_ready(self, model: str) -> None:
        """ServingError unless the server answers and `model` is loaded."""
        if not self._call("server health", lambda c: c.is_server_live(**self._timeout())):
            raise ServingError(f"Triton at {self.display_url} is not live; check the server log")
        if not self.is_model_ready(model):
            raise ServingError(f"model {model!r} is not loaded on {self.display_url}; loaded: "
                               f"{', '.join(self.loaded_models()) or 'none'}")

    def loaded_models(self) -> list[str]:
        """Names of the models the server has ready, sorted."""
        index = self._call("model index", lambda c: c.get_model_repository_index(**self._timeout()))
        return sorted(m["name"] if isinstance(m, dict) else m.name for m in _index_list(index)
                      if (m.get("state") if isinstance(m, dict) else m.state) == "READY")

    def model_spec(self, model: str) -> ModelSpec:
        """The model's config as the server reports it, with the export manifest embedded by `gmim export triton`."""
        raw = self._call(f"config of {model}", lambda c: c.get_model_config(model, **self._timeout()))
        if self.protocol == "grpc":
            from google.protobuf import json_format

            raw = json_format.MessageToDict(raw.config, preserving_proto_field_name=True)
        else:
            raw = raw.get("config", raw)

        def tensors(key: str) -> dict[str, tuple[str, list[int]]]:
            return {t["name"]: (t.get("data_type", "TYPE_INVALID"), [int(d) for d in t.get("dims", [])])
                    for t in raw.get(key, [])}

        text = raw.get("parameters", {}).get(MANIFEST_PARAMETER, {}).get("string_value")
        manifest = json.loads(text) if text else None
        return ModelSpec(model, int(raw.get("max_batch_size", 0)), tensors("input"), tensors("output"), manifest)

    def infer(self, model: str, image: np.ndarray, output: str, *, parameters: dict[str, Any] | None = None,
              input_name: str = "image") -> np.ndarray:
        """One request: `image` as binary data in, the named output back as numpy."""
        module = self._module()
        image = np.ascontiguousarray(image)
        datatype = _NP_TO_TRITON.get(image.dtype)
        if datatype is None:
            raise ServingError(f"cannot send a {image.dtype} array to Triton; cast it to float32")

        def send(client: Any) -> np.ndarray:
            tensor = module.InferInput(input_name, list(image.shape), datatype)
            if self.protocol == "http":
                tensor.set_data_from_numpy(image, binary_data=True)
                out = [module.InferRequestedOutput(output, binary_data=True)]
                result = client.infer(model, [tensor], outputs=out, parameters=parameters)
            else:
                tensor.set_data_from_numpy(image)
                out = [module.InferRequestedOutput(output)]
                result = client.infer(model, [tensor], outputs=out, parameters=parameters, **self._timeout())
            array = result.as_numpy(output)
            if array is None:
                raise ServingError(f"{model} returned no {output!r} tensor")
            return array

        try:
            array = self._call(f"inference on {model}", send)
        except ServingError as e:
            raise ServingError(f"{e}{self._rejection_hint(model, str(e))}") from None
        with self._lock:
            self.requests += 1
            self.bytes_sent += image.nbytes
            self.bytes_received += array.nbytes
        return array

    def _rejection_hint(self, model: str, message: str) -> str:
        """What the server does accept, when it rejected a request's model or tensor names (Triton's own message
        names only what was wrong). Best effort: an empty hint if the server cannot say."""
        try:
            if "unknown model" in message:
                return f"; models loaded on {self.display_url}: {', '.join(self.loaded_models()) or 'none'}"
            if "unexpected inference input" in message or "unexpected inference output" in message:
                spec = self.model_spec(model)
                return (f"; {model} takes input(s) {', '.join(map(repr, spec.inputs))} and returns "
                        f"{', '.join(map(repr, spec.outputs))}")
        except ServingError:
            pass
        return ""

    def infer_many(
        self, model: str, batches: Sequence[np.ndarray], output: str, *, concurrency: int = 4
    ) -> list[np.ndarray]:
        """Send the batches with at most `concurrency` requests in flight; results in input order."""
        if concurrency < 1:
            raise ServingError(f"concurrency must be >= 1, got {concurrency}")
        if concurrency == 1 or len(batches) == 1:
            return [self.infer(model, b, output) for b in batches]
        if self._pool is None or self._pool_size != concurrency:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
            self._pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="triton")
            self._pool_size = concurrency
        return list(self._pool.map(lambda b: self.infer(model, b, output), batches))


def _message(e: Any) -> str:
    text = e.message() if hasattr(e, "message") and callable(e.message) else str(e)
    return " ".join(str(text).split())


def _index_list(index: Any) -> list[Any]:
    return list(index.models) if hasattr(index, "models") else list(index)
