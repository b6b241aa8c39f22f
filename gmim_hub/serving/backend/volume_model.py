"""Triton python-backend model `<name>_volume`: a whole preprocessed volume in, uint8 labels out.

Copied by `gmim export triton` to `<repo>/<name>_volume/1/model.py`, with `gmim_sliding.py` (numpy-only
Gaussian-weighted sliding window, shared with the client) and `manifest.json`. The windows go to the window model
(parameter `window_model`, default `<name>_cpu`; set it to `<name>` on a GPU host) by business logic scripting,
`sw_batch_size` windows per request, so a study's response is megabytes of labels instead of gigabytes of logits.
Outputs: `labels` (uint8, one byte per label) and `labels_packed` (the same labels at 1, 2, 4 or 8 bits each, see
`gmim_sliding.pack_labels`; 4x smaller for up to 4 classes); only the outputs a request asks for are built.
Request parameter `overlap` (0 <= overlap < 1) overrides the configured default for one request.
"""

import json
import os
import sys

import numpy as np
import triton_python_backend_utils as pb_utils

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gmim_sliding import label_bits, labels_from_logits, pack_labels, sliding_window_logits  # noqa: E402


class VolumeError(Exception):
    """A problem with one request; it becomes that request's error response."""


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        with open(os.path.join(args["model_repository"], args["model_version"], "manifest.json")) as f:
            self.manifest = json.load(f)
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        self.name = config["name"]
        self.window_model = params["window_model"]
        self.overlap = float(params.get("overlap", "0.5"))
        self.sw_batch_size = int(params.get("sw_batch_size", "4"))
        self.sigma_scale = float(params.get("sigma_scale", "0.125"))
        self.max_voxels = int(params.get("max_voxels", str(512**3)))
        self.roi = tuple(int(d) for d in self.manifest["window_size"])
        self.in_channels = int(self.manifest["in_channels"])
        self.out_channels = int(self.manifest["out_channels"])
        self.multi_label = bool(self.manifest.get("multi_label", False))
        self.bits = label_bits(self.out_channels, self.multi_label)
        self.current = None  # the request being stitched, polled for cancellation between window batches
        pb_utils.Logger.log_info(f"{self.name}: windows {self.roi} via {self.window_model}, overlap {self.overlap}")

    def check(self, image):
        if image.dtype != np.float32:
            raise VolumeError(f"{self.name}: input 'image' must be float32 (TYPE_FP32), got {image.dtype}")
        if image.ndim != 4 or image.shape[0] != self.in_channels or min(image.shape[1:]) < 1:
            raise VolumeError(f"{self.name}: input 'image' must be a preprocessed volume "
                              f"({self.in_channels}, X, Y, Z), got {tuple(image.shape)}")
        if image[0].size > self.max_voxels:
            raise VolumeError(f"{self.name}: volume {tuple(image.shape[1:])} has more than max_voxels="
                              f"{self.max_voxels} voxels; crop it or raise the model parameter max_voxels")
        if not np.isfinite(image).all():
            raise VolumeError(f"{self.name}: input 'image' contains NaN or Inf values")

    def request_overlap(self, request):
        raw = json.loads(request.parameters() or "{}").get("overlap", self.overlap)
        try:
            overlap = float(raw)
        except (TypeError, ValueError):
            overlap = -1.0
        if not 0.0 <= overlap < 1.0:
            raise VolumeError(f"{self.name}: request parameter overlap must be a number in [0, 1), got {raw!r}")
        return overlap

    def run_windows(self, batch):
        if self.current is not None and self.current.is_cancelled():  # the client gave up (timeout, disconnect)
            raise VolumeError(f"{self.name}: request cancelled by the client")
        request = pb_utils.InferenceRequest(
            model_name=self.window_model, requested_output_names=["logits"], inputs=[pb_utils.Tensor("image", batch)]
        )
        response = request.exec()
        if response.has_error():
            raise VolumeError(f"{self.name}: window model {self.window_model} failed: {response.error().message()}")
        return pb_utils.get_output_tensor_by_name(response, "logits").as_numpy()

    def infer_one(self, request):
        tensor = pb_utils.get_input_tensor_by_name(request, "image")
        if tensor is None:
            raise VolumeError(f"{self.name}: missing input 'image'")
        image = tensor.as_numpy()
        self.check(image)
        logits = sliding_window_logits(
            image, self.roi, self.run_windows, channels=self.out_channels, overlap=self.request_overlap(request),
            batch_size=self.sw_batch_size, sigma_scale=self.sigma_scale,
        )
        labels = np.ascontiguousarray(labels_from_logits(logits, self.multi_label))
        wanted = set(request.requested_output_names()) or {"labels"}
        outputs = []
        if "labels" in wanted:
            outputs.append(pb_utils.Tensor("labels", labels))
        if "labels_packed" in wanted:
            outputs.append(pb_utils.Tensor("labels_packed", pack_labels(labels, self.bits)))
        return pb_utils.InferenceResponse(output_tensors=outputs)

    def execute(self, requests):
        responses = []
        for request in requests:
            self.current = request
            try:
                responses.append(self.infer_one(request))
            except VolumeError as e:
                pb_utils.Logger.log_warn(str(e))
                responses.append(pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(str(e))))
            finally:
                self.current = None
        return responses
