"""Triton python-backend model `<name>_cpu`: fixed-size windows through OpenVINO (default) or onnxruntime on the CPU.

Copied by `gmim export triton` to `<repo>/<name>_cpu/1/model.py`, next to `model.onnx`, `manifest.json` and
`gmim_openvino.py` (gmim_hub/inference/openvino_runtime.py: the precision choice and compile settings shared
with the in-process OpenVINO backend, so both compile the same graph the same way). Self-contained on purpose
(numpy, openvino or onnxruntime, json, hashlib and Triton's utils only): the server's Python need not have gmim-hub.
Model parameters (config.pbtxt): `runtime` "openvino" or "onnxruntime"; `precision` "auto" (bf16 where the CPU
supports it, else fp32), "bf16" or "fp32" (OpenVINO only; onnxruntime runs fp32); `threads` ("0": the runtime's
default); `cache_dir` (OpenVINO's compiled-model cache, "" for none: the model folder is never written to). The dynamic batcher hands `execute` several requests at once; their windows are concatenated
along the batch axis, run in chunks of at most `max_batch_size`, and split back. A bad request gets its own
error response, so the other requests of the batch, and the server, keep going.
"""

import hashlib
import json
import os
import sys

import numpy as np
import triton_python_backend_utils as pb_utils

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gmim_openvino  # noqa: E402


def sha256_of(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_verified_manifest(version_dir):
    """Read manifest.json and refuse to serve an ONNX file whose sha256 differs from the one exported."""
    with open(os.path.join(version_dir, "manifest.json")) as f:
        manifest = json.load(f)
    onnx_path = os.path.join(version_dir, manifest["onnx_file"])
    actual = sha256_of(onnx_path)
    if actual != manifest["sha256"]:
        raise pb_utils.TritonModelException(
            f"refusing to load: sha256 of {onnx_path} is {actual[:16]}... but manifest.json says "
            f"{manifest['sha256'][:16]}...; "
            "the file was modified or corrupted, re-run `gmim export triton` from a verified export"
        )
    return manifest, onnx_path


def error_response(message):
    return pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(message))


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        version_dir = os.path.join(args["model_repository"], args["model_version"])
        self.manifest, onnx_path = load_verified_manifest(version_dir)
        self.name = config["name"]
        self.max_batch = max(int(config.get("max_batch_size", 1)), 1)
        self.item_shape = tuple(int(d) for d in self.manifest["input"]["shape"][1:])
        params = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
        self.runtime = params.get("runtime", "openvino")
        try:
            threads = int(params.get("threads", "0"))
        except ValueError:
            threads = -1
        if threads < 0:
            raise pb_utils.TritonModelException(f"{self.name}: parameter threads must be an integer >= 0 (0: every "
                                                f"core), got {params.get('threads')!r}")
        if self.runtime == "openvino":
            self.load_openvino(onnx_path, params.get("precision", "auto"), threads, params.get("cache_dir", ""))
        elif self.runtime == "onnxruntime":
            import onnxruntime as ort

            options = ort.SessionOptions()
            options.intra_op_num_threads = threads
            self.session = ort.InferenceSession(onnx_path, sess_options=options, providers=["CPUExecutionProvider"])
            self.precision = "fp32"
        else:
            raise pb_utils.TritonModelException(f"{self.name}: parameter runtime must be 'openvino' or "
                                                f"'onnxruntime', got {self.runtime!r}")
        pb_utils.Logger.log_info(f"{self.name}: serving {onnx_path} (sha256 verified) with {self.runtime} "
                                 f"{self.precision}, threads {threads or 'default'}, window {self.item_shape}")

    def load_openvino(self, onnx_path, precision, threads, cache_dir):
        import openvino as ov

        core = ov.Core()
        try:
            self.precision = gmim_openvino.choose_precision(core, precision)
        except ValueError as e:
            raise pb_utils.TritonModelException(f"{self.name}: parameter precision: {e}") from None
        if cache_dir:
            cache_dir = gmim_openvino.cache_subdir(cache_dir, self.precision, threads)
            os.makedirs(cache_dir, exist_ok=True)
        compiled = gmim_openvino.compile_window_model(core, onnx_path, self.item_shape, self.precision, threads,
                                                      cache_dir or None)
        self.compiled, self.request = compiled, compiled.create_infer_request()

    def check(self, image):
        """None if `image` is a valid (B, C, D, H, W) float32 batch, else the message for the client."""
        if image.dtype != np.float32:
            return f"{self.name}: input 'image' must be float32 (TYPE_FP32), got {image.dtype}"
        if image.ndim != 5 or tuple(image.shape[1:]) != self.item_shape:
            return (f"{self.name}: input 'image' must have shape (batch, {', '.join(map(str, self.item_shape))}), "
                    f"got {tuple(image.shape)}; cut the volume into windows of this size (gmim infer does)")
        if not np.isfinite(image).all():
            return f"{self.name}: input 'image' contains NaN or Inf values"
        return None

    def run(self, images):
        if self.runtime == "openvino":  # a batch-1 compiled model, window by window (as in-process)
            return gmim_openvino.run_windows(self.request, images)
        chunks = [images[i : i + self.max_batch] for i in range(0, len(images), self.max_batch)]
        return np.concatenate([self.session.run(["logits"], {"image": c})[0] for c in chunks])

    def execute(self, requests):
        responses = [None] * len(requests)
        accepted, images = [], []
        for i, request in enumerate(requests):
            tensor = pb_utils.get_input_tensor_by_name(request, "image")
            problem = "missing input 'image'" if tensor is None else self.check(tensor.as_numpy())
            if problem:
                responses[i] = error_response(problem)
            else:
                accepted.append(i)
                images.append(tensor.as_numpy())
        if not images:
            return responses
        try:
            logits = self.run(np.concatenate(images))
        except Exception as e:  # a runtime failure answers the batch's requests, it does not kill the stub
            for i in accepted:
                responses[i] = error_response(f"{self.name}: {self.runtime} failed: {e}")
            return responses
        offsets = np.cumsum([0] + [len(x) for x in images])
        for k, i in enumerate(accepted):
            part = np.ascontiguousarray(logits[offsets[k] : offsets[k + 1]])
            responses[i] = pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("logits", part)])
        return responses

    def finalize(self):
        self.session = self.request = self.compiled = None
