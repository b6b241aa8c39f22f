"""One table of bad inputs across the library API, the `gmim` CLI and a real Triton server (issue 7).

Every row names the input, where it enters, and two exact pieces of the expected message: what is wrong and how
to fix it. For every row: the right error type (a `GMIMError` from the library, exit code 2 and exactly one
`error:` line without a traceback from the CLI, a `ServingError` from the client), nothing written to disk (the
files under the test folder are the same before and after, so no partial output), no malicious pickle executed
(its marker file stays absent), and for server rows the server still answers a good request afterwards.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from gmim_hub import PRESETS, GMIMError, ServingError
from gmim_hub.cli.main import app
from gmim_hub.config import GMIMConfig, MaskingConfig
from gmim_hub.engine.checkpoint import load_latest_checkpoint, save_checkpoint
from gmim_hub.export.onnx import OnnxWindowModel
from gmim_hub.inference import Predictor
from gmim_hub.models.hub_models import GMIMForPretraining, GMIMForSegmentation
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

    def nifti(self, data: Any, name: str = "in.nii.gz") -> Path:
        nib.save(nib.Nifti1Image(np.asarray(data, np.float32), np.diag([2.0, 2.0, 2.0, 1.0])), self.tmp / name)
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


def _existing_output(c: Ctx) -> list[str]:
    (c.out / "seg.nii.gz").write_bytes(b"precious")
    return c.predict(c.vol())


def _cfg_file(c: Ctx, edit: Callable[[dict], Any]) -> Path:
    data = PRESETS["tiny"].to_dict()
    edit(data)
    (c.tmp / "cfg.json").write_text(json.dumps(data))
    return c.tmp / "cfg.json"


def _datalist(c: Ctx) -> Path:
    (c.tmp / "dl.json").write_text(json.dumps({"training": [{"image": "scans/ct1.nii.gz", "label": "l.nii.gz"}]}))
    return c.tmp / "dl.json"


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
    Bad("output-not-nifti", "cli", lambda c: ["predict", str(c.vol()), str(c.tmp / "seg.png"), "--model", str(c.model)],
        "seg.png must end in .nii.gz or .nii", "(or be an existing folder)"),
    Bad("existing-output", "cli", _existing_output, "seg.nii.gz already exists", "pass --overwrite"),
    Bad("unknown-backend", "cli", lambda c: [*c.predict(c.vol()), "--backend", "tensorflow"], "got 'tensorflow'",
        "backend must be one of auto, torch, fast, onnx"),
    Bad("onnx-with-torch-backend", "cli", lambda c: [*c.predict(c.vol())[:3], "--onnx", str(c.export), "--backend",
                                                     "torch"],
        "--onnx runs the export on onnxruntime, so it cannot go with --backend torch", "drop one of them"),
    Bad("missing-cli-argument", "usage", lambda c: ["predict"], "Missing argument 'input'.",
        "(see 'gmim predict --help')"),
    Bad("non-integer-cli-value", "usage", lambda c: ["pretrain", "--demo-data", "--steps", "many"],
        "Invalid value for '--steps'", "(see 'gmim pretrain --help')"),
    Bad("unknown-cli-option", "usage", lambda c: [*c.predict(c.vol()), "--frobnicate"],
        "No such option: --frobnicate", "(see 'gmim predict --help')"),
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
    Bad("resume-corrupt-checkpoint", "cli", _corrupt_checkpoint,
        "ckpt-00000002.pt is corrupt (sha256 mismatch: truncated or overwritten)", "resume from an older one"),
    Bad("unreachable-server", "cli", lambda c: ["infer", str(c.vol()), str(c.out / "s.nii.gz"), "--model", "tiny",
                                                "--url", f"127.0.0.1:{free_port()}", "--retries", "0", "--protocol",
                                                "grpc"],
        "cannot reach Triton at grpc://127.0.0.1:", "is `gmim serve` running?"),
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


def _files(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    return GMIMForSegmentation(PRESETS["tiny"]).save_pretrained(tmp_path_factory.mktemp("bad") / "tiny")


def test_the_table_is_large_and_distinct():
    assert len(TABLE) >= 25 and len({b.id for b in TABLE}) == len(TABLE)
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
        result = runner.invoke(app, action)
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
