"""One table of bad inputs across the library API, the `gmim` CLI and a real Triton server (issue 7).

Every row names the input, where it enters, and two exact pieces of the expected message: what is wrong and how
to fix it. For every row: the right error type (a `GMIMError` from the library, exit code 2 and exactly one
`error:` line without a traceback from the CLI, a `ServingError` from the client), nothing written to disk (the
files under the test folder, hashed, are the same before and after: no partial output, every input byte-identical),
no malicious pickle executed (its marker file stays absent), and for server rows the server still answers a good
request afterwards. Issue 12 added the rows on outputs that are inputs, options checked before any work, headers,
geometry and memory.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
import torch
from _dicom_series import edit, non_image, small_series
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from gmim_hub import PRESETS, GMIMError, ServingError
from gmim_hub.cli.main import app
from gmim_hub.config import GMIMConfig, MaskingConfig
from gmim_hub.engine.checkpoint import load_latest_checkpoint, save_checkpoint
from gmim_hub.engine.pretrain_setup import Run
from gmim_hub.engine.pretrain_step import forward_step
from gmim_hub.engine.schedule import warmup_cosine_scheduler
from gmim_hub.export.onnx import OnnxWindowModel
from gmim_hub.inference import Predictor
from gmim_hub.inference.openvino_backend import OpenVINOBackend
from gmim_hub.models.hub_models import GMIMForPretraining, GMIMForSegmentation
from gmim_hub.serving.repository import write_triton_repository
from gmim_hub.serving.server import free_port

pytest_plugins = ["conftest_triton"]
runner = CliRunner(env={"COLUMNS": "250"})
REV = "89abcdef0123456789abcdef0123456789abcdef"


class _Payload:
    """Unpickling this object opens (creates) `marker`: a stand-in for code execution."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@dataclass
class Ctx:
    """The test folder (`tmp`), a saved tiny segmenter (`model`), and builders for bad files inside `tmp`."""

    tmp: Path
    model: Path
    export: Path | None = None

    @property
    def marker(self) -> Path:
        return self.tmp / "pwned"

    @property
    def out(self) -> Path:
        (self.tmp / "out").mkdir(exist_ok=True)
        return self.tmp / "out"

    def nifti(self, data: Any, name: str = "in.nii.gz", zooms: tuple[float, float, float] = (2.0, 2.0, 2.0)) -> Path:
        (self.tmp / name).parent.mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(np.asarray(data, np.float32), np.diag([*zooms, 1.0])), self.tmp / name)
        return self.tmp / name

    def raw_header(self, name: str, edit: Callable[[nib.Nifti1Header], Any]) -> Path:
        """A 20^3 volume whose header fields are set by `edit` as they are (nibabel does not tidy them)."""
        hdr = nib.Nifti1Header()
        hdr.set_data_shape((20, 20, 20))
        hdr.set_data_dtype(np.float32)
        edit(hdr)
        nib.save(nib.Nifti1Image(np.ones((20, 20, 20), np.float32), None, header=hdr), self.tmp / name)
        return self.tmp / name

    def link(self, src: Path, name: str, hard: bool = False) -> Path:
        (os.link if hard else os.symlink)(src, self.tmp / name)
        return self.tmp / name

    def vol(self) -> Path:
        """A good 20^3 volume: the bad part of a row is elsewhere."""
        return self.nifti(np.ones((20, 20, 20)), "good.nii.gz")

    def file(self, name: str, content: bytes) -> Path:
        (self.tmp / name).write_bytes(content)
        return self.tmp / name

    def truncated(self, path: Path) -> Path:
        blob = path.read_bytes()
        path.write_bytes(blob[: len(blob) // 2])
        return path

    def evil(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"state_dict": {"swinViT.x": torch.zeros(1)}, "hook": _Payload(self.marker)}, path)
        return path

    def model_copy(self, config: Callable[[dict], Any] | None = None, weights: Callable[[dict], Any] | None = None,
                   truncate: bool = False) -> Path:
        folder = self.tmp / "model"
        shutil.copytree(self.model, folder)
        if truncate:
            self.truncated(folder / "model.safetensors")
        if config is not None:
            data = json.loads((folder / "config.json").read_text())
            config(data)
            (folder / "config.json").write_text(json.dumps(data))
        if weights is not None:
            tensors = load_file(folder / "model.safetensors")
            weights(tensors)
            save_file(tensors, folder / "model.safetensors")
        return folder

    def predict(self, src: Path, *extra: Any, model: Any = None) -> list[str]:
        return ["predict", str(src), str(self.out / "seg.nii.gz"), "--model", str(model or self.model),
                "--device", "cpu", *map(str, extra)]

    def predict_to(self, src: Path, out: Path, *extra: Any) -> list[str]:
        return ["predict", str(src), str(out), "--model", str(self.model), "--device", "cpu", *map(str, extra)]

    def infer(self, src: Path, out: Path | None = None, *extra: Any) -> list[str]:
        """`gmim infer` to a port nothing listens on: every row must fail before a connection is tried."""
        return ["infer", str(src), str(out or self.out / "s.nii.gz"), "--model", "tiny", "--url",
                "127.0.0.1:9", "--retries", "0", *map(str, extra)]

    def folder(self, *names: str) -> Path:
        for name in names:
            self.nifti(np.ones((20, 20, 20)), f"scans/{name}")
        (self.tmp / "scans").mkdir(exist_ok=True)
        return self.tmp / "scans"

    def hub_cache(self, repo: str, files: dict[str, Path]) -> Path:
        """A Hub cache as huggingface_hub writes it: refs/main -> snapshots/<commit>/<files>."""
        root = self.tmp / "hub" / ("models--" + repo.replace("/", "--"))
        (root / "refs").mkdir(parents=True)
        (root / "refs" / "main").write_text(REV)
        (root / "snapshots" / REV).mkdir(parents=True)
        for name, src in files.items():
            shutil.copy(src, root / "snapshots" / REV / name)
        return self.tmp / "hub"


def _tampered_export(c: Ctx) -> Path:
    assert c.export is not None
    folder = c.tmp / "export"
    shutil.copytree(c.export, folder)
    with open(folder / "model.onnx", "ab") as f:
        f.write(b"\0")
    return folder


def _corrupt_checkpoint(c: Ctx) -> list[str]:
    (c.tmp / "imgs").mkdir()
    c.nifti(np.random.default_rng(0).normal(size=(20, 20, 20)), "imgs/a.nii.gz")
    ckpt = c.truncated(save_checkpoint(c.tmp / "run" / "checkpoints", 2, {"w": torch.ones(1000)}))
    PRESETS["tiny"].to_json_file(c.tmp / "cfg.json")
    return ["pretrain", "--data", str(c.tmp / "imgs"), "--config", str(c.tmp / "cfg.json"), "-o", str(c.tmp / "run"),
            "--steps", "2", "--warmup", "0", "--num-workers", "0", "--resume", str(ckpt)]


def _evil_checkpoint(c: Ctx) -> Path:
    """A malicious pickle under a checkpoint's name, with a matching sha256 sidecar (so only unpickling can stop it)."""
    ckpt = c.evil(c.tmp / "ck" / "ckpt-00000001.pt")
    digest = hashlib.sha256(ckpt.read_bytes()).hexdigest()
    (c.tmp / "ck" / "ckpt-00000001.pt.sha256").write_text(f"{digest}  ckpt-00000001.pt\n")
    return ckpt.parent


def _serving_env(c: Ctx, packages: bool) -> list[str]:
    """`gmim serve --setup-env` pointed at a real virtual environment without the server's packages (or a plain
    folder): checked, refused in one line, never modified."""
    env = c.tmp / "server-env"
    if packages:
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env)], check=True)
    else:
        env.mkdir()
    return ["serve", "--setup-env", "--serving-env", str(env)]


def _existing_output(c: Ctx) -> list[str]:
    (c.out / "seg.nii.gz").write_bytes(b"precious")
    return c.predict(c.vol())


def _mri_reference(d: dict) -> None:
    d["data"]["reference"] = {"volumes": 3, "negative_fraction": 0.0, "foreground_fraction": 0.3,
                              "raw_percentiles": [0.0, 0.0, 100.0], "percentiles": [-2.0, 0.0, 2.0], "mean": 0.0,
                              "std": 1.0}


def _zero_sform_column(h: nib.Nifti1Header) -> None:
    h["srow_x"], h["srow_y"], h["srow_z"], h["sform_code"] = [0, 0, 0, 0], [0, 2, 0, 0], [0, 0, 2, 0], 1


def _bad_json_config(c: Ctx) -> Path:
    folder = c.model_copy()
    (folder / "config.json").write_text('{"feature_size": 12,')
    return folder


def _export_exists(c: Ctx) -> list[str]:
    (c.tmp / "exp" / "tiny").mkdir(parents=True)
    (c.tmp / "exp" / "tiny" / "model.onnx").write_bytes(b"an earlier export")
    return ["export", "onnx", str(c.model), "--out-dir", str(c.tmp / "exp")]


def _existing_probabilities(c: Ctx) -> list[str]:
    (c.out / "seg_prob.nii.gz").write_bytes(b"precious")
    return [*c.predict(c.vol()), "--probabilities"]


def _pretrain_run_and_batch_without_masks() -> tuple[Any, dict[str, Any]]:
    """A real pre-training `Run` (tiny model) and a batch from a loader built without `MaskingCollate`."""
    cfg = PRESETS["tiny"]
    model = GMIMForPretraining(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    run = Run(config=cfg, model=model, optimizer=opt, scheduler=warmup_cosine_scheduler(opt, 1, 2), scaler=None,
              device=torch.device("cpu"), precision="fp32",
              train_loader=lambda epoch: None, val_loader=None, val_data=None, train_args={})
    views = torch.zeros(1, 1, *cfg.roi_size)
    return run, {"image": views, "target": views, "mask_grid": [2], "mask_ratios": [torch.full((8,), 0.5)]}


def _cfg_file(c: Ctx, edit: Callable[[dict], Any]) -> Path:
    data = PRESETS["tiny"].to_dict()
    edit(data)
    (c.tmp / "cfg.json").write_text(json.dumps(data))
    return c.tmp / "cfg.json"


def _datalist(c: Ctx) -> Path:
    (c.tmp / "dl.json").write_text(json.dumps({"training": [{"image": "scans/ct1.nii.gz", "label": "l.nii.gz"}]}))
    return c.tmp / "dl.json"


def _series(c: Ctx) -> Path:
    small_series(c.tmp / "s", description="axial")
    return c.tmp / "s"


def _two_series(c: Ctx) -> Path:
    small_series(c.tmp / "s", description="T1")
    small_series(c.tmp / "s", n=5, prefix="B", description="T2")
    return c.tmp / "s"


def _localizer(c: Ctx) -> Path:
    files = small_series(c.tmp / "s")
    edit(files[0], c.tmp / "s" / "scout.dcm", ImageOrientationPatient=[0, 1, 0, 0, 0, -1],
         ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"])
    return c.tmp / "s"


def _missing_slice(c: Ctx) -> Path:
    small_series(c.tmp / "s")[2].unlink()
    return c.tmp / "s"


def _uneven(c: Ctx) -> Path:
    last = small_series(c.tmp / "s")[-1]
    edit(last, ImagePositionPatient=[-60.0, -80.0, -40.0 + 21.0])  # 4 mm steps, then 5 mm
    return c.tmp / "s"


def _tilted(c: Ctx) -> Path:
    for k, path in enumerate(small_series(c.tmp / "s")):  # each slice 1 mm further along y: a 14 degree tilt
        edit(path, ImagePositionPatient=[-60.0, -80.0 + k, -40.0 + 4.0 * k])
    return c.tmp / "s"


def _nrrd(c: Ctx) -> Path:
    import SimpleITK as sitk

    sitk.WriteImage(sitk.GetImageFromArray(np.ones((20, 20, 20), np.float32)), str(c.tmp / "in.nrrd"))
    return c.tmp / "in.nrrd"


def _image_list(c: Ctx) -> Path:
    (c.tmp / "images.json").write_text(json.dumps({"training": [{"image": str(c.vol())}]}))
    return c.tmp / "images.json"


def _train_from_pretrained(c: Ctx, meta: dict[str, Any]) -> list[str]:
    """`gmim train --init PRE` without --config, where PRE is a pre-training model and the datalist has `meta`."""
    pre = GMIMForPretraining(PRESETS["tiny"]).save_pretrained(c.tmp / "pre")
    data = json.loads(_datalist(c).read_text())
    (c.tmp / "dl.json").write_text(json.dumps({**meta, **data}))
    return ["train", "--data", str(c.tmp / "dl.json"), "--init", str(pre), "-o", str(c.tmp / "run"), "--steps", "2"]


def _pop(key: str) -> Callable[[dict], Any]:
    return lambda d: d.pop(key)


def _req(model: str, shape: tuple[int, ...], dtype: Any = np.float32, output: str | None = None,
         **kw: Any) -> Callable[[Any], Any]:
    """A request of zeros of `shape` to `model` (output: the model's own, unless given)."""
    out = output or ("logits" if model != "tiny_volume" else "labels")
    return lambda client: client.infer(model, np.zeros(shape, dtype), out, **kw)


def _rename_key(t: dict) -> None:
    t["out.conv.conv.kernel"] = t.pop("out.conv.conv.weight")


@dataclass(frozen=True)
class Bad:
    id: str
    surface: str  # "api": act(ctx) -> the call; "cli"/"usage": act(ctx) -> argv; "triton": act(client) is the call
    act: Callable[..., Any]
    what: str  # exact text saying what is wrong
    fix: str  # exact text saying how to fix it
    protocol: str = "http"
    bug: str | None = None  # a known bug (strict xfail: the row fails loudly once the bug is fixed)
    env: dict[str, str] | None = None  # extra environment variables for a CLI row


TABLE = [
    # ---------------------------------------------------------------------------- volumes into gmim predict
    Bad("2d-nifti", "cli", lambda c: c.predict(c.nifti(np.zeros((30, 40)))),
        "is 2-D (shape 30x40)", "gmim predict needs a 3-D volume"),
    Bad("4d-wrong-channels", "cli", lambda c: c.predict(c.nifti(np.zeros((20, 20, 20, 3)))),
        "has 3 channel(s) but the model expects 1", "pass a 1-channel volume (a 4-D NIfTI stores channels last)"),
    Bad("nan-voxels", "cli", lambda c: c.predict(c.nifti(np.where(np.eye(20)[:, :, None] > 0, np.nan, np.ones(20)))),
        "contains 400 non-finite voxels (NaN or Inf)", "fix or replace them (e.g. numpy.nan_to_num)"),
    Bad("inf-voxels-api", "api", lambda c: partial(Predictor(PRESETS["tiny"], lambda w: w).predict_volume,
                                                   np.full((1, 8, 8, 8), np.inf)),
        "contains 512 non-finite voxels", "before prediction"),
    Bad("truncated-nii-gz", "cli", lambda c: c.predict(c.truncated(c.nifti(np.ones((40, 40, 40))))),
        "could not read the voxels of", "the file is truncated or corrupt: copy or export it again"),
    Bad("text-as-nifti", "cli", lambda c: c.predict(c.file("notes.nii.gz", b"patient: 12\n")),
        "notes.nii.gz is not a readable NIfTI file", "check the file and its .nii/.nii.gz extension"),
    Bad("png-renamed-nii", "cli", lambda c: c.predict(c.file("scan.nii", b"\x89PNG\r\n\x1a\n" + bytes(400))),
        "scan.nii is not a readable NIfTI file", "check the file and its .nii/.nii.gz extension"),
    Bad("missing-input", "cli", lambda c: c.predict(c.tmp / "nope.nii.gz"), "nope.nii.gz does not exist",
        "check the path"),
    Bad("output-not-a-volume-format", "cli", lambda c: ["predict", str(c.vol()), str(c.tmp / "seg.png"), "--model",
                                                        str(c.model)],
        "seg.png must end in .nii.gz, .nii, .nrrd, .mha or .dcm (DICOM SEG)", "(or be an existing folder)"),
    Bad("existing-output", "cli", _existing_output, "seg.nii.gz already exists", "pass --overwrite"),
    Bad("unknown-backend", "cli", lambda c: [*c.predict(c.vol()), "--backend", "tensorflow"], "got 'tensorflow'",
        "backend must be one of auto, torch, fast, onnx, openvino"),
    Bad("onnx-with-torch-backend", "cli", lambda c: [*c.predict(c.vol())[:3], "--onnx", str(c.export), "--backend",
                                                     "torch"],
        "--onnx runs the export on onnxruntime or OpenVINO, so it cannot go with --backend torch", "drop one of them"),
    Bad("openvino-threads-zero", "cli", lambda c: [*c.predict(c.vol()), "--backend", "openvino", "--threads", "0"],
        "threads must be >= 1 (CPU threads), got 0", "leave it out to use every core"),
    Bad("bf16-on-onnx-backend", "cli", lambda c: [*c.predict(c.vol())[:3], "--onnx", str(c.export), "--backend",
                                                  "onnx", "--precision", "bf16"],
        "precision 'bf16' applies to the torch, fast and openvino backends only",
        "drop --precision or use --backend openvino"),
    Bad("openvino-tampered-onnx", "cli", lambda c: [*c.predict(c.vol())[:3], "--onnx", str(_tampered_export(c)),
                                                    "--backend", "openvino"],
        "but its manifest says", "the file was modified after export; re-export with gmim export onnx"),
    Bad("missing-cli-argument", "usage", lambda c: ["predict"], "Missing argument 'input'.",
        "(see 'gmim predict --help')"),
    Bad("non-integer-cli-value", "usage", lambda c: ["pretrain", "--demo-data", "--steps", "many"],
        "Invalid value for '--steps'", "(see 'gmim pretrain --help')"),
    Bad("unknown-cli-option", "usage", lambda c: [*c.predict(c.vol()), "--frobnicate"],
        "No such option: --frobnicate", "(see 'gmim predict --help')"),
    # ------------------------------------------------------------------ DICOM, NRRD and MetaImage (issue 14)
    Bad("dicom-several-series", "cli", lambda c: c.predict(_two_series(c)),
        "holds 2 DICOM series: ", "pick one with --series UID (series= in Python)"),
    Bad("dicom-series-not-there", "cli", lambda c: [*c.predict(_series(c)), "--series", "1.2.3.4"],
        "has no series 1.2.3.4; it holds ", "(MR 'axial', 6 file(s))"),
    Bad("dicom-localizer-among-slices", "cli", lambda c: c.predict(_localizer(c)),
        "scout.dcm is a localizer with another orientation or size than the other slices", "remove it from the folder"),
    Bad("dicom-missing-slice", "cli", lambda c: c.predict(_missing_slice(c)),
        "1 slice(s) missing between IM0001.dcm and IM0003.dcm (gap 8.00 mm", "export the complete series again"),
    Bad("dicom-uneven-spacing", "cli", lambda c: c.predict(_uneven(c)),
        "has uneven slice spacing (4.00 to 5.00 mm)", "resample it to even spacing first"),
    Bad("dicom-gantry-tilt", "cli", lambda c: c.predict(_tilted(c)),
        "the slices are sheared (14.0 degrees", "not supported: correct the tilt first"),
    Bad("dicom-non-image-object", "cli", lambda c: c.predict(non_image(c.tmp / "sr" / "report.dcm").parent),
        "report.dcm is a DICOM Basic Text SR Storage object, not an image", "pass the folder of the image series"),
    Bad("dicom-seg-from-nifti", "cli", lambda c: ["predict", str(c.vol()), str(c.out / "seg.dcm"), "--model",
                                                  str(c.model)],
        "DICOM SEG output (seg.dcm) needs a DICOM series input", "write .nii.gz, .nrrd or .mha instead"),
    Bad("output-inside-the-series-folder", "cli", lambda c: ["predict", str(_series(c)), str(c.tmp / "s" / "seg.dcm"),
                                                             "--model", str(c.model)],
        "is inside the input series folder", "write it elsewhere"),
    Bad("unknown-output-format", "cli", lambda c: [*c.predict(_series(c)), "--format", "png"],
        "got 'png'", "format must be one of nifti, nrrd, mha, dicom-seg"),
    Bad("truncated-nrrd", "cli", lambda c: c.predict(c.truncated(_nrrd(c))),
        "in.nrrd is not a readable NRRD file", "check the file"),
    # ------------------------------------------------------------------------------- config.json and weights
    Bad("config-unknown-key", "cli", lambda c: c.predict(c.vol(), model=c.model_copy(
        config=lambda d: d["data"].update(colour="red"))), "unknown config key(s) data.colour", "valid keys here:"),
    Bad("config-missing-key", "cli", lambda c: c.predict(c.vol(), model=c.model_copy(config=_pop("depths"))),
        "missing config key(s) depths", "regenerate the file with save_pretrained"),
    Bad("config-wrong-type", "cli", lambda c: c.predict(c.vol(), model=c.model_copy(
        config=lambda d: d.update(feature_size="12"))), "config.json: feature_size", "must be int, got str '12'"),
    Bad("truncated-safetensors", "cli", lambda c: c.predict(c.vol(), model=c.model_copy(truncate=True)),
        "is not a readable safetensors file", "download it again (force_download=True) or re-save the model"),
    Bad("renamed-key-safetensors", "cli", lambda c: c.predict(c.vol(), model=c.model_copy(weights=_rename_key)),
        "1 missing (out.conv.conv.weight); 1 unexpected (out.conv.conv.kernel)", "convert foreign checkpoints"),
    Bad("pickle-only-model-folder", "cli", lambda c: c.predict(c.vol(), model=c.evil(c.tmp / "m" / "pytorch_model.bin")
                                                               .parent),
        "only pickle-based weights (pytorch_model.bin)", "convert them with `gmim convert <file> <out_dir>`"),
    Bad("pickle-file-as-model-api", "api", lambda c: partial(GMIMForSegmentation.from_pretrained,
                                                             c.evil(c.tmp / "w.pt")),
        "w.pt is a file; pass the folder that holds config.json and model.safetensors",
        "convert them with `gmim convert w.pt <out_dir>`"),
    Bad("pickle-only-hub-repo-api", "api", lambda c: partial(
        GMIMForSegmentation.from_pretrained, "org/evil", local_files_only=True, cache_dir=c.hub_cache(
            "org/evil", {"config.json": c.model / "config.json", "pytorch_model.bin": c.evil(c.tmp / "p.bin")})),
        "Hub repo org/evil (cached) has no model.safetensors, only pickle-based weights", "gmim convert"),
    Bad("pickle-checkpoint-api", "api", lambda c: partial(load_latest_checkpoint, _evil_checkpoint(c)),
        "ckpt-00000001.pt (checkpoint ckpt-00000001.pt cannot be read (UnpicklingError", "delete them"),
    Bad("convert-malicious-pickle", "cli", lambda c: ["convert", str(c.evil(c.tmp / "evil.pt")), str(c.tmp / "conv"),
                                                      "--preset", "tiny"],
        "refused to load", "only reads checkpoints with torch.load(weights_only=True)"),
    Bad("repo-id-path-traversal", "cli", lambda c: c.predict(c.vol(), model="org/../../secrets"),
        "'org/../../secrets' is not an existing local directory and not a valid Hub repo id",
        "repo ids look like 'org/name'"),
    Bad("onnx-manifest-sha256-mismatch", "cli", lambda c: [*c.predict(c.vol())[:3], "--onnx", str(_tampered_export(c))],
        "but its manifest says", "the file was modified after export; re-export with gmim export onnx"),
    Bad("openvino-onnx-wrong-window-api", "api", lambda c: partial(OpenVINOBackend(c.export, precision="fp32"),
                                                                   torch.zeros(1, 1, 32, 32, 32)),
        "the OpenVINO model takes windows (B, 1, 64, 64, 64); got shape (1, 1, 32, 32, 32)",
        "use sliding-window prediction (gmim predict)"),
    Bad("triton-cpu-onnxruntime-bf16-api", "api", lambda c: partial(
        write_triton_repository, c.export, c.tmp / "repo", cpu_runtime="onnxruntime", cpu_precision="bf16"),
        "precision bf16 needs runtime openvino", "onnxruntime runs fp32 (use precision auto or fp32)"),
    Bad("onnx-wrong-window-api", "api", lambda c: partial(OnnxWindowModel.from_export(c.export),
                                                          np.zeros((1, 1, 32, 32, 32), np.float32)),
        "this ONNX model was exported for windows of 64x64x64; got 32x32x32", "use sliding-window prediction"),
    # --------------------------------------------------------------------------------- presets and settings
    Bad("ablate-bad-fractions", "cli", lambda c: ["ablate", "-o", str(c.tmp / "abl"), "--fractions", "0.5,half"],
        "--fractions must be comma-separated floats", "such as 0.25,0.5,1"),
    Bad("ablate-unknown-arm", "cli", lambda c: ["ablate", "-o", str(c.tmp / "abl"), "--arms", "gmim,mae"],
        "unknown arm(s) ['mae']", "choose from gmim, uniform, scratch"),
    Bad("unknown-preset", "cli", lambda c: ["convert", str(c.evil(c.tmp / "e.pt")), str(c.tmp / "o"), "--preset",
                                            "huge"], "unknown preset 'huge'", "choose one of base, brats21, ct_abdomen, tiny"),
    Bad("non-divisible-roi", "cli", lambda c: ["export", "onnx", str(c.model), "--roi", "50", "--out-dir",
                                               str(c.tmp / "exp")],
        "got (50, 50, 50)", "roi_size must be three positive multiples of 32"),
    Bad("grid-not-dividing-roi-api", "api", lambda c: partial(GMIMConfig, masking=MaskingConfig(grids=(2, 5)),
                                                              roi_size=(64, 64, 64)),
        "masking.grids [5] do not divide roi_size (64, 64, 64)", "choose grids such as (4, 8, 16)"),
    Bad("mask-ratio-out-of-range", "cli", lambda c: ["pretrain", "--data", str(c.tmp), "--config", str(_cfg_file(
        c, lambda d: d["masking"].update(base_ratio=1.5))), "-o", str(c.tmp / "run")],
        "got 1.5", "masking.base_ratio must be in (0, 1)"),
    Bad("pretrain-batch-without-masks-api", "api",
        lambda c: partial(forward_step, *_pretrain_run_and_batch_without_masks()),
        "the pre-training batch has no 'masks'", "build its loader with collate_fn=MaskingCollate("),
    Bad("mask-ratio-times-scale-api", "api", lambda c: partial(MaskingConfig, base_ratio=0.8, scale=0.5),
        "got 0.8*(1+0.5)", "masking.base_ratio*(1+scale) must be <= 1"),
    Bad("mask-never-at-first-point-api", "api", lambda c: partial(GMIMConfig, masking=MaskingConfig(grids=(8, 32)),
                                                                  roi_size=(64, 64, 64)),
        "insertion point 0 never masks with masking.grids [32]", "use coarser masking.grids, a larger roi_size"),
    Bad("mask-never-at-later-point", "cli", lambda c: ["pretrain", "--data", str(c.tmp), "--config", str(_cfg_file(
        c, lambda d: d["masking"].update(hierarchical_decay=0.05))), "-o", str(c.tmp / "run")],
        "insertion point 2 never masks", "or masking.hierarchical_decay 0 to switch the later points off"),
    Bad("convert-unknown-patch-merging", "cli", lambda c: ["convert", str(c.evil(c.tmp / "e.pt")), str(c.tmp / "o"),
                                                           "--patch-merging", "v3"],
        "patch_merging must be 'legacy', 'merging' or 'mergingv2', got 'v3'", "patch_merging must be"),
    # ---------------------------------------------------------------------------------- datalists and runs
    Bad("missing-datalist", "cli", lambda c: ["pretrain", "--data", str(c.tmp / "nope.json"), "--preset", "tiny",
                                              "-o", str(c.tmp / "run")],
        "datalist source", "pass a dataset.json, a JSON datalist or a folder of NIfTI files"),
    Bad("datalist-missing-image", "cli", lambda c: ["train", "--data", str(_datalist(c)), "--preset", "tiny", "-o",
                                                    str(c.tmp / "run"), "--steps", "2"],
        "scans/ct1.nii.gz (listed in", "fix the path, or pass --base-dir (base_dir= in Python"),
    Bad("train-pretrained-init-without-labels", "cli", lambda c: _train_from_pretrained(c, {}),
        "dl.json's \"labels\" ({\"0\": \"background\", \"1\": ...}), which it does not list",
        "add them, or pass --config with out_channels and data.label_names"),
    Bad("train-pretrained-init-other-channels", "cli", lambda c: _train_from_pretrained(c, {
        "labels": {"0": "background", "1": "tumour"}, "modality": {"0": "T1", "1": "T2"}}),
        "dl.json lists 2 channel(s) (T1, T2) but", "pre-train on your channels, or --init scratch"),
    Bad("train-labels-with-a-gap", "cli", lambda c: _train_from_pretrained(c, {"labels": {"0": "bg", "2": "liver"}}),
        "'labels' must map every index from 0 up to a name", "got {'0': 'bg', '2': 'liver'}"),
    Bad("unknown-cache-mode", "cli", lambda c: ["train", "--demo-data", "-o", str(c.tmp / "run"), "--cache", "ram"],
        "cache must be one of none, memory, disk, got 'ram'", "use --cache memory for datasets that fit in RAM"),
    Bad("cache-dir-is-a-file", "cli", lambda c: ["pretrain", "--data", str(_image_list(c)), "--preset", "tiny", "-o",
                                                 str(c.tmp / "run"), "--cache", "disk", "--cache-dir",
                                                 str(c.file("cache", b"not a folder"))],
        "cache folder", "is a file; pass --cache-dir with a folder"),
    Bad("resume-corrupt-checkpoint", "cli", _corrupt_checkpoint,
        "ckpt-00000002.pt is corrupt (sha256 mismatch: truncated or overwritten)", "resume from an older one"),
    Bad("unreachable-server", "cli", lambda c: ["infer", str(c.vol()), str(c.out / "s.nii.gz"), "--model", "tiny",
                                                "--url", f"127.0.0.1:{free_port()}", "--retries", "0", "--protocol",
                                                "grpc"],
        "cannot reach Triton at grpc://127.0.0.1:", "is `gmim serve` running?"),
    Bad("serving-env-without-packages", "cli", partial(_serving_env, packages=True),
        "server-env is not usable (nvidia-pytriton is not installed; numpy is not installed",
        "fix it or use another environment (--serving-env or $GMIM_SERVING_ENV; without either gmim creates its own)"),
    Bad("serving-env-not-a-venv", "cli", partial(_serving_env, packages=False),
        "server-env is not a Python environment (no bin/python)",
        "pass a virtual environment, or a new folder for gmim to create one in"),
    # ------------------------------------------------ outputs that are inputs, or cannot be written (issue 12)
    Bad("output-is-the-input", "cli", lambda c: c.predict_to(c.vol(), c.vol(), "--overwrite"),
        "good.nii.gz is the input", "whatever --overwrite says: choose another output name"),
    Bad("output-is-a-symlink-to-the-input", "cli", lambda c: c.predict_to(c.vol(), c.link(c.vol(), "l.nii.gz"),
                                                                          "--overwrite"),
        "l.nii.gz is the input", "gmim never writes over its input"),
    Bad("output-is-a-hard-link-to-the-input", "cli", lambda c: c.predict_to(c.vol(), c.link(c.vol(), "h.nii",
                                                                                            hard=True), "--overwrite"),
        "h.nii is the input", "gmim never writes over its input"),
    Bad("output-folder-is-the-input-folder", "cli", lambda c: c.predict_to(c.folder("a.nii.gz"), c.tmp / "scans",
                                                                           "--overwrite"),
        "scans is the input folder", "choose another output folder"),
    Bad("two-inputs-one-output", "cli", lambda c: c.predict_to(c.folder("a.nii", "a.nii.gz"), c.out),
        "would both be written to", "rename one of them or predict them separately"),
    Bad("output-parent-is-a-file", "cli", lambda c: c.predict_to(c.vol(), c.file("notes.txt", b"x") / "seg.nii.gz"),
        "notes.txt is a file, not a folder", "choose an output inside a folder"),
    Bad("output-grandparent-is-a-file", "cli", lambda c: c.predict_to(c.vol(), c.file("n.txt", b"x") / "a" / "s.nii"),
        "n.txt is a file, not a folder", "choose an output inside a folder"),
    Bad("folder-input-file-output", "cli", lambda c: c.predict_to(c.folder("a.nii.gz"), c.file("o.nii.gz", b"x")),
        "is a folder, so OUTPUT must be a folder", "o.nii.gz is a file"),
    Bad("input-folder-without-niftis", "cli", lambda c: c.predict_to(c.folder(), c.out),
        "no .nii, .nii.gz, .nrrd, .mha, .mhd files or DICOM series folders in", "scans"),
    Bad("existing-probabilities-output", "cli", _existing_probabilities, "seg_prob.nii.gz already exists",
        "pass --overwrite"),
    Bad("infer-output-is-the-input", "cli", lambda c: c.infer(c.vol(), c.vol(), "--overwrite"),
        "good.nii.gz is the input", "whatever --overwrite says"),
    Bad("infer-output-parent-is-a-file", "cli", lambda c: c.infer(c.vol(), c.file("t.txt", b"x") / "s.nii.gz"),
        "t.txt is a file, not a folder", "choose an output inside a folder"),
    Bad("export-out-dir-under-a-file", "cli", lambda c: ["export", "onnx", str(c.model), "--out-dir",
                                                         str(c.file("e.txt", b"x") / "exp")],
        "e.txt/exp/tiny: Not a directory", "check the path (a file where a folder is needed, or the reverse?)"),
    Bad("pretrain-output-is-a-file", "cli", lambda c: ["pretrain", "--data", str(c.folder("a.nii.gz")), "-o",
                                                       str(c.file("run.txt", b"x")), "--preset", "tiny", "--steps",
                                                       "1", "--warmup", "0", "--num-workers", "0"],
        "run.txt is a file", "pass a folder for the run (it is created when missing)"),
    Bad("train-output-under-a-file", "cli", lambda c: ["train", "--data", str(_datalist(c)), "--preset", "tiny", "-o",
                                                       str(c.file("t.txt", b"x") / "run"), "--steps", "2"],
        "t.txt is a file", "pass a folder for the run (it is created when missing)"),
    Bad("export-existing", "cli", _export_exists, "tiny/model.onnx already exists",
        "pass overwrite=True (--overwrite) or another --name"),
    # -------------------------------------------------- options, checked before a model is loaded (issue 12)
    Bad("threads-negative", "cli", lambda c: [*c.predict(c.vol()), "--threads", "-1"],
        "threads must be >= 1 (CPU threads), got -1", "leave it out to use every core"),
    Bad("threads-zero", "cli", lambda c: [*c.predict(c.vol()), "--threads", "0"],
        "threads must be >= 1 (CPU threads), got 0", "leave it out to use every core"),
    Bad("sw-batch-size-zero", "cli", lambda c: [*c.predict(c.vol()), "--sw-batch-size", "0"],
        "sw_batch_size must be >= 1", "got 0"),
    Bad("overlap-one", "cli", lambda c: [*c.predict(c.vol()), "--overlap", "1"], "overlap must be in [0, 1)",
        "got 1.0"),
    Bad("overlap-negative", "cli", lambda c: [*c.predict(c.vol()), "--overlap", "-0.5"],
        "overlap must be in [0, 1)", "got -0.5"),
    Bad("max-memory-negative", "cli", lambda c: [*c.predict(c.vol()), "--max-memory-gb", "-1"],
        "--max-memory-gb must be a positive number of GB", "got -1.0"),
    Bad("max-memory-env-not-a-number", "cli", lambda c: c.predict(c.vol()), "GMIM_MAX_MEMORY_GB must be a number",
        "of GB, got 'lots'", env={"GMIM_MAX_MEMORY_GB": "lots"}),
    Bad("unknown-precision", "cli", lambda c: [*c.predict(c.vol()), "--precision", "fp8"],
        "precision must be one of auto, fp32, bf16", "got 'fp8'"),
    Bad("bf16-with-onnx", "cli", lambda c: [*c.predict(c.vol()), "--backend", "onnx", "--precision", "bf16"],
        "precision 'bf16' applies to the torch, fast and openvino backends only", "drop --precision or use --backend openvino"),
    Bad("unknown-device", "cli", lambda c: [*c.predict(c.vol()), "--device", "tpu"],
        "device must be 'cpu' or 'cuda'", "got 'tpu'"),
    Bad("no-model", "cli", lambda c: c.predict(c.vol())[:3], "pass --model DIR_OR_REPO",
        "(or --onnx EXPORT for the onnx and openvino backends)"),
    Bad("missing-model-folder", "cli", lambda c: c.predict(c.vol(), model=c.tmp / "nomodel"),
        "nomodel' is not an existing local directory", "for a local folder check the path exists"),
    Bad("onnx-backend-on-a-model-folder", "cli", lambda c: [*c.predict(c.vol()), "--backend", "onnx"],
        "no ONNX export manifest at", "export one with `gmim export onnx MODEL`"),
    Bad("infer-unknown-mode", "cli", lambda c: c.infer(c.vol(), None, "--mode", "batch"),
        "mode must be 'volume' or 'window'", "got 'batch'"),
    Bad("infer-unknown-protocol", "cli", lambda c: c.infer(c.vol(), None, "--protocol", "ftp"),
        "--protocol must be http or grpc", "got 'ftp'"),
    Bad("infer-concurrency-zero", "cli", lambda c: c.infer(c.vol(), None, "--concurrency", "0"),
        "concurrency must be >= 1", "got 0"),
    Bad("infer-overlap-one", "cli", lambda c: c.infer(c.vol(), None, "--overlap", "1"),
        "overlap must be in [0, 1)", "got 1.0"),
    Bad("infer-batch-size-zero", "cli", lambda c: c.infer(c.vol(), None, "--batch-size", "0"),
        "batch_size must be >= 1", "got 0"),
    Bad("infer-max-memory-zero", "cli", lambda c: c.infer(c.vol(), None, "--max-memory-gb", "0"),
        "--max-memory-gb must be a positive number of GB", "got 0.0"),
    Bad("export-bad-name", "cli", lambda c: ["export", "onnx", str(c.model), "--out-dir", str(c.tmp / "e"), "--name",
                                             "a/b"], "export name must be letters, digits", "got 'a/b'"),
    Bad("export-max-batch-zero", "cli", lambda c: ["export", "onnx", str(c.model), "--out-dir", str(c.tmp / "e"),
                                                   "--max-batch", "0"], "max_batch must be >= 1", "got 0"),
    Bad("export-old-opset", "cli", lambda c: ["export", "onnx", str(c.model), "--out-dir", str(c.tmp / "e"),
                                              "--opset", "13"], "opset must be >= 17 (LayerNormalization)", "got 13"),
    Bad("train-zero-steps", "cli", lambda c: ["train", "--data", str(_datalist(c)), "--preset", "tiny", "-o",
                                              str(c.tmp / "run"), "--steps", "0"], "steps must be an int >= 1", "got 0"),
    Bad("pretrain-warmup-not-below-steps", "cli", lambda c: ["pretrain", "--data", str(c.folder("a.nii.gz")), "-o",
                                                             str(c.tmp / "run"), "--preset", "tiny", "--steps", "1"],
        "warmup must be < steps", "lower --warmup or raise --steps"),
    Bad("serve-missing-repository", "cli", lambda c: ["serve", str(c.tmp / "norepo")],
        "model repository", "not found; write one with `gmim export triton`"),
    Bad("evaluate-missing-datalist", "cli", lambda c: ["evaluate", str(c.model), "--data", str(c.tmp / "no.json")],
        "datalist source", "pass a dataset.json, a JSON datalist or a folder of NIfTI files"),
    Bad("push-missing-folder", "cli", lambda c: ["push", str(c.tmp / "nofolder"), "org/name"],
        "no folder at", "pass a folder written by save_pretrained or gmim convert"),
    # ------------------------------------------------------------ headers, geometry, models (issue 12)
    Bad("voxels-in-cm-as-mm", "cli", lambda c: c.predict(c.nifti(np.ones((20, 20, 20)), zooms=(1000.0,) * 3)),
        "predicting it needs about 256000.0 GB (20x20x20 voxels of 1000 x 1000 x 1000 mm resampled to 1 x 1 x 1 mm "
        "is 20000x20000x20000), more than the limit of", "raise the limit with --max-memory-gb N (or "
        "GMIM_MAX_MEMORY_GB=N)"),
    Bad("memory-limit-from-the-environment", "cli", lambda c: c.predict(c.vol()), "more than the limit of 0.0 GB "
        "(GMIM_MAX_MEMORY_GB)", "check the voxel sizes in its header", env={"GMIM_MAX_MEMORY_GB": "0.00001"}),
    Bad("zero-voxel-size", "cli", lambda c: c.predict(c.raw_header("z.nii", _zero_sform_column)),
        "the header gives voxel sizes 0 x 2 x 2 mm", "fix pixdim (or the qform/sform)"),
    Bad("nan-in-sform", "cli", lambda c: c.predict(c.raw_header("n.nii", lambda h: (h.__setitem__(
        "srow_x", [np.nan, 0, 0, 0]), h.__setitem__("sform_code", 1)))),
        "the header gives voxel sizes nan x", "they must be finite and > 0"),
    Bad("5d-nifti", "cli", lambda c: c.predict(c.nifti(np.ones((20, 20, 20, 1, 2)))),
        "is 5-D (shape 20x20x20x1x2)", "needs a 3-D volume, or 4-D with the channels last"),
    Bad("empty-file", "cli", lambda c: c.predict(c.file("empty.nii.gz", b"")),
        "empty.nii.gz is not a readable NIfTI file", "check the file and its .nii/.nii.gz extension"),
    Bad("ct-into-an-mri-model-strict", "cli", lambda c: c.predict(c.nifti(np.full((20, 20, 20), -1000.0)),
                                                                   "--strict-input",
                                                                   model=c.model_copy(config=_mri_reference)),
        "does not look like the model's training data (MRI, 3 volume(s)): 0% of voxels negative expected, 100% seen",
        "pass a MRI volume like the training data, or drop --strict-input to predict anyway"),
    Bad("config-not-json", "cli", lambda c: c.predict(c.vol(), model=_bad_json_config(c)),
        "config.json is not valid JSON", "fix or regenerate it"),
    Bad("config-unknown-modality", "cli", lambda c: c.predict(c.vol(), model=c.model_copy(
        config=lambda d: d["data"].update(modality="PET"))), "data.modality must be one of 'CT', 'MRI'", "got 'PET'"),
    # ----------------------------------------------------------------------------- requests to a real server
    Bad("triton-wrong-dtype", "triton", _req("tiny_cpu", (1, 1, 64, 64, 64), np.int32),
        "input 'image' data-type is 'INT32'", "but model 'tiny_cpu' expects 'FP32'", "grpc"),
    Bad("triton-wrong-shape", "triton", _req("tiny_cpu", (1, 1, 32, 32, 32)),
        "unexpected shape for input 'image' for model 'tiny_cpu'", "Expected [-1,1,64,64,64], got [1,1,32,32,32]"),
    Bad("triton-batch-too-large", "triton", _req("tiny_cpu", (5, 1, 64, 64, 64)),
        "batch-size must be <= 4", "for 'tiny_cpu'", "grpc"),
    Bad("triton-wrong-input-name", "triton", _req("tiny_cpu", (1, 1, 64, 64, 64), input_name="img"),
        "unexpected inference input 'img' for model 'tiny_cpu'", "tiny_cpu takes input(s) 'image' and returns 'logits'",
        "grpc"),
    Bad("triton-wrong-output-name", "triton", _req("tiny_volume", (1, 8, 8, 8), output="probs"),
        "unexpected inference output 'probs'", "tiny_volume takes input(s) 'image' and returns 'labels'"),
    Bad("triton-unknown-model", "triton", _req("tiny_gpu", (1, 1, 64, 64, 64)),
        "Request for unknown model: 'tiny_gpu' is not found", "tiny_cpu, tiny_volume", "grpc"),
    Bad("triton-volume-without-channel-axis", "triton", _req("tiny_volume", (40, 40, 40)),
        "unexpected shape for input 'image' for model 'tiny_volume'", "Expected [1,-1,-1,-1], got [40,40,40]"),
    Bad("triton-volume-uint8", "triton", _req("tiny_volume", (1, 9, 9, 9), np.uint8),
        "data-type is 'UINT8'", "but model 'tiny_volume' expects 'FP32'", "grpc"),
    Bad("triton-overlap-not-a-number", "triton", _req("tiny_volume", (1, 9, 9, 9), parameters={"overlap": "half"}),
        "request parameter overlap must be a number in [0, 1)", "got 'half'"),
]


def _files(root: Path) -> dict[str, str]:
    """Every path under `root`: the sha256 of a file's bytes, 'folder' or 'link -> target'."""
    def state(p: Path) -> str:
        if p.is_symlink():
            return f"link -> {os.readlink(p)}"
        return "folder" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()

    return {str(p.relative_to(root)): state(p) for p in sorted(root.rglob("*"))}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    return GMIMForSegmentation(PRESETS["tiny"]).save_pretrained(tmp_path_factory.mktemp("bad") / "tiny")


def test_the_table_is_large_and_distinct():
    assert len(TABLE) >= 80 and len({b.id for b in TABLE}) == len(TABLE)
    assert {b.surface for b in TABLE} == {"api", "cli", "usage", "triton"}


@pytest.mark.parametrize("bad", [pytest.param(b, id=b.id, marks=[pytest.mark.xfail(strict=True, reason=b.bug)]
                                              if b.bug else []) for b in TABLE])
def test_bad_input(bad: Bad, tiny_dir, tmp_path, request):
    ctx = Ctx(tmp_path, tiny_dir)
    if "onnx" in bad.id:
        ctx.export = request.getfixturevalue("triton_export").onnx_path.parent
    if bad.surface == "triton":
        _check_server_row(bad, request)
        return
    action = bad.act(ctx)  # builds the bad files; returns the argv (CLI) or the call (API)
    before = _files(tmp_path)
    if bad.surface == "api":
        with pytest.raises(GMIMError) as err:
            action()
        message = str(err.value)
        assert "\n" not in message, message
    else:
        result = runner.invoke(app, action, env=bad.env)
        assert result.exit_code == 2, result.output
        assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
        assert "Traceback" not in result.output
        message = result.stderr
        lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr  # usage errors too
        assert not result.stdout.strip(), result.stdout
    assert bad.what in message and bad.fix in message, message
    assert not ctx.marker.exists(), "a pickle payload ran"
    assert _files(tmp_path) == before, "the failed call left files behind"


def _check_server_row(bad: Bad, request) -> None:
    server = request.getfixturevalue("triton_server")
    with request.getfixturevalue("triton_client")(bad.protocol, retries=0) as client:
        with pytest.raises(ServingError) as err:
            bad.act(client)
        message = str(err.value)
        assert bad.what in message and bad.fix in message and "\n" not in message, message
        assert client.infer("tiny_volume", np.ones((1, 8, 8, 8), np.float32), "labels").shape == (8, 8, 8)
    assert server.running()


# --------------------------------------------------------------------- inputs that must work, not fail
def test_volume_smaller_than_the_window_is_padded_and_keeps_its_geometry(tiny_dir, tmp_path):
    ctx = Ctx(tmp_path, tiny_dir)
    src = ctx.nifti(np.random.default_rng(0).normal(size=(20, 30, 25)))
    result = runner.invoke(app, ctx.predict(src))
    assert result.exit_code == 0, result.output
    out = nib.load(ctx.out / "seg.nii.gz")
    assert out.shape == (20, 30, 25) and np.allclose(out.affine, nib.load(src).affine)
    assert sorted(p.name for p in ctx.out.iterdir()) == ["seg.nii.gz"]


def test_corrupt_newest_checkpoint_falls_back_with_a_warning(tmp_path, caplog):
    for step in (1, 2):
        save_checkpoint(tmp_path, step, {"step": step, "w": torch.full((100,), float(step))})
    Ctx(tmp_path, tmp_path).truncated(tmp_path / "ckpt-00000002.pt")
    (tmp_path / "ckpt-00000003.pt.tmp").write_bytes(b"half a checkpoint")  # a save killed mid-write
    path, state = load_latest_checkpoint(tmp_path)
    assert path.name == "ckpt-00000001.pt" and state["step"] == 1
    assert ("checkpoint ckpt-00000002.pt is corrupt (sha256 mismatch: truncated or overwritten); falling back to "
            "ckpt-00000001.pt") in caplog.text
    assert not (tmp_path / "ckpt-00000003.pt.tmp").exists()


# ------------------------------------------------------------------------------------- untrusted weights
def test_the_malicious_payload_is_live(tmp_path):
    """Control for the pickle rows: the same file *does* run code when unpickled without weights_only."""
    ctx = Ctx(tmp_path, tmp_path)
    torch.load(ctx.evil(tmp_path / "evil.pt"), weights_only=False)
    assert ctx.marker.exists()
    ctx.marker.unlink()
    pickle.loads(pickle.dumps(_Payload(ctx.marker)))
    assert ctx.marker.exists()


def test_exports_and_model_cards_record_the_resolved_revision(tiny_dir, tmp_path, monkeypatch):
    from huggingface_hub import constants

    from gmim_hub.export.onnx import _resolve_model

    torch.manual_seed(0)
    pre = GMIMForPretraining(PRESETS["tiny"]).save_pretrained(tmp_path / "pre")
    ctx = Ctx(tmp_path, tiny_dir)
    ctx.hub_cache("org/seg", {n: tiny_dir / n for n in ("config.json", "model.safetensors")})
    cache = ctx.hub_cache("org/pre", {n: pre / n for n in ("config.json", "model.safetensors")})
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    _, source = _resolve_model("org/seg", None)  # what `gmim export onnx org/seg` writes as the manifest's source
    assert source == {"model": "org/seg", "revision": REV}
    seg = GMIMForSegmentation.from_pretrained_encoder("org/pre")
    card = (seg.save_pretrained(tmp_path / "ft") / "README.md").read_text()
    assert f"Fine-tuned from `org/pre` at revision `{REV}`." in card and "base_model: org/pre" in card
    loaded = GMIMForSegmentation.from_pretrained("org/seg")
    loaded.base_model = "org/seg"  # fine-tuning from a segmentation repo records it like this (engine/finetune)
    card = (loaded.save_pretrained(tmp_path / "ft2") / "README.md").read_text()
    assert f"Fine-tuned from `org/seg` at revision `{REV}`." in card
