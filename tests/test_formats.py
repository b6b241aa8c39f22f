"""Hospital formats, checked against outside tools: DICOM series read like dcm2niix reads them (same voxels, same
world geometry) in several layouts built from real volumes; every DICOM SEG written passes dciodvfy and, read back
with highdicom, holds the model's segments on the source frames with the labels of the NIfTI prediction; NRRD and
MetaImage read and written like NIfTI (SimpleITK's own NIfTI reader is the reference)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
import torch
from _dicom_series import (
    COLIN27,
    LAYOUTS,
    Layout,
    dciodvfy,
    dcm2niix,
    expected_stored,
    real_volume,
    write_enhanced,
    write_series,
)
from typer.testing import CliRunner

from gmim_hub import PRESETS, DataConfig
from gmim_hub.cli.main import app
from gmim_hub.inference.formats import other_volume_shape
from gmim_hub.inference.io import load_volume, save_niftis_atomic
from gmim_hub.models.hub_models import GMIMForSegmentation

runner = CliRunner(env={"COLUMNS": "250"})
LABELS = ("background", "grey matter", "white matter")


def _canonical(image: np.ndarray, affine: np.ndarray) -> nib.Nifti1Image:
    return nib.as_closest_canonical(nib.Nifti1Image(np.asarray(image, np.float64), affine))


def _assert_same_as_dcm2niix(series: Path, tmp: Path, truth: np.ndarray | None = None) -> None:
    ours = load_volume(series)
    assert ours.image.shape[0] == 1 and ours.dicom is not None
    assert other_volume_shape(series) == ours.image.shape  # from the headers alone
    ref = nib.as_closest_canonical(dcm2niix(series.parent if series.is_file() else series, tmp / "dcm2niix"))
    mine = _canonical(ours.image[0], ours.affine)
    assert mine.shape == ref.shape
    np.testing.assert_allclose(mine.affine, ref.affine, atol=1e-4)  # world geometry, RAS mm
    np.testing.assert_array_equal(mine.get_fdata(), ref.get_fdata())  # voxels (dcm2niix: scl_slope/inter applied)
    if truth is not None:
        np.testing.assert_array_equal(ours.image[0], truth)


@pytest.fixture(scope="module")
def mni_small() -> np.ndarray:
    return real_volume("mni152")


@pytest.mark.parametrize("layout", LAYOUTS, ids=[lay.name for lay in LAYOUTS])
def test_series_reads_like_dcm2niix(layout: Layout, mni_small, tmp_path):
    write_series(tmp_path / "series", mni_small, layout)
    _assert_same_as_dcm2niix(tmp_path / "series", tmp_path, truth=expected_stored(mni_small, layout))


def test_enhanced_multiframe_reads_like_dcm2niix(mni_small, tmp_path):
    flipped = next(lay for lay in LAYOUTS if lay.reverse_files)
    slices = write_series(tmp_path / "classic", mni_small, flipped)
    mf = write_enhanced(tmp_path / "enhanced" / "mf.dcm", slices)
    assert int(pydicom.dcmread(mf, stop_before_pixels=True).NumberOfFrames) == mni_small.shape[2]
    _assert_same_as_dcm2niix(mf, tmp_path, truth=expected_stored(mni_small, flipped))


def test_colin27_series_reads_like_dcm2niix(tmp_path):
    if not COLIN27.is_file():
        pytest.skip(f"{COLIN27} not installed (Debian package mricron-data)")
    volume = real_volume("colin27", shape=(48, 56, 40))
    write_series(tmp_path / "series", volume, LAYOUTS[2])  # sagittal
    _assert_same_as_dcm2niix(tmp_path / "series", tmp_path, truth=volume)


@pytest.mark.parametrize("suffix", [".nrrd", ".mha", ".mhd"])
def test_nrrd_and_metaimage_read_like_nifti(suffix, tmp_path):
    """SimpleITK converts a real NIfTI (an LAS MRI from nibabel's test data) to NRRD/MHA with its own NIfTI reader;
    reading that file must give nibabel's voxels and affine."""
    src = Path(nib.__file__).parent / "tests" / "data" / "anatomical.nii"
    sitk.WriteImage(sitk.ReadImage(str(src)), str(tmp_path / f"a{suffix}"))
    ours = load_volume(tmp_path / f"a{suffix}")
    assert other_volume_shape(tmp_path / f"a{suffix}") == ours.image.shape
    ref = nib.load(str(src))
    np.testing.assert_allclose(ours.affine, ref.affine, atol=1e-4)
    np.testing.assert_array_equal(ours.image[0], np.asarray(ref.dataobj, np.float32))


# ------------------------------------------------------------------------------------------ predictions
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A seeded tiny 3-class segmenter with label names, on the native grid (one 64^3 window per test volume)."""
    cfg = dataclasses.replace(PRESETS["tiny"], out_channels=3,
                              data=DataConfig(spacing=None, intensity="minmax", label_names=LABELS))
    torch.manual_seed(3)
    return GMIMForSegmentation(cfg).save_pretrained(tmp_path_factory.mktemp("fmt") / "tiny3")


def _predict(src: Path, out: Path, model: Path, *extra: str) -> None:
    result = runner.invoke(app, ["predict", str(src), str(out), "--model", str(model), "--device", "cpu",
                                 "--backend", "torch", *extra])
    assert result.exit_code == 0, result.output


def _check_seg(seg_path: Path, series_files: list[Path], nifti: nib.Nifti1Image) -> None:
    """dciodvfy finds no error; highdicom reads one segment per class with the model's names and the algorithm,
    frames that reference every source instance, and per source frame the labels of the NIfTI prediction at that
    frame's world position."""
    import highdicom as hd

    assert dciodvfy(seg_path) == []
    seg = hd.seg.segread(seg_path)
    sources = [pydicom.dcmread(p) for p in series_files]
    assert seg.SeriesInstanceUID != sources[0].SeriesInstanceUID
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == sources[0].SeriesInstanceUID
    assert seg.FrameOfReferenceUID == sources[0].FrameOfReferenceUID
    assert [s.SegmentLabel for s in seg.SegmentSequence] == list(LABELS[1:])
    algo = seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
    assert algo.AlgorithmName == "tiny3" and "gmim-hub" in seg.SoftwareVersions + algo.AlgorithmVersion
    labels = np.asarray(nifti.dataobj)
    inverse = np.linalg.inv(nifti.affine)
    multiframe = len(sources) == 1
    frames = range(int(sources[0].NumberOfFrames)) if multiframe else range(len(sources))
    for i in frames:
        ds = sources[0] if multiframe else sources[i]
        opts = {"combine_segments": True, "skip_overlap_checks": True}
        got = (seg.get_pixels_by_source_frame(ds.SOPInstanceUID, [i + 1], **opts) if multiframe
               else seg.get_pixels_by_source_instance([ds.SOPInstanceUID], **opts))[0]
        expected = _plane(labels, inverse, ds, i if multiframe else None, *got.shape)
        np.testing.assert_array_equal(got, expected)


def _frame_position(ds, index: int | None) -> np.ndarray:
    if index is None:
        return np.asarray(ds.ImagePositionPatient, float)
    return np.asarray(ds.PerFrameFunctionalGroupsSequence[index].PlanePositionSequence[0].ImagePositionPatient, float)


def _plane(labels: np.ndarray, inverse: np.ndarray, ds, index: int | None, rows: int, cols: int) -> np.ndarray:
    """The NIfTI labels at the world positions of a source frame's pixels (nearest voxel)."""
    if index is None:
        ori, spacing = ds.ImageOrientationPatient, ds.PixelSpacing
    else:
        shared = ds.SharedFunctionalGroupsSequence[0]
        ori = shared.PlaneOrientationSequence[0].ImageOrientationPatient
        spacing = shared.PixelMeasuresSequence[0].PixelSpacing
    ori = np.asarray(ori, float)
    r, c = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    lps = (_frame_position(ds, index)[None, None] + c[..., None] * float(spacing[1]) * ori[:3]
           + r[..., None] * float(spacing[0]) * ori[3:])
    ras = lps * np.array([-1.0, -1.0, 1.0])
    ijk = np.rint(ras @ inverse[:3, :3].T + inverse[:3, 3]).astype(int)
    return labels[ijk[..., 0], ijk[..., 1], ijk[..., 2]]


@pytest.mark.parametrize("layout", [LAYOUTS[1], LAYOUTS[4]], ids=["flipped-order", "oblique"])
def test_gmim_predict_series_to_dicom_seg_and_nifti(layout, mni_small, model_dir, tmp_path):
    files = write_series(tmp_path / "series", mni_small, layout)
    _predict(tmp_path / "series", tmp_path / "out.nii.gz", model_dir)
    _predict(tmp_path / "series", tmp_path / "out.dcm", model_dir)
    nifti = nib.load(str(tmp_path / "out.nii.gz"))
    assert nifti.shape == (mni_small.shape[0], mni_small.shape[1], mni_small.shape[2])
    assert len(np.unique(np.asarray(nifti.dataobj))) > 1, "a test of one class would not check placement"
    _check_seg(tmp_path / "out.dcm", files, nifti)


def test_enhanced_multiframe_to_dicom_seg(mni_small, model_dir, tmp_path):
    slices = write_series(tmp_path / "classic", mni_small, LAYOUTS[0])
    mf = write_enhanced(tmp_path / "enhanced" / "mf.dcm", slices)
    _predict(mf, tmp_path / "out.nii.gz", model_dir)
    _predict(mf, tmp_path / "seg.dcm", model_dir, "--format", "dicom-seg", "--probabilities")
    _check_seg(tmp_path / "seg.dcm", [mf], nib.load(str(tmp_path / "out.nii.gz")))
    probs = nib.load(str(tmp_path / "seg_prob.nii.gz"))  # a SEG holds labels; probabilities go beside it as NIfTI
    assert probs.shape == (*mni_small.shape, 3)
    np.testing.assert_allclose(probs.affine, nib.load(str(tmp_path / "out.nii.gz")).affine)


def test_nrrd_and_mha_outputs_carry_the_nifti_labels_and_geometry(mni_small, model_dir, tmp_path):
    """One prediction (CLI, to .nrrd) and the same labels written by the library to .nii.gz and .mha."""
    write_series(tmp_path / "series", mni_small, LAYOUTS[4])  # oblique: the direction matrix is not diagonal
    outputs = [tmp_path / n for n in ("out.nii.gz", "out.nrrd", "out.mha")]
    _predict(tmp_path / "series", outputs[1], model_dir)
    loaded = load_volume(tmp_path / "series")
    save_niftis_atomic([(outputs[0], read_itk_labels(outputs[1])), (outputs[2], read_itk_labels(outputs[1]))],
                       loaded.affine)
    ref = sitk.ReadImage(str(outputs[0]))  # SimpleITK's NIfTI reader, not our affine conversion
    for out in outputs[1:]:
        img = sitk.ReadImage(str(out))
        np.testing.assert_array_equal(sitk.GetArrayFromImage(img), sitk.GetArrayFromImage(ref))
        np.testing.assert_allclose(img.GetOrigin(), ref.GetOrigin(), atol=1e-4)
        np.testing.assert_allclose(img.GetSpacing(), ref.GetSpacing(), atol=1e-5)
        np.testing.assert_allclose(img.GetDirection(), ref.GetDirection(), atol=1e-5)


def read_itk_labels(path: Path) -> np.ndarray:
    return np.ascontiguousarray(np.transpose(sitk.GetArrayFromImage(sitk.ReadImage(str(path))), (2, 1, 0)))


def test_folder_mode_takes_any_mix_and_never_touches_inputs(mni_small, model_dir, tmp_path):
    src = tmp_path / "in"
    write_series(src / "series_a", mni_small, LAYOUTS[0])
    affine = np.diag([3.5, 3.0, 4.0, 1.0])
    nib.save(nib.Nifti1Image(mni_small.astype(np.float32), affine), str(src / "b.nii.gz"))
    sitk.WriteImage(sitk.ReadImage(str(src / "b.nii.gz")), str(src / "c.nrrd"))
    before = {p: p.stat().st_mtime_ns for p in src.rglob("*")}
    (tmp_path / "out").mkdir()
    _predict(src, tmp_path / "out", model_dir)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "b_seg.nii.gz", "c_seg.nii.gz", "series_a_seg.nii.gz"]
    assert {p: p.stat().st_mtime_ns for p in src.rglob("*")} == before
    b, c = (np.asarray(nib.load(str(tmp_path / "out" / n)).dataobj) for n in ("b_seg.nii.gz", "c_seg.nii.gz"))
    np.testing.assert_array_equal(b, c)  # NRRD and NIfTI of the same volume: same labels


def test_series_option_picks_one_of_several(mni_small, model_dir, tmp_path):
    files = write_series(tmp_path / "mixed", mni_small, LAYOUTS[0], description="T1 axial")
    write_series(tmp_path / "mixed", mni_small[:, :, :20], LAYOUTS[3], description="T1 coronal", seed=1)
    uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
    _predict(tmp_path / "mixed", tmp_path / "out.dcm", model_dir, "--series", uid)
    assert pydicom.dcmread(tmp_path / "out.dcm").ReferencedSeriesSequence[0].SeriesInstanceUID == uid


def test_multi_label_seg_has_one_segment_per_channel(mni_small, tmp_path):
    """Overlapping labels (a multi-label model's (X, Y, Z, K) 0/1 maps, no label names) survive as K segments."""
    import highdicom as hd

    from gmim_hub.inference.formats.dicom_seg import SegInfo, write_dicom_seg

    files = write_series(tmp_path / "series", mni_small, LAYOUTS[3])  # shuffled file names
    source = load_volume(tmp_path / "series").dicom
    labels = np.stack([mni_small > 60, mni_small > 120], axis=-1).astype(np.uint8)  # channel 1 inside channel 0
    write_dicom_seg(tmp_path / "ml.dcm", labels, source, SegInfo("org/multi", "0" * 40, (), True, "0.1.0"))
    assert dciodvfy(tmp_path / "ml.dcm") == []
    seg = hd.seg.segread(tmp_path / "ml.dcm")
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["class 0", "class 1"]
    assert seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0].AlgorithmVersion == "0" * 40
    for k, path in enumerate(files):  # files are in slice order: slice k of the volume
        uid = pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID
        got = seg.get_pixels_by_source_instance([uid], skip_overlap_checks=True)[0]  # (rows, columns, segments)
        np.testing.assert_array_equal(got, np.transpose(labels[:, :, k], (1, 0, 2)))


def test_seg_nrrd_and_mha_outputs_get_the_umask_mode(mni_small, tmp_path):
    """Every output format goes through the one atomic-write helper: the mode any new file gets under the umask
    (not mkstemp's 0600), and no temporary file left beside it."""
    import os

    from gmim_hub.inference.formats.dicom_seg import SegInfo

    write_series(tmp_path / "series", mni_small, LAYOUTS[0])
    loaded = load_volume(tmp_path / "series")
    labels = (mni_small > 60).astype(np.uint8)
    out = tmp_path / "out"
    items = [(out / "seg.dcm", labels), (out / "seg.nrrd", labels), (out / "seg.mha", labels),
             (out / "seg.nii.gz", labels)]
    old = os.umask(0o027)
    try:
        save_niftis_atomic(items, loaded.affine, dicom=(loaded.dicom, SegInfo("m", None, LABELS[:2], False, "0")))
    finally:
        os.umask(old)
    assert {p.name: p.stat().st_mode & 0o777 for p, _ in items} == {p.name: 0o640 for p, _ in items}
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p, _ in items)
    assert dciodvfy(out / "seg.dcm") == []


def test_folder_with_a_subfolder_of_several_series_is_refused_at_planning(mni_small, model_dir, tmp_path):
    """Folder mode: a subfolder holding two series is refused when the outputs are planned (before the model
    loads or any volume is predicted), listing the series; nothing is written."""
    from gmim_hub.errors import InputError
    from gmim_hub.inference.io import plan_outputs

    src = tmp_path / "in"
    src.mkdir()
    nib.save(nib.Nifti1Image(mni_small.astype(np.float32), np.eye(4)), str(src / "a.nii.gz"))
    write_series(src / "mixed", mni_small, LAYOUTS[0], description="T1 axial")
    write_series(src / "mixed", mni_small[:, :, :20], LAYOUTS[3], description="T1 coronal", seed=1)
    with pytest.raises(InputError, match="holds 2 DICOM series: ") as err:
        plan_outputs(src, tmp_path / "out")
    assert "T1 axial" in str(err.value) and "T1 coronal" in str(err.value)  # listed by UID: random order
    result = runner.invoke(app, ["predict", str(src), str(tmp_path / "out"), "--model", str(model_dir)])
    assert result.exit_code == 2 and "holds 2 DICOM series" in result.stderr, result.output
    assert not (tmp_path / "out").exists()


def test_memory_check_covers_every_format(mni_small, model_dir, tmp_path):
    """The memory estimate made before the model loads reads NRRD and DICOM headers too (shape and voxel sizes)."""
    from gmim_hub.config import GMIMConfig
    from gmim_hub.errors import InputError
    from gmim_hub.inference.io import plan_outputs, read_volume_header
    from gmim_hub.inference.memory import check_jobs

    write_series(tmp_path / "series", mni_small, LAYOUTS[4])
    sitk.WriteImage(sitk.GetImageFromArray(mni_small.astype(np.float32)), str(tmp_path / "c.nrrd"))
    header = read_volume_header(tmp_path / "series")
    np.testing.assert_allclose(header.get_best_affine(), load_volume(tmp_path / "series").affine, atol=1e-5)
    config = GMIMConfig.from_json_file(model_dir / "config.json")
    for src in (tmp_path / "series", tmp_path / "c.nrrd"):
        jobs = plan_outputs(src, tmp_path / f"{src.stem}_seg.nii.gz")
        check_jobs(jobs, config, max_memory_gb=100)
        with pytest.raises(InputError, match="predicting it needs about"):
            check_jobs(jobs, config, max_memory_gb=1e-6)


def test_outputs_never_land_among_the_inputs(mni_small, tmp_path):
    """An output inside an input series folder would join the series; DICOM SEG outputs in a new subfolder of the
    input folder would be read as a series by the next run: both refused at planning, whatever --overwrite says."""
    from gmim_hub.errors import OutputError
    from gmim_hub.inference.io import plan_outputs

    src = tmp_path / "in"
    write_series(src / "series_a", mni_small, LAYOUTS[0])
    with pytest.raises(OutputError, match="is inside the input series folder"):
        plan_outputs(src / "series_a", src / "series_a" / "sub" / "seg.nii.gz", overwrite=True)
    with pytest.raises(OutputError, match="is inside the input series folder"):
        plan_outputs(src, src / "series_a", overwrite=True)
    with pytest.raises(OutputError, match="would be read as a DICOM series input"):
        plan_outputs(src, src / "segs", out_format="dicom-seg")
    assert [j.labels.name for j in plan_outputs(src, src / "segs")] == ["series_a_seg.nii.gz"]  # NIfTI: not inputs
