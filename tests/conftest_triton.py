"""Session fixtures for the Triton tests (loaded with `pytest_plugins = ["conftest_triton"]`): a tiny exported
model, a model repository written from it, and ONE real Triton server (the tritonserver binary of nvidia-pytriton,
python backend, loopback, free ports) for the whole test session. The server runs in its own numpy < 2 environment
(`gmim_hub.serving.env`), which the first start creates from the package index (about a minute, once per machine).
If the server cannot start, every test that needs it fails with the server's error lines; nothing is skipped."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from gmim_hub import PRESETS, GMIMConfig
from gmim_hub.export.onnx import OnnxWindowModel, export_onnx
from gmim_hub.inference import Predictor, load_nifti
from gmim_hub.models.segmentation import SegmentationNetwork
from gmim_hub.serving.client import TritonClient
from gmim_hub.serving.repository import write_triton_repository
from gmim_hub.serving.server import TritonServer, free_port

MAX_BATCH = 4


@pytest.fixture(scope="session")
def triton_mri() -> Path:
    """A real MRI volume shipped with nibabel: 33x41x25 voxels of 2 mm, LAS orientation (not RAS)."""
    return Path(nib.__file__).parent / "tests" / "data" / "anatomical.nii"


@pytest.fixture(scope="session")
def triton_export(tmp_path_factory):
    """`gmim export onnx` of a seeded tiny SegmentationNetwork (64^3 windows, 2 classes, max batch 4)."""
    torch.manual_seed(0)
    model = SegmentationNetwork(PRESETS["tiny"]).eval()
    return export_onnx(model, tmp_path_factory.mktemp("export"), name="tiny", max_batch=MAX_BATCH)


@pytest.fixture(scope="session")
def triton_ort(triton_export):
    return OnnxWindowModel.from_export(triton_export.onnx_path.parent, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="session")
def triton_precision() -> str:
    """The precision `tiny_cpu` runs here: the shared rule (bf16 where OpenVINO's CPU plugin lists BF16, else fp32)."""
    import openvino as ov

    from gmim_hub.inference.openvino_runtime import choose_precision

    return str(choose_precision(ov.Core(), "auto"))


@pytest.fixture(scope="session")
def triton_local(triton_export, triton_precision, tmp_path_factory):
    """What `tiny_cpu` wraps, in this process: the OpenVINO backend on the same export, precision and threads, as a
    numpy (B, C, D, H, W) -> logits callable. Served outputs must equal it."""
    from gmim_hub.inference.openvino_backend import OpenVINOBackend

    backend = OpenVINOBackend(triton_export.onnx_path.parent, precision=triton_precision,
                              cache_dir=tmp_path_factory.mktemp("ov_cache"))
    return lambda x: backend(torch.from_numpy(np.ascontiguousarray(x))).numpy()


@pytest.fixture(scope="session")
def triton_repo(triton_export, tmp_path_factory):
    """tiny, tiny_cpu (OpenVINO, precision auto), tiny_volume, plus `tampered_cpu`: tiny_cpu with one byte appended
    to its ONNX file."""
    triton_repo = tmp_path_factory.mktemp("triton_models")
    write_triton_repository(triton_export.onnx_path.parent, triton_repo)
    tampered = triton_repo / "tampered_cpu"
    shutil.copytree(triton_repo / "tiny_cpu", tampered)
    config = tampered / "config.pbtxt"
    config.write_text(config.read_text().replace('name: "tiny_cpu"', 'name: "tampered_cpu"'))
    with open(tampered / "1" / "model.onnx", "ab") as f:
        f.write(b"\0")
    return triton_repo


@pytest.fixture(scope="session")
def triton_server(triton_repo):
    """One real Triton server for the session; if it cannot start, the tests fail with its log lines."""
    srv = TritonServer(triton_repo, models=["tiny_cpu", "tiny_volume"], http_port=free_port(), grpc_port=free_port(),
                       metrics_port=free_port(), ready_timeout=120, log_path=triton_repo.parent / "tritonserver.log")
    srv.start()
    print(f"\ntritonserver ready in {srv.startup_s:.2f} s")
    yield srv
    assert srv.stop() == 0, srv.error_lines()


@pytest.fixture(scope="session")
def triton_client(triton_server) -> Callable[..., TritonClient]:
    """triton_client(protocol, **kwargs) -> a TritonClient for the session server over HTTP or gRPC."""

    def make(protocol: str, **kwargs) -> TritonClient:
        url = triton_server.http_url if protocol == "http" else triton_server.grpc_url
        return TritonClient(url, protocol=protocol, **kwargs)

    return make


@pytest.fixture(scope="session")
def triton_volume(triton_export, triton_mri) -> np.ndarray:
    """The real MRI volume after the export's preprocessing (1 mm RAS, z-score): (1, 66, 82, 50) float32."""
    from monai.data import MetaTensor

    predictor = Predictor(GMIMConfig.from_dict(triton_export.manifest["config"]), runner=lambda w: w)
    image, affine = load_nifti(triton_mri)
    data = predictor.preprocess({"image": MetaTensor(torch.from_numpy(image), affine=torch.from_numpy(affine))})
    return data["image"].as_tensor().numpy().astype(np.float32)
