"""Copies of the real DICOM series of the test data (../shared/data/totalseg-example/dicom) with headers edited
by pydicom (the JPEG 2000 pixel data are copied as they are), and a pydicom + numpy reference conversion; a
PACS export of such copies with identifying values planted in their headers (build_export_tree)."""

import math
from collections.abc import Callable
from functools import partial
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
    hu = np.stack(
        [s.pixel_array.astype(np.float64) * float(s.RescaleSlope) + float(s.RescaleIntercept) for s in slices], axis=-1
    ).transpose(1, 0, 2)
    lps = np.eye(4)
    lps[:3, 0] = orientation[:3] * column_spacing  # along a row: the next column
    lps[:3, 1] = orientation[3:] * row_spacing  # down a column: the next row
    lps[:3, 2] = (np.array(last.ImagePositionPatient, float) - np.array(first.ImagePositionPatient, float)) / (
        len(slices) - 1
    )
    lps[:3, 3] = np.array(first.ImagePositionPatient, float)
    return hu, LPS_TO_RAS @ lps


# --- a PACS export with planted headers --------------------------------------------------------------------------

EXPORT_UID_ROOT = "1.2.826.0.1.3680043.8.498.77"  # planted UIDs all start with this
ORIGINAL_UID_ROOT = "1.3.12.2.1107.5.1.4.60064"  # UIDs of the shared series (frame of reference, file meta)
INSTITUTION, ACCESSION, PHYSICIAN = "St Phiberg Hospital", "ACC93817", "Phimaker^Doctor"
# PatientID -> what is planted in the headers, and what the sheet must say
PATIENTS = {
    "PHIA-4711": dict(name="Doe^Janetta", birth="19600315", sex="F"),
    "PHIB-0815": dict(name="Roe^Richardo", age="018M", sex="M"),
    "PHIC-1001": dict(name="Coe^Carlotta", age="003W", sex="O"),
    "PHID-2002": dict(name="Poe^Dorianne", age="010D", sex="M"),
    "PHIE-3003": dict(name="Moe^Emmerich", age="45", birth="19000101", sex="F"),
    "PHIF-4004": dict(name="Zoe^Fridolin"),
    "PHIG-5005": dict(name="Loe^Gundula", age="070Y", sex="M"),
}
STUDY_DATES = {"A1": "20221208", "A2": "20230301"}
# where B's 2 mm series lies in an export that names folders after the patient and the study, and what was typed
# into its free-text fields
B_FOLDER = {False: "B/s2", True: f"ROE_RICHARDO_PHIB-0815_MRN123456/STUDY_{STUDY_DATES['A1']}/SER3"}
B_FREE_TEXT = dict(
    SeriesDescription="Roe^Richardo abdomen PHIB-0815 MRN123456 portal venous",
    ProtocolName="ROE RICHARDO MRN123456 abdomen",
    StudyDescription="CT abdomen Roe^Richardo MRN123456",
)


def export_phi() -> list[str]:
    """Every identifying value planted in an export tree, and each given name on its own (the three-letter family
    names alone would be found by chance in compressed bytes)."""
    names = [p["name"] for p in PATIENTS.values()]
    return [
        *PATIENTS,
        *names,
        *(name.split("^")[1] for name in names),
        "19600315",
        "19000101",
        *STUDY_DATES.values(),
        INSTITUTION,
        ACCESSION,
        PHYSICIAN,
        EXPORT_UID_ROOT,
        ORIGINAL_UID_ROOT,
        "MRN123456",
    ]


def plant_patient(
    sources: list[Path],
    folder: Path,
    prefix: str,
    patient: str,
    n: int = 20,
    step: float | None = None,
    skip: int | None = None,
    uids: tuple[str, str] | None = None,
    sop_start: int = 0,
    study_date: str = STUDY_DATES["A1"],
    **tags,
) -> None:
    """Copies of the first ``n`` of ``sources`` (the shared series' files by name: head to feet) into ``folder``
    with the patient's headers planted; ``step``: slice positions that far apart instead of the real 2 mm;
    ``skip``: leave out that slice; ``uids``: (StudyInstanceUID, SeriesInstanceUID), blank as in the shared
    series when None; ``tags``: more header values (None deletes the tag)."""
    folder.mkdir(parents=True, exist_ok=True)
    person = PATIENTS[patient]
    with pydicom.config.disable_value_validation():  # a bare number in PatientAge, as some exports have
        for i, source in enumerate(sources[:n]):
            if i == skip:
                continue
            ds = pydicom.dcmread(source)
            ds.PatientID, ds.PatientName = patient, person["name"]
            ds.PatientBirthDate = person.get("birth", "")
            ds.PatientAge = person.get("age", "")
            ds.PatientSex = person.get("sex", "")
            ds.InstitutionName, ds.AccessionNumber, ds.ReferringPhysicianName = INSTITUTION, ACCESSION, PHYSICIAN
            ds.StudyDate = study_date
            if uids:
                ds.StudyInstanceUID, ds.SeriesInstanceUID = uids
                ds.SOPInstanceUID = f"{uids[1]}.{sop_start + i + 1}"
            if step is not None:
                x, y, z = (float(v) for v in ds.ImagePositionPatient)
                ds.ImagePositionPatient = [x, y, -766.5 - step * i]
                ds.SliceLocation = -766.5 - step * i
            for keyword, value in tags.items():
                if value is None:
                    delattr(ds, keyword)
                else:
                    setattr(ds, keyword, value)
            ds.save_as(folder / f"{prefix}{i:03d}.dcm")


def build_export_tree(root: Path, shared_data: Path, everything: bool = True, named_folders: bool = False) -> Path:
    """A PACS export of planted copies under ``root``; returns ``root``.

    Always: patient A's first study (blank UIDs, as in the shared series), a soft-tissue and a bone
    reconstruction and a localizer in one folder; patient B, a 2 mm series with UIDs in a folder of its own
    (with ``named_folders`` in B_FOLDER[True], named after B and the study, its free text B_FREE_TEXT); a
    file that is not DICOM. With ``everything``: A's second study (a 2 mm series, a thinner one missing a slice),
    B's 4 mm series, patients C-F with ages and sexes of every kind (C with blank UIDs), and G, the same slices
    twice under one series UID (two exports merged: no usable series)."""
    sources = sorted((shared_data / "totalseg-example" / "dicom").glob("*.dcm"))
    plant = partial(plant_patient, sources)
    plant(root / "A" / "1", "soft", "PHIA-4711")
    plant(
        root / "A" / "1",
        "bone",
        "PHIA-4711",
        step=1.0,
        SliceThickness=1,
        ConvolutionKernel="Br64f",
        SeriesDescription="CT Bone 1.0",
    )
    plant(
        root / "A" / "1",
        "loc",
        "PHIA-4711",
        n=1,
        ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"],
        ImageOrientationPatient=[1, 0, 0, 0, 0, -1],
    )
    study = f"{EXPORT_UID_ROOT}.3"
    plant(
        root / B_FOLDER[named_folders],
        "im",
        "PHIB-0815",
        uids=(study, f"{study}.1"),
        SeriesNumber=2,
        **(B_FREE_TEXT if named_folders else {}),
    )
    (root / "README.txt").write_text("not a DICOM file\n")
    if not everything:
        return root
    plant(root / "B" / "s4", "im", "PHIB-0815", step=4.0, n=10, uids=(study, f"{study}.2"), SeriesNumber=3)
    study = f"{EXPORT_UID_ROOT}.2"
    plant(
        root / "A" / "2" / "ct",
        "im",
        "PHIA-4711",
        uids=(study, f"{study}.1"),
        study_date=STUDY_DATES["A2"],
        ContrastBolusAgent=None,
        SeriesNumber=2,
        PatientAge="062Y",
    )
    plant(
        root / "A" / "2" / "thin",
        "im",
        "PHIA-4711",
        step=1.0,
        skip=10,
        uids=(study, f"{study}.2"),
        study_date=STUDY_DATES["A2"],
        ContrastBolusAgent=None,
        SeriesNumber=3,
        SliceThickness=1,
    )
    plant(root / "C", "im", "PHIC-1001", n=12)
    for patient, number in (("PHID-2002", 5), ("PHIE-3003", 6), ("PHIF-4004", 7)):
        study = f"{EXPORT_UID_ROOT}.{number}"
        plant(root / patient[3], "im", patient, n=12, uids=(study, f"{study}.1"))
    study = f"{EXPORT_UID_ROOT}.8"
    for copy in ("a", "b"):
        plant(root / "G", copy, "PHIG-5005", n=12, uids=(study, f"{study}.1"), sop_start=100 * (copy == "b"))
    return root
