"""How gmim-hub compiles an ONNX window model with OpenVINO for the CPU: the one place that decides the precision
(bf16 where the CPU plugin supports it, f32 otherwise), the thread count and the compiled-model cache folder.

Used by the in-process backend (`gmim_hub.inference.openvino_backend`) and by the Triton `<name>_cpu` model, which
gets this file copied next to its `model.py` as `gmim_openvino.py` by `gmim export triton`. So it imports only
openvino (when called) and the standard library: the server's environment has no gmim-hub. Both sides compile the
same graph with the same settings, which is why the served logits equal the in-process ones.
"""

import os

# gmim-hub's precision names -> OpenVINO's INFERENCE_PRECISION_HINT values
PRECISIONS = {"fp32": "f32", "bf16": "bf16"}
CHOICES = ("auto", "bf16", "fp32")


def bf16_supported(core):
    """Whether OpenVINO's CPU plugin lists BF16 among its OPTIMIZATION_CAPABILITIES on this CPU."""
    return "BF16" in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def choose_precision(core, requested="auto"):
    """"bf16" or "fp32" for `requested` ("auto": bf16 where the CPU supports it, else fp32). ValueError with the
    reason for an unknown name, or for "bf16" on a CPU without native bf16."""
    if requested not in CHOICES:
        raise ValueError(f"precision must be one of {', '.join(CHOICES)} for OpenVINO, got {requested!r}")
    if requested == "auto":
        return "bf16" if bf16_supported(core) else "fp32"
    if requested == "bf16" and not bf16_supported(core):
        raise ValueError("this CPU has no native bf16 (OpenVINO's CPU plugin does not list BF16); use precision "
                         "fp32 or auto")
    return requested


def cache_subdir(root, precision, threads):
    """The compiled-model cache folder for one precision and thread count under `root`: OpenVINO 2026.4 leaves
    INFERENCE_PRECISION_HINT out of its cache key, so a bf16 compile sharing a folder with an f32 one would load
    the f32 blob and then crash in inference."""
    return os.path.join(str(root), f"{precision}-threads{threads or 'default'}")


def compile_config(precision, threads=None, cache_dir=None):
    """The CPU plugin's settings: precision hint, latency mode (one window at a time), threads (None or 0: one per
    physical core, OpenVINO's default) and CACHE_DIR (None: no compiled-model cache)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be 'fp32' or 'bf16', got {precision!r}")
    config = {"INFERENCE_PRECISION_HINT": PRECISIONS[precision], "PERFORMANCE_HINT": "LATENCY"}
    if threads:
        config["INFERENCE_NUM_THREADS"] = str(int(threads))
    if cache_dir:
        config["CACHE_DIR"] = str(cache_dir)
    return config


def compile_window_model(core, onnx_path, item_shape, precision, threads=None, cache_dir=None):
    """The ONNX window model compiled for the CPU with a static batch of 1 (the fastest compiled form; callers run
    a batch window by window). `item_shape`: (C, D, H, W). Read from memory so the cache key hashes the graph."""
    graph = core.read_model(str(onnx_path))
    graph.reshape({graph.inputs[0].get_any_name(): [1, *[int(d) for d in item_shape]]})
    return core.compile_model(graph, "CPU", compile_config(precision, threads, cache_dir))


def run_windows(request, windows):
    """Run a (B, C, D, H, W) float32 batch through an infer request of a batch-1 compiled model, one window at a
    time; returns the (B, K, D, H, W) float32 logits as a new array."""
    import numpy as np

    outs = []
    for i in range(windows.shape[0]):
        request.infer({0: np.ascontiguousarray(windows[i : i + 1])})
        outs.append(request.get_output_tensor(0).data.copy())
    return np.concatenate(outs)
