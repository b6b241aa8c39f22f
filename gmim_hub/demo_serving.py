"""The demo's deployment steps: ONNX export, a local Triton server, and one `gmim infer` request.

Steps 6 and 7 of `gmim_hub.demo.DEMO_STEPS`:

6. export  ONNX export of the fine-tuned model (`export/<name>` inside the demo folder, parity-checked); a re-run
           keeps an intact export of the same weights (`export/<name>.weights.json` records them);
7. serve   a Triton model repository, a real Triton server on loopback (python backend, CPU), one volume-mode
           request through `gmim infer`'s client on the validation image, compared voxel by voxel with local
           ONNX Runtime prediction of the same file.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from gmim_hub.atomic import write_text
from gmim_hub.data import load_datalist
from gmim_hub.demo_context import DemoContext
from gmim_hub.errors import GMIMError, ServingError
from gmim_hub.export.onnx import export_onnx
from gmim_hub.inference.openvino_backend import openvino_available
from gmim_hub.inference.openvino_runtime import choose_precision
from gmim_hub.inference.predictor import Predictor
from gmim_hub.serving.infer import infer_files
from gmim_hub.serving.repository import write_triton_repository
from gmim_hub.serving.server import free_port, serve
from gmim_hub.serving.validate import check_export

logger = logging.getLogger(__name__)

DEMO_MODEL_NAME = "gmim_demo"


def step_export(ctx: DemoContext) -> None:
    """Export the fine-tuned model, unless an intact export of the same weights is there from an earlier run."""
    assert ctx.model_dir is not None, "step 'export' needs step 'finetune' first"
    export_dir = ctx.output_dir / "export" / DEMO_MODEL_NAME
    record = export_dir.parent / f"{DEMO_MODEL_NAME}.weights.json"  # which weights the export was made from
    weights = {"weights_sha256": _weights_digest(ctx.model_dir / "model.safetensors")}
    manifest = _reusable_export(export_dir, record, weights)
    if manifest is None:  # export_onnx writes atomically, so replacing a stale or damaged export is safe
        manifest = export_onnx(str(ctx.model_dir), export_dir.parent, name=DEMO_MODEL_NAME, max_batch=2,
                               overwrite=True).manifest
        write_text(record, json.dumps({**weights, "onnx_sha256": manifest["sha256"]}, indent=2) + "\n")
    else:
        ctx.reused.append("export")
    ctx.artifacts["ONNX export"] = export_dir / str(manifest["onnx_file"])
    ctx.artifacts["export manifest"] = export_dir / "manifest.json"
    parity = manifest["parity"]
    ctx.summary["ONNX export"] = (f"max |ORT - PyTorch| {max(parity['max_abs_diff_batch1'], parity['max_abs_diff_batch_max']):.1e}"
                                  f" at batch 1 and {manifest['max_batch_size']}")


def _reusable_export(export_dir: Path, record: Path, weights: dict[str, str]) -> dict | None:
    """The manifest of an earlier export when it was made from these weights and its ONNX file is intact."""
    try:
        done = json.loads(record.read_text())
        manifest, _ = check_export(export_dir)
    except (OSError, ValueError, GMIMError):  # no export yet, or a damaged one: export again
        return None
    same = done == {**weights, "onnx_sha256": manifest["sha256"]}
    return manifest if same else None


def _weights_digest(path: Path) -> str:
    """sha256 of the tensors (names, dtypes, shapes, values) of a safetensors file. Not of the file: the metadata
    map in its header is written in a different order from one save to the next."""
    import hashlib

    from safetensors.torch import load_file

    h = hashlib.sha256()
    for name, tensor in sorted(load_file(str(path)).items()):
        h.update(f"{name} {tensor.dtype} {tuple(tensor.shape)}\n".encode())
        h.update(tensor.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def step_serve(ctx: DemoContext) -> None:
    export_dir = ctx.output_dir / "export" / DEMO_MODEL_NAME
    repo = ctx.output_dir / "triton_models"
    # the served window model and the local reference run the same runtime at the same precision: OpenVINO
    # (bf16 where the CPU has it) when this environment has openvino, else onnxruntime fp32 on both sides
    runtime = "openvino" if openvino_available() else "onnxruntime"
    write_triton_repository(export_dir, repo, name=DEMO_MODEL_NAME, cpu_runtime=runtime)
    ctx.artifacts["Triton model repository"] = repo
    image = load_datalist(ctx.data.dataset_json, split="validation")[0]["image"]
    served = ctx.output_dir / "inference" / "validation_triton_seg.nii.gz"
    local = ctx.output_dir / "inference" / "validation_local_seg.nii.gz"
    served.parent.mkdir(parents=True, exist_ok=True)
    if runtime == "openvino":
        import openvino as ov

        local_predictor = Predictor.from_pretrained(None, backend="openvino", onnx_path=export_dir,
                                                    precision=choose_precision(ov.Core(), "auto"))
    else:
        local_predictor = Predictor.from_pretrained(None, backend="onnx", onnx_path=export_dir)
    local_predictor.predict_file(image, local, overwrite=True)
    http = free_port()
    with serve(repo, models=[f"{DEMO_MODEL_NAME}_cpu", f"{DEMO_MODEL_NAME}_volume"], http_port=http,
               grpc_port=free_port(), metrics_port=free_port(), log_path=ctx.output_dir / "triton.log") as server:
        report = infer_files(image, served, model=DEMO_MODEL_NAME, url=f"127.0.0.1:{http}", mode="volume",
                             overwrite=True)
        startup = server.startup_s
    a, b = (np.asarray(nib.load(str(p)).dataobj) for p in (served, local))
    if a.shape != b.shape:
        raise ServingError(f"Triton output shape {a.shape} differs from local prediction {b.shape}")
    agree = float((a == b).mean())
    ctx.artifacts["Triton prediction (NIfTI)"] = served
    ctx.artifacts[f"local {runtime} prediction (NIfTI)"] = local
    ctx.summary["Triton serving"] = (f"server ready in {startup:.1f} s; 1 volume request, "
                                     f"{report.bytes_sent / 1e6:.2f} MB sent / {report.bytes_received / 1e6:.2f} MB "
                                     f"received; labels equal local {runtime} prediction for {agree:.2%} of voxels")
    if agree < 0.999:
        raise ServingError(f"served labels agree with local prediction for only {agree:.2%} of voxels")

