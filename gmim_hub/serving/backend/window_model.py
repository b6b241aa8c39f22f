"""Triton python-backend model `<name>_cpu`: fixed-size windows through onnxruntime on the CPU.

Copied by `gmim export triton` to `<repo>/<name>_cpu/1/model.py`, next to `model.onnx` and `manifest.json`.
Self-contained on purpose (numpy, onnxruntime, json, hashlib and Triton's utils only): the server's Python need
not have gmim-hub. The dynamic batcher hands `execute` several requests at once; their windows are concatenated
along the batch axis, run in chunks of at most `max_batch_size`, and split back. A bad request gets its own
error response, so the other requests of the batch, and the server, keep going.
"""

import hashlib
import json
import os

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils


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
        threads = int(config.get("parameters", {}).get("intra_op_num_threads", {}).get("string_value", "0"))
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(onnx_path, sess_options=options, providers=["CPUExecutionProvider"])
        pb_utils.Logger.log_info(f"{self.name}: serving {onnx_path} (sha256 verified), window {self.item_shape}")

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
        except Exception as e:  # an ORT failure answers the batch's requests, it does not kill the stub
            for i in accepted:
                responses[i] = error_response(f"{self.name}: onnxruntime failed: {e}")
            return responses
        offsets = np.cumsum([0] + [len(x) for x in images])
        for k, i in enumerate(accepted):
            part = np.ascontiguousarray(logits[offsets[k] : offsets[k + 1]])
            responses[i] = pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("logits", part)])
        return responses

    def finalize(self):
        self.session = None
