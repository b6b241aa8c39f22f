"""What gmim writes (issue 12): file modes follow the umask, NIfTI outputs keep the input's header codes and units,
an output is never an input, and a full disk leaves the previous file intact with a one-line message.

Disk full is a real limit the test makes: RLIMIT_FSIZE on a `gmim` subprocess (any user), and a 1 MB tmpfs mount
where the test may mount one (root); the writes see EFBIG / ENOSPC from the kernel, nothing is simulated.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from gmim_hub import PRESETS
from gmim_hub.atomic import atomic_write, write_text
from gmim_hub.cli.main import app
from gmim_hub.engine.checkpoint import save_checkpoint
from gmim_hub.errors import OutputError
from gmim_hub.inference import Predictor
from gmim_hub.models.hub_models import GMIMForSegmentation

pytest_plugins = ["conftest_triton"]
runner = CliRunner(env={"COLUMNS": "250"})
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    return GMIMForSegmentation(PRESETS["tiny"]).save_pretrained(tmp_path_factory.mktemp("out") / "tiny")


@pytest.fixture
def umask_027():
    old = os.umask(0o027)
    yield 0o640
    os.umask(old)


def _mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def _volume(path: Path, *, codes: tuple[int, int] = (1, 1), units: tuple[str, str] = ("mm", "sec"),
            shape: tuple[int, ...] = (20, 24, 22)) -> Path:
    affine = np.array([[-1.5, 0.1, 0, 90], [0.1, 1.5, 0, -120], [0, 0, 2.0, -70], [0, 0, 0, 1]])
    img = nib.Nifti1Image(np.random.default_rng(0).normal(size=shape).astype(np.float32), affine)
    img.set_qform(affine, code=codes[0])
    img.set_sform(affine, code=codes[1])
    img.header.set_xyzt_units(*units)
    nib.save(img, path)
    return path


# ------------------------------------------------------------------------------------------------- file modes
def test_saved_models_checkpoints_and_text_follow_the_umask(umask_027, tmp_path):
    folder = GMIMForSegmentation(PRESETS["tiny"]).save_pretrained(tmp_path / "m")
    ckpt = save_checkpoint(tmp_path / "ck", 1, {"w": torch.ones(3)})
    files = [folder / "config.json", folder / "model.safetensors", folder / "README.md", ckpt,
             Path(str(ckpt) + ".sha256"), write_text(tmp_path / "t.json", "{}")]
    assert {str(f.name): _mode(f) for f in files} == {str(f.name): umask_027 for f in files}


def test_predicted_label_maps_follow_the_umask(umask_027, tiny_dir, tmp_path):
    src = _volume(tmp_path / "in.nii.gz")
    result = runner.invoke(app, ["predict", str(src), str(tmp_path / "seg.nii.gz"), "--model", str(tiny_dir),
                                 "--device", "cpu", "--probabilities"])
    assert result.exit_code == 0, result.output
    assert _mode(tmp_path / "seg.nii.gz") == _mode(tmp_path / "seg_prob.nii.gz") == umask_027


def test_export_manifest_and_triton_files_follow_the_umask(triton_export, tmp_path):
    from gmim_hub.serving.repository import write_triton_repository

    expected = 0o666 & ~_current_umask()
    assert _mode(triton_export.manifest_path) == _mode(triton_export.onnx_path) == expected
    old = os.umask(0o027)
    try:
        files = write_triton_repository(triton_export.onnx_path.parent, tmp_path / "repo")
    finally:
        os.umask(old)
    assert files and {_mode(f) for f in files} == {0o640}


def _current_umask() -> int:
    old = os.umask(0)
    os.umask(old)
    return old


# ----------------------------------------------------------------------------------------------- header codes
@pytest.mark.parametrize("codes,units", [((1, 1), ("mm", "sec")), ((0, 4), ("mm", "unknown")),
                                         ((2, 0), ("mm", "msec")), ((1, 3), ("micron", "sec"))])
def test_label_maps_keep_the_input_header_codes_and_units(codes, units, tmp_path):
    src = _volume(tmp_path / "in.nii.gz", codes=codes, units=units)
    predictor = Predictor(PRESETS["tiny"], lambda w: torch.cat([w, -w], 1))
    written = predictor.predict_file(src, tmp_path / "seg.nii.gz", probabilities=True)
    inp = nib.load(src)
    for path in written:
        out = nib.load(path)
        assert (int(out.header["qform_code"]), int(out.header["sform_code"])) == codes
        assert out.header.get_xyzt_units() == inp.header.get_xyzt_units()
        np.testing.assert_allclose(out.affine, inp.affine, atol=1e-5)
        assert out.shape[:3] == inp.shape


# ------------------------------------------------------------------------------------- an output is never an input
@pytest.mark.parametrize("how", ["same-path", "symlink", "hard-link", "dot-path"])
def test_overwrite_never_replaces_the_input(how, tiny_dir, tmp_path):
    src = _volume(tmp_path / "in.nii.gz")
    before = src.read_bytes()
    out = {"same-path": src, "dot-path": tmp_path / "." / "in.nii.gz", "symlink": tmp_path / "link.nii.gz",
           "hard-link": tmp_path / "hard.nii.gz"}[how]
    if how == "symlink":
        out.symlink_to(src)
    if how == "hard-link":
        os.link(src, out)
    result = runner.invoke(app, ["predict", str(src), str(out), "--model", str(tiny_dir), "--overwrite"])
    assert result.exit_code == 2, result.output
    assert "is the input" in result.stderr and "whatever --overwrite says" in result.stderr
    assert src.read_bytes() == before


def test_a_folder_is_never_predicted_into_itself(tiny_dir, tmp_path):
    _volume(tmp_path / "a.nii.gz")
    result = runner.invoke(app, ["predict", str(tmp_path), str(tmp_path), "--model", str(tiny_dir), "--overwrite"])
    assert result.exit_code == 2 and "is the input folder" in result.stderr, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.nii.gz"]


@pytest.fixture
def read_only_folder(tmp_path):
    """A folder this process cannot write: a read-only tmpfs for root (permissions do not stop root), else 0555."""
    folder = tmp_path / "ro"
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)
        return
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(folder)],
                      capture_output=True).returncode:
        pytest.skip("root here, and mounting a read-only tmpfs is not permitted")
    yield folder
    subprocess.run(["umount", str(folder)], check=True)


def test_a_read_only_output_folder_is_one_line(read_only_folder, tiny_dir, tmp_path):
    src = _volume(tmp_path / "in.nii.gz")
    result = runner.invoke(app, ["predict", str(src), str(read_only_folder / "seg.nii.gz"), "--model",
                                 str(tiny_dir)])
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and f"cannot write into {read_only_folder} (no write permission, or a read-only" in lines[0]
    assert "choose a folder you can write to" in lines[0] and not list(read_only_folder.iterdir())


def test_a_killed_writers_temporary_file_is_not_an_input(tiny_dir, tmp_path):
    scans = tmp_path / "scans"
    scans.mkdir()
    _volume(scans / "a.nii.gz")
    (scans / ".b_seg.nii.gz.tmp-123-abcd.nii.gz").write_bytes(b"half a label map")
    result = runner.invoke(app, ["predict", str(scans), str(tmp_path / "out"), "--model", str(tiny_dir)])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a_seg.nii.gz"]


# ------------------------------------------------------------------------------------------------- disk full
def _limited(args: list[str], limit: int) -> subprocess.CompletedProcess:
    """`args` in a Python subprocess whose files may not grow beyond `limit` bytes (writes then fail with EFBIG).

    The limit is set by a small launcher that then execs Python, not by `preexec_fn`: that forces a plain fork() of
    this test process, whose fork handlers (gRPC's, after the Triton client tests) crashed the whole pytest run."""
    launcher = ("import os, resource, signal, sys\n"
                "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the kernel kills the writer, not write()\n"
                f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))\n"
                "os.execv(sys.executable, [sys.executable, *sys.argv[1:]])\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "250"}
    return subprocess.run([sys.executable, "-c", launcher, *args], capture_output=True, text=True, env=env,
                          timeout=300)


def test_a_file_size_limit_while_predicting_keeps_the_previous_output(tiny_dir, tmp_path):
    src = _volume(tmp_path / "in.nii.gz", shape=(48, 48, 48))
    (tmp_path / "seg.nii.gz").write_bytes(b"the previous label map")
    proc = _limited(["-m", "gmim_hub.cli.main", "predict", str(src), str(tmp_path / "seg.nii.gz"), "--model",
                     str(tiny_dir), "--device", "cpu", "--probabilities", "--overwrite", "--backend", "fast"],
                    limit=64 * 1024)  # fast: no export or compiled-model cache to write first, only the outputs
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "File too large (the disk, a quota or a file-size limit is full)" in lines[0], lines
    assert "nothing was written and what was there before is unchanged" in lines[0]
    assert (tmp_path / "seg.nii.gz").read_bytes() == b"the previous label map"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.nii.gz", "seg.nii.gz"]


def test_a_file_size_limit_while_checkpointing_keeps_the_previous_checkpoint(tmp_path):
    first = save_checkpoint(tmp_path, 1, {"w": torch.ones(10)})
    code = ("import torch; from pathlib import Path; from gmim_hub.engine.checkpoint import save_checkpoint\n"
            "from gmim_hub.errors import OutputError\n"
            f"try: save_checkpoint(Path({str(tmp_path)!r}), 2, {{'w': torch.ones(200_000)}})\n"
            "except OutputError as e: print(e); raise SystemExit(2)\n")
    proc = _limited(["-c", code], limit=100 * 1024)
    assert proc.returncode == 2, proc.stderr
    assert "ckpt-00000002.pt: File too large" in proc.stdout, proc.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == [first.name, first.name + ".sha256"]
    assert torch.load(first, weights_only=True)["w"].shape == (10,)


@pytest.fixture
def tiny_tmpfs(tmp_path):
    """A 1 MB tmpfs mounted under tmp_path (needs root); skipped where mounting is not permitted."""
    mnt = tmp_path / f"fs-{uuid.uuid4().hex[:6]}"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("mounting a tmpfs is not permitted here (the RLIMIT_FSIZE tests cover disk full)")
    yield mnt
    subprocess.run(["umount", str(mnt)], check=True)


def test_a_full_tmpfs_keeps_the_previous_file(tiny_tmpfs):
    target = tiny_tmpfs / "model.safetensors"
    target.write_bytes(b"previous weights")
    with pytest.raises(OutputError) as err, atomic_write(target) as tmp:
        tmp.write_bytes(bytes(2 * 1024 * 1024))
    assert "No space left on device" in str(err.value) and "\n" not in str(err.value)
    assert target.read_bytes() == b"previous weights" and [p.name for p in tiny_tmpfs.iterdir()] == [target.name]
    with pytest.raises(OutputError, match="No space left on device"):
        save_checkpoint(tiny_tmpfs, 3, {"w": torch.ones(500_000)})
    assert [p.name for p in tiny_tmpfs.iterdir()] == [target.name]
