"""DICOM series built from real volumes that ship in packages (nilearn's MNI152 template, Debian's Colin27 when
installed), written slice by slice with pydicom in chosen layouts, and the outside tools that check them.

A layout fixes the DICOM geometry (row/column direction cosines, pixel spacing, slice step); the voxels are the
real volume's, so a reader that mixes up rows and columns or slice order produces a visibly different volume.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

CT_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
COLIN27 = Path("/usr/share/mricron/templates/ch2.nii.gz")  # Debian mricron-data


@dataclass(frozen=True)
class Layout:
    """DICOM geometry of a test series (LPS): row and column direction cosines, the slice step and pixel sizes."""

    name: str
    row: tuple[float, float, float]
    col: tuple[float, float, float]
    step: float = 4.0  # mm between slices, along row x col
    pixel: tuple[float, float] = (3.0, 3.5)  # PixelSpacing: between rows, between columns
    reverse_files: bool = False  # instance numbers and file order run against the spatial order
    shuffle_names: bool = False  # random file names, no order in them
    ct_rescale: bool = False  # CT: int16 stored values, RescaleSlope 0.5, RescaleIntercept -1024
    extra: dict = field(default_factory=dict)


def _rotated(angle_deg: float) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Axial rows/columns rotated by `angle_deg` about the L axis then 10 degrees about S: an oblique plane."""
    a, b = np.radians(angle_deg), np.radians(10.0)
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    rz = np.array([[np.cos(b), -np.sin(b), 0], [np.sin(b), np.cos(b), 0], [0, 0, 1]])
    m = rz @ rx
    return tuple(m[:, 0]), tuple(m[:, 1])


OBLIQUE_ROW, OBLIQUE_COL = _rotated(20.0)
LAYOUTS = [
    Layout("axial", (1, 0, 0), (0, 1, 0)),
    Layout("axial-flipped-order", (1, 0, 0), (0, 1, 0), reverse_files=True),
    Layout("sagittal", (0, 1, 0), (0, 0, -1), step=3.0),
    Layout("coronal-shuffled-names", (1, 0, 0), (0, 0, -1), shuffle_names=True),
    Layout("oblique", OBLIQUE_ROW, OBLIQUE_COL),  # type: ignore[arg-type]
    Layout("ct-rescale", (1, 0, 0), (0, 1, 0), ct_rescale=True),
]


def real_volume(source: str = "mni152", shape: tuple[int, int, int] = (40, 44, 36)) -> np.ndarray:
    """A real brain volume, cropped around its centre and decimated to about `shape` voxels (uint8 range)."""
    if source == "colin27":
        data = np.asarray(nib.load(str(COLIN27)).dataobj, dtype=np.float32)
    else:
        from nilearn.datasets import load_mni152_template

        data = np.asarray(load_mni152_template(resolution=2).get_fdata(), dtype=np.float32)
    steps = [max(1, s // t) for s, t in zip(data.shape, shape, strict=True)]
    data = data[:: steps[0], :: steps[1], :: steps[2]]
    starts = [(s - t) // 2 for s, t in zip(data.shape, shape, strict=True)]
    data = data[starts[0]:starts[0] + shape[0], starts[1]:starts[1] + shape[1], starts[2]:starts[2] + shape[2]]
    return np.clip(data * (255.0 / max(float(data.max()), 1.0)), 0, 255).round()


def _base(modality: str, study: str, series: str, frame_of_ref: str, description: str) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = CT_STORAGE if modality == "CT" else MR_STORAGE
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame_of_ref
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Test^Brain", "GMIM0001", "19700101", "O"
    ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber = "20261202", "120000", "1", "A1"
    ds.ReferringPhysicianName = ""
    ds.Modality, ds.SeriesNumber, ds.SeriesDescription = modality, 3, description
    ds.Manufacturer, ds.PositionReferenceIndicator, ds.PatientPosition = "gmim-hub tests", "", "HFS"
    ds.SeriesDate, ds.SeriesTime, ds.ContentDate, ds.ContentTime = "20261202", "120000", "20261202", "120000"
    ds.AcquisitionNumber = 1
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    if modality == "CT":
        ds.KVP, ds.RescaleType = 120, "HU"
    else:
        ds.ScanningSequence, ds.SequenceVariant, ds.ScanOptions, ds.MRAcquisitionType = "GR", "SP", "", "3D"
        ds.EchoTime, ds.RepetitionTime, ds.EchoTrainLength, ds.MagneticFieldStrength = 3.0, 8.0, 1, 3.0
        ds.ImagingFrequency, ds.ImagedNucleus, ds.SliceThickness = 123.2, "1H", 1.0
    return ds


def write_series(folder: Path, volume: np.ndarray, layout: Layout, *, series_uid: str | None = None,
                 study_uid: str | None = None, description: str | None = None, seed: int = 0,
                 prefix: str = "IM") -> list[Path]:
    """Write `volume` (columns, rows, slices) as one file per slice in `folder`; returns the files in slice
    order. Geometry: voxel (i, j, k) sits at origin + i*col_spacing*row + j*row_spacing*col + k*step*normal."""
    folder.mkdir(parents=True, exist_ok=True)
    row, col = np.asarray(layout.row, float), np.asarray(layout.col, float)
    normal = np.cross(row, col)
    origin = np.array([-60.0, -80.0, -40.0])
    modality = "CT" if layout.ct_rescale else "MR"
    study, series = study_uid or generate_uid(), series_uid or generate_uid()
    frame_of_ref = generate_uid()
    n = volume.shape[2]
    rng = np.random.default_rng(seed)
    names = [f"{rng.integers(1 << 40):x}" for _ in range(n)] if layout.shuffle_names else \
        [f"{prefix}{i:04d}.dcm" for i in range(n)]
    paths = []
    for k in range(n):
        ds = _base(modality, study, series, frame_of_ref, description or layout.name)
        ds.SOPInstanceUID = generate_uid()
        ds.InstanceNumber = n - k if layout.reverse_files else k + 1
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.ImagePositionPatient = [float(v) for v in origin + k * layout.step * normal]
        ds.ImageOrientationPatient = [float(v) for v in (*row, *col)]
        ds.PixelSpacing = list(layout.pixel)
        ds.SliceThickness = layout.step
        plane = volume[:, :, k].T  # (rows, columns)
        if layout.ct_rescale:
            ds.RescaleSlope, ds.RescaleIntercept = 0.5, -1024
            stored = (plane * 6.0).astype(np.int16)  # modality value 3*v - 1024: a CT-like range
            ds.PixelRepresentation = 1
        else:
            ds.RescaleSlope, ds.RescaleIntercept = 1, 0
            signed = bool(volume.min() < 0)
            stored = plane.astype(np.int16 if signed else np.uint16)
            ds.PixelRepresentation = int(signed)
        ds.Rows, ds.Columns = stored.shape
        ds.PixelData = stored.tobytes()
        for key, value in layout.extra.items():
            setattr(ds, key, value)
        name = names[n - 1 - k] if layout.reverse_files else names[k]
        paths.append(save(ds, folder / name))
    return paths


def small_series(folder: Path, n: int = 6, prefix: str = "IM", **kw) -> list[Path]:
    """A 16 x 16 x n axial series of noise (for rows of the bad-input table, where the voxels do not matter)."""
    volume = np.random.default_rng(n).uniform(0, 200, (16, 16, n)).round()
    return write_series(folder, volume, LAYOUTS[0], prefix=prefix, **kw)


def edit(src: Path, dst: Path | None = None, **attrs) -> Path:
    """Change attributes of a DICOM file (in place, or as a new instance at `dst`)."""
    import pydicom

    ds = pydicom.dcmread(src)
    for key, value in attrs.items():
        setattr(ds, key, value)
    if dst is not None:
        ds.SOPInstanceUID = generate_uid()
    return save(ds, dst or src)


def non_image(path: Path) -> Path:
    """A DICOM object without pixels: a Basic Text SR document header."""
    ds = _base("MR", generate_uid(), generate_uid(), generate_uid(), "report")
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = "1.2.840.10008.5.1.4.1.1.88.11", generate_uid(), "SR"
    for key in ("SamplesPerPixel", "PhotometricInterpretation", "BitsAllocated", "BitsStored", "HighBit"):
        delattr(ds, key)
    path.parent.mkdir(parents=True, exist_ok=True)
    return save(ds, path)


def save(ds: Dataset, path: Path) -> Path:
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.save_as(path, enforce_file_format=True)
    return path


def write_enhanced(path: Path, slices: list[Path]) -> Path:
    """The classic MR series `slices` converted to one enhanced multi-frame object by highdicom."""
    import highdicom as hd
    import pydicom

    legacy = [pydicom.dcmread(p) for p in slices]
    mf = hd.legacy.LegacyConvertedEnhancedMRImage(legacy, series_instance_uid=generate_uid(), series_number=4,
                                                   sop_instance_uid=generate_uid(), instance_number=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    mf.save_as(path, enforce_file_format=True)
    return path


def expected_stored(volume: np.ndarray, layout: Layout) -> np.ndarray:
    """The modality values the series holds for `volume` (as the writer stores and rescales them)."""
    return (volume * 6.0).astype(np.int16) * 0.5 - 1024 if layout.ct_rescale else volume.astype(np.uint16)


# ----------------------------------------------------------------------------------------- outside tools
def need_tool(name: str) -> str:
    """The tool's path; in CI (env CI set) its absence fails the test, elsewhere it skips."""
    path = shutil.which(name)
    if path is None:
        msg = f"{name} is not installed (apt-get install dcm2niix dicom3tools)"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    return path


def dcm2niix(series: Path, out_dir: Path) -> nib.Nifti1Image:
    """Convert a series folder (or a file's folder) with dcm2niix; returns the one NIfTI it writes."""
    out_dir.mkdir(parents=True, exist_ok=True)
    subprocess.run([need_tool("dcm2niix"), "-z", "n", "-b", "n", "-f", "ref", "-o", str(out_dir), str(series)],
                   check=True, capture_output=True, text=True, timeout=120)
    written = sorted(out_dir.glob("ref*.nii"))
    assert len(written) == 1, f"dcm2niix wrote {written}"
    return nib.load(str(written[0]))


def dciodvfy(path: Path) -> list[str]:
    """dciodvfy's error lines for `path` (warnings are kept out; an empty list means valid)."""
    run = subprocess.run([need_tool("dciodvfy"), str(path)], capture_output=True, text=True, timeout=120)
    lines = (run.stdout + run.stderr).splitlines()
    return [ln for ln in lines if ln.startswith("Error")]
