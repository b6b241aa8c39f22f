"""Which files are DICOM, by their Part 10 marker alone: no pydicom import (~1 s), so telling a NIfTI input from a
DICOM one costs nothing on paths that never read DICOM (`gmim infer --mode volume` with a NIfTI file)."""

from __future__ import annotations

from pathlib import Path

__all__ = ["dicom_files", "is_dicom_file"]


def is_dicom_file(path: Path) -> bool:
    """DICOM Part 10 files carry 'DICM' after a 128-byte preamble (the file name says nothing)."""
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:] == b"DICM"


def dicom_files(folder: Path) -> list[Path]:
    """DICOM files directly inside `folder` (DICOMDIR index files excluded)."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.name.upper() != "DICOMDIR" and is_dicom_file(p))
