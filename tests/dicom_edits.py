"""Copies of the real DICOM series of the test data (../shared/data/totalseg-example/dicom) with headers edited
by pydicom (the JPEG 2000 pixel data are copied as they are), and a pydicom + numpy reference conversion."""

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom

# LPS (DICOM) -> RAS (NIfTI)
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def series_files(shared_data: Path) -> list[Path]:
    """The shared series' files, in slice order (along the slice normal, feet to head)."""
    files = sorted((shared_data / "totalseg-example" / "dicom").glob("*.dcm"))
    return sorted(files, key=lambda f: _along_normal(pydicom.dcmread(f, stop_before_pixels=True)))


def _along_normal(ds) -> float:
    orientation = np.array(ds.ImageOrientationPatient, float)
    return float(np.array(ds.ImagePositionPatient, float) @ np.cross(orientation[:3], orientation[3:]))


def write_copies(files: list[Path], folder: Path, edit: Callable | None = None, prefix: str = "slice") -> list[Path]:
    """Copies of ``files`` in ``folder`` as ``<prefix>_NNN.dcm``, each header edited by ``edit(ds, index)``."""
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for index, path in enumerate(files):
        ds = pydicom.dcmread(path)
        if edit is not None:
            edit(ds, index)
        target = folder / f"{prefix}_{index:03d}.dcm"
        ds.save_as(target)
        written.append(target)
    return written


def tilt(degrees: float) -> Callable:
    """An edit that shears the stack as a gantry tilt does (Siemens: the slices stay axial, each one shifted in
    y by its distance along the table times tan(tilt)) and records the tilt in GantryDetectorTilt."""
    def edit(ds, index):
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [x, y + (z + 766.5) * math.tan(math.radians(degrees)), z]
        ds.GantryDetectorTilt = degrees
    return edit


def reference_volume(files: list[Path]) -> tuple[np.ndarray, np.ndarray]:
    """HU (float64) and RAS affine of a single-frame series by pydicom and numpy alone: slices sorted along the
    normal, HU = stored value x RescaleSlope + RescaleIntercept, voxel (i, j, k) = column i, row j, slice k."""
    slices = sorted((pydicom.dcmread(f) for f in files), key=_along_normal)
    first, last = slices[0], slices[-1]
    orientation = np.array(first.ImageOrientationPatient, float)
    row_spacing, column_spacing = (float(v) for v in first.PixelSpacing)
    hu = np.stack([s.pixel_array.astype(np.float64) * float(s.RescaleSlope) + float(s.RescaleIntercept)
                   for s in slices], axis=-1).transpose(1, 0, 2)
    lps = np.eye(4)
    lps[:3, 0] = orientation[:3] * column_spacing  # along a row: the next column
    lps[:3, 1] = orientation[3:] * row_spacing  # down a column: the next row
    lps[:3, 2] = (np.array(last.ImagePositionPatient, float) - np.array(first.ImagePositionPatient, float)) \
        / (len(slices) - 1)
    lps[:3, 3] = np.array(first.ImagePositionPatient, float)
    return hu, LPS_TO_RAS @ lps
