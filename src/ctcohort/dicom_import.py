"""One DICOM CT series -> one NIfTI CT in HU, by dcm2niix.

A series is a folder (searched recursively), a zip file, a list file (``.txt``: one path a line, relative
to the list's folder; what ``ctcohort sheet`` writes for a series that shares its folder), or files. Its
headers are read first with pydicom (``stop_before_pixels``, a few tags): the source must hold exactly one
CT series, a stack of slices in one orientation. Then dcm2niix runs as a subprocess on a temporary folder
that holds exactly those files, under neutral names, with no BIDS sidecar and anonymisation on; its
volume is written again with a header of our own (affine, data type and values only), so that nothing
of the DICOM headers (names, dates, UIDs, dcm2niix's acquisition notes in ``descrip``) reaches the NIfTI.

Never a silent success: a source with no DICOM image or no CT, two series (distinct UIDs or series
numbers, different image sizes or orientations, slices at the same position), a localizer, a single
slice, more than one output volume or a 4-D one is an error naming the series and the cause. A stack
that is not regular by :mod:`ctcohort.dicom_geometry` (the definition ``ctcohort sheet`` chooses by: a
missing slice, uneven spacing, a gantry tilt) is an error too, unless ``allow_corrected``: then dcm2niix's
corrected volume (``_Eq``: resliced to equal spacing, ``_Tilt``: tilt removed) is taken and the
correction recorded (``ImportRecord.correction``, the log, the workflow's ct_import table).

The slice order and places are the positions' (ImagePositionPatient along the slice normal), never the
InstanceNumbers': where these do not run along the stack, the temporary copies are numbered by position
for dcm2niix, which stacks slices by InstanceNumber. dcm2niix's volume is then checked against the
headers: one slice per image, placed on the evenly spaced stack fitted to the positions (dcm2niix takes
the spacing from two slices only), or, resliced, a grid spanning the headers' slices; a volume that
disagrees is refused, corrected or not.

Messages and logs name the source by the user's own paths and describe the series by counts, sizes and
spacings; they never print header values such as names, dates or UIDs (dcm2niix's own warnings are
passed on with every header value read and every UID-like number blanked).
"""

import logging
import re
import subprocess
import tempfile
import zipfile
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np

from ctcohort.columns import is_nifti
from ctcohort.dicom_geometry import (
    GEOMETRY_TAGS,
    Stack,
    affine_on_stack,
    as_number,
    measure_stack,
    mixed_orientations,
    read_header,
    volume_disagreement,
)
from ctcohort.tables import BLANK, NOTHING_MISSING, read_tsv, write_tsv

log = logging.getLogger(__name__)

STAGE = "import_ct"
# a list of DICOM files: a text file, one path a line (what `ctcohort sheet` writes for a series that shares
# its folder with other files)
LIST_SUFFIX = ".txt"
CORRECTIONS = {"Eq": "uneven slice spacing (a missing slice?) resliced to equal spacing", "Tilt": "gantry tilt removed"}
# header fields read per file: what tells series, geometry and modality apart, and what may identify a
# patient (only to blank it out of dcm2niix's messages)
SERIES_TAGS = ["Modality", "ImageType", "SeriesInstanceUID", "SeriesNumber"]
IDENTIFYING_TAGS = [
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "InstitutionName",
    "InstitutionAddress",
    "ReferringPhysicianName",
    "PerformingPhysicianName",
    "OperatorsName",
    "AccessionNumber",
    "StudyID",
    "StudyDate",
    "SeriesDate",
    "StudyInstanceUID",
    "SOPInstanceUID",
    "FrameOfReferenceUID",
    "StationName",
    "DeviceSerialNumber",
    "StudyDescription",
    "SeriesDescription",
    "ProtocolName",
]
UID_LIKE = re.compile(r"\d+(?:\.\d+){3,}")
DCM2NIIX_TIMEOUT_S = 3600


class DicomImportError(ValueError):
    """The DICOM source cannot be imported as one CT volume; the message names the source and the cause."""


def is_dicom_source(path: str | Path) -> bool:
    """Whether a cohort sheet's ct names a DICOM series (a folder, a zip, a file list or a DICOM file) rather
    than a NIfTI file."""
    return not is_nifti(path)


def read_file_list(path: str | Path) -> list[Path]:
    """The files of a list file: one path a line, relative paths relative to the list's folder."""
    path = Path(path)
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    return [path.parent / line for line in lines if line]


def _source_paths(source) -> list[Path]:
    if isinstance(source, (str, Path)):
        return [Path(source)]
    return [Path(p) for p in source]


def describe_source(source) -> str:
    paths = _source_paths(source)
    if len(paths) == 1:
        return str(paths[0])
    return f"{paths[0]} and {len(paths) - 1} more file(s)"


@dataclass(frozen=True)
class ImportRecord:
    """What an import did, for the log and the workflow's ct_import table (no header values)."""

    images: int  # DICOM images converted
    shape: str  # e.g. 512x512x20
    spacing_mm: str  # e.g. 0.9766x0.9766x2
    orientation: str  # axis codes, e.g. LAS
    dtype: str  # int16 or float32
    correction: str  # none, Eq, Tilt or Tilt_Eq
    dcm2niix: str  # dcm2niix version

    @classmethod
    def columns(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    def describe(self) -> str:
        corrected = "" if self.correction == "none" else f", corrected by dcm2niix ({self.correction})"
        return (
            f"{self.images} images -> {self.shape} voxels of {self.spacing_mm} mm, {self.orientation}, "
            f"{self.dtype}{corrected}"
        )


@dataclass
class _Image:
    """Header fields of one DICOM image file."""

    path: Path
    modality: str
    localizer: bool
    series_uid: str
    series_number: str
    size: tuple
    orientation: tuple | None
    position: tuple | None
    frames: int
    instance: str  # InstanceNumber: only to tell dcm2niix the slice order


def _read_image_header(path: Path, identifying: set[str]) -> _Image | None:
    """The image's header fields, or None for a file that is not a DICOM image (text, DICOMDIR, a report)."""
    header = read_header(path, [*SERIES_TAGS, *GEOMETRY_TAGS, *IDENTIFYING_TAGS])
    if header is None:
        return None
    for name in IDENTIFYING_TAGS + ["SeriesInstanceUID"]:
        value = header[name]  # a person's name also in its parts (family^given^middle)
        identifying.update(part for part in (value, *value.split("^")) if len(part.strip()) >= 3)
    if header["Rows"] is None:
        return None

    def sized(vector, count):
        return vector if vector is not None and len(vector) == count else None

    size = (int(header["Rows"]), int(header["Columns"] or 0))
    return _Image(
        path,
        header["Modality"].upper(),
        "LOCALIZER" in header["ImageType"].upper(),
        header["SeriesInstanceUID"],
        header["SeriesNumber"],
        size,
        sized(header["ImageOrientationPatient"], 6),
        sized(header["ImagePositionPatient"], 3),
        int(header["NumberOfFrames"] or 1),
        header["InstanceNumber"],
    )


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def _check_one_ct_series(images: list[_Image], files: int) -> None:
    """Errors that no correction can fix: not exactly one CT series of one stack of slices."""
    if not images:
        raise DicomImportError(f"holds no DICOM image ({_plural(files, 'file')}, none a readable DICOM image)")
    modalities = Counter(i.modality or "none" for i in images)
    found = ", ".join(f"{m} ({n})" for m, n in modalities.most_common())
    if "CT" not in modalities:
        raise DicomImportError(f"holds no CT image: modality {found}")
    if len(modalities) > 1:
        raise DicomImportError(f"holds images of more than one modality: {found}; give one series only")
    localizers = sum(i.localizer for i in images)
    if localizers:
        raise DicomImportError(
            f"{_plural(localizers, 'localizer image')} (ImageType LOCALIZER) mixed in with the "
            f"{len(images) - localizers} other images; give the axial series only"
        )
    uids = {i.series_uid for i in images}
    if len(uids) > 1:  # values not shown: they are UIDs
        raise DicomImportError(
            f"holds {len(uids)} series (distinct SeriesInstanceUID"
            f"{', some blank' if '' in uids else ''}); give one series only"
        )
    numbers = Counter(i.series_number or "blank" for i in images)
    if len(numbers) > 1:
        found = ", ".join(f"{n} ({c} images)" for n, c in sorted(numbers.items()))
        raise DicomImportError(f"holds more than one series: SeriesNumber {found}; give one series only")
    sizes = Counter(f"{r}x{c}" for r, c in (i.size for i in images))
    if len(sizes) > 1:
        found = ", ".join(f"{s} ({n} images)" for s, n in sizes.most_common())
        raise DicomImportError(f"images of different sizes: {found} (a localizer or a second series?)")
    if any(i.frames > 1 for i in images) and len(images) > 1:
        raise DicomImportError(
            f"{len(images)} images, some of them multi-frame: give one multi-frame file or one series of single slices"
        )


def _measure_stack(images: list[_Image]) -> Stack:
    """Where the positions put a stack of single-frame images (:func:`ctcohort.dicom_geometry.measure_stack`);
    errors for what cannot be one volume whatever is allowed."""
    if len(images) < 2:
        raise DicomImportError("a single slice, not a volume")
    if any(i.orientation is None or i.position is None for i in images):
        missing = sum(i.orientation is None or i.position is None for i in images)
        raise DicomImportError(
            f"{_plural(missing, 'image')} without ImageOrientationPatient or "
            "ImagePositionPatient: the slices cannot be placed"
        )
    mixed = mixed_orientations([i.orientation for i in images])
    if mixed:
        raise DicomImportError(f"{mixed} (a localizer or a second series mixed in?); give one stack of slices")
    stack = measure_stack([i.position for i in images], images[0].orientation)
    if stack is None:
        raise DicomImportError("ImageOrientationPatient does not give two directions: the slices cannot be placed")
    if stack.doubled:
        raise DicomImportError(f"{stack.problem}; give one series only")
    return stack


def _number_by_position(images: list[_Image], stack: Stack) -> bool:
    """Where the InstanceNumbers do not run along the slice normal, the copies in the temporary folder numbered
    by their places (dcm2niix stacks slices by InstanceNumber, and for a Siemens CT drops those that go back);
    whether they were. Rewrites headers only: the pixel data are copied as they are."""
    import pydicom

    numbers = [as_number(images[i].instance) for i in stack.order]
    pairs = list(zip(numbers, numbers[1:]))
    if None not in numbers and (all(a < b for a, b in pairs) or all(a > b for a, b in pairs)):
        return False
    with pydicom.config.disable_value_validation():
        for place, i in enumerate(stack.order, start=1):
            path = images[i].path
            ds = pydicom.dcmread(path)
            ds.InstanceNumber = place
            path.unlink()  # a link to the user's file, which is never written to
            ds.save_as(path)
    return True


def _redact(text: str, values: set[str]) -> str:
    text = UID_LIKE.sub("<uid>", text)  # first: a value may be part of a UID (a serial number, a date)
    for value in sorted(values, key=len, reverse=True):
        text = text.replace(value, "<header value>")
    return text


def _warnings(output: str, values: set[str], folder: Path) -> list[str]:
    """dcm2niix's warnings and errors, with header values, UIDs and the temporary folder blanked."""
    lines = [line.strip() for line in output.replace(str(folder), "<series>").splitlines()]
    return [_redact(line, values) for line in lines if line.lower().startswith(("warning", "error"))]


def dcm2niix_version() -> str:
    from importlib import metadata

    try:
        return metadata.version("dcm2niix")
    except metadata.PackageNotFoundError:
        return "unknown"


def _dcm2niix_binary() -> str:
    try:
        from dcm2niix import bin as binary
    except ImportError as err:
        raise ImportError("dcm2niix is not installed: pip install dcm2niix (a dependency of ctcohort)") from err
    return binary


def _gather(source, folder: Path) -> list[Path]:
    """Links to (or, from a zip, copies of) the source's files in ``folder``, under neutral names."""
    paths = _source_paths(source)
    if not paths:
        raise DicomImportError("no path given")
    if len(paths) == 1 and paths[0].suffix.lower() == LIST_SUFFIX and paths[0].is_file():
        listed = read_file_list(paths[0])
        if not listed:
            raise DicomImportError("the file list is empty")
        # by line number, not path: a listed path may run through an export folder named after the patient
        missing = [n for n, path in enumerate(listed, start=1) if not path.is_file()]
        if missing:
            raise DicomImportError(
                f"{paths[0]}: {_plural(len(missing), 'listed file')} not found "
                f"(line{'s' * (len(missing) > 1)} {', '.join(map(str, missing[:10]))}"
                f"{' ...' if len(missing) > 10 else ''})"
            )
        paths = listed
    elif len(paths) == 1 and paths[0].suffix.lower() == ".zip":
        try:
            with zipfile.ZipFile(paths[0]) as archive:
                members = [m for m in archive.infolist() if not m.is_dir()]
                files = []
                for n, member in enumerate(members):  # no path of the archive is used
                    target = folder / f"{n:06d}"
                    with archive.open(member) as stream:
                        target.write_bytes(stream.read())
                    files.append(target)
        except zipfile.BadZipFile as err:
            raise DicomImportError(f"not a readable zip file ({err})") from None
        return files
    found = []
    for path in paths:
        if path.is_dir():
            found.extend(sorted(p for p in path.rglob("*") if p.is_file()))
        elif path.is_file():
            found.append(path)
        else:
            raise DicomImportError(f"{path} does not exist")
    files = []
    for n, path in enumerate(found):
        link = folder / f"{n:06d}"
        link.symlink_to(path.resolve())
        files.append(link)
    return files


def _to_hu_image(img, affine: np.ndarray):
    """dcm2niix's volume in HU (int16 where that is lossless, else float32) with a header of our own."""
    import nibabel as nib

    from ctcohort.imaging import ct_hounsfield

    hu = np.asarray(ct_hounsfield(img))
    if hu.dtype.kind in "iu" or (np.isfinite(hu).all() and np.array_equal(hu, np.round(hu))):
        lossless = hu.size == 0 or (hu.min() >= np.iinfo(np.int16).min and hu.max() <= np.iinfo(np.int16).max)
        hu = hu.astype(np.int16) if lossless else hu.astype(np.float32)
    else:
        hu = hu.astype(np.float32)
    out = nib.Nifti1Image(hu, affine)  # a fresh header: no descrip, aux_file, db_name or extensions
    out.set_qform(affine, code=1)
    out.set_sform(affine, code=1)
    out.header.set_xyzt_units("mm", "sec")
    return out


def _choose_volume(out_folder: Path, allow_corrected: bool, stack: Stack | None):
    """The one volume to keep among dcm2niix's outputs, and its correction (``none``, ``Eq``, ...): the plain one
    where the positions say the stack is regular, whatever dcm2niix made of it; ``stack`` None for a multi-frame
    image (its frames are not placed by the headers read here)."""
    import nibabel as nib

    written = sorted(p.name for p in out_folder.iterdir())
    stray = [n for n in written if not n.endswith(".nii")]
    if stray:  # a sidecar or anything else: nothing but NIfTI volumes is expected
        raise DicomImportError(f"dcm2niix wrote unexpected files ({', '.join(stray)})")
    volumes = {}
    for name in written:
        match = re.fullmatch(r"volume(?:_(Tilt_Eq|Tilt|Eq)_1)?\.nii", name)
        if match is None:
            raise DicomImportError(
                f"dcm2niix wrote more than one volume ({len(written)} files: "
                f"{', '.join(written)}): the files hold more than one series or echo"
            )
        volumes[match.group(1) or "none"] = out_folder / name
    if "none" not in volumes:
        raise DicomImportError(f"dcm2niix wrote no plain volume ({', '.join(written) or 'nothing'})")
    corrected = [k for k in volumes if k != "none"]
    if len(corrected) > 1:
        raise DicomImportError(f"dcm2niix wrote several corrected volumes ({', '.join(sorted(corrected))})")
    for path in volumes.values():
        shape = nib.load(path).shape
        if len(shape) > 3 and any(n > 1 for n in shape[3:]):
            raise DicomImportError(
                f"dcm2niix wrote a {len(shape)}-D volume of shape {'x'.join(map(str, shape))}: "
                "more than one volume of the same slices (a second series, echo or phase)"
            )
    if corrected and stack is not None and stack.regular:
        log.info(
            "dcm2niix also wrote a corrected volume (%s) of a series that is regular by its positions: its "
            "plain volume is taken",
            corrected[0],
        )
        return volumes["none"], "none"
    expected = list(stack.problems) if stack is not None else []
    if corrected:
        kind = corrected[0]
        reasons = "; ".join(CORRECTIONS[part] for part in kind.split("_"))
        if not allow_corrected:
            found = "; ".join(expected) or reasons
            raise DicomImportError(
                f"dcm2niix had to correct the series ({found}); the corrected volume "
                f"({kind}: {reasons}) is used only where allowed (import_ct.allow_corrected: "
                "true, or ctcohort import-ct --allow-corrected)"
            )
        return volumes[kind], kind
    if expected:
        raise DicomImportError(f"{'; '.join(expected)}, but dcm2niix wrote no corrected volume")
    return volumes["none"], "none"


def _placed_affine(img, correction: str, stack: Stack | None, warnings: list[str]) -> np.ndarray:
    """The affine of dcm2niix's volume, checked against the slice positions of the headers: a volume of one slice
    per image gets the stack fitted to the positions (dcm2niix takes the spacing from two slices only); a
    resliced one is refused where it does not span the headers' slices. Unchecked for a multi-frame image."""
    if stack is None:
        return img.affine
    slices = img.shape[2] if len(img.shape) > 2 else 1
    resliced = "Eq" in correction
    disagreement = volume_disagreement(img.affine, slices, stack, resliced)
    if disagreement:
        what = "volume" if correction == "none" else f"corrected volume ({correction})"
        said = f" (dcm2niix: {'; '.join(warnings[:2])})" if warnings else ""
        raise DicomImportError(f"dcm2niix's {what} has {disagreement}; not imported{said}")
    return img.affine if resliced else affine_on_stack(img.affine, stack)


def convert_series(source, allow_corrected: bool = False):
    """The NIfTI image (in memory) of the DICOM series ``source`` (a folder, a zip file, a .txt file list, one
    file, or a sequence of files) and its ``ImportRecord``; ``DicomImportError`` where the source is not one CT
    series, or needs a correction that is not allowed."""
    import nibabel as nib

    name = describe_source(source)
    try:
        with tempfile.TemporaryDirectory(prefix="ctcohort-import-") as tmp:
            series, out = Path(tmp) / "series", Path(tmp) / "out"
            series.mkdir()
            out.mkdir()
            files = _gather(source, series)
            count = len(files)
            identifying: set[str] = set()
            headers = [_read_image_header(path, identifying) for path in files]
            images = [h for h in headers if h is not None]
            for path, header in zip(files, headers):
                if header is None:
                    path.unlink()  # dcm2niix sees exactly the series' images
            if len(images) < count:
                log.info("%s: %s that are not DICOM images left out", name, _plural(count - len(images), "file"))
            _check_one_ct_series(images, count)
            stack = None if images[0].frames > 1 else _measure_stack(images)
            if stack is not None and not stack.regular and not allow_corrected:
                raise DicomImportError(
                    stack.problem + ": not imported unless allowed (import_ct.allow_corrected: "
                    "true, or ctcohort import-ct --allow-corrected), which takes dcm2niix's "
                    "corrected volume"
                )
            if stack is not None and _number_by_position(images, stack):
                log.info(
                    "%s: InstanceNumber order is not the order of the slice positions: the slices numbered by "
                    "their positions for dcm2niix",
                    name,
                )
            command = [
                _dcm2niix_binary(),
                "-b",
                "n",
                "-ba",
                "y",
                "-f",
                "volume",
                "-z",
                "n",
                "-m",
                "y",
                "-o",
                str(out),
                str(series),
            ]
            result = subprocess.run(
                command, capture_output=True, text=True, errors="replace", timeout=DCM2NIIX_TIMEOUT_S
            )
            warnings = _warnings(result.stdout + result.stderr, identifying, Path(tmp))
            for line in warnings:
                log.warning("%s: dcm2niix: %s", name, line)
            if result.returncode != 0 and not any(out.iterdir()):
                raise DicomImportError(f"dcm2niix failed (exit status {result.returncode}); see the log")
            path, correction = _choose_volume(out, allow_corrected, stack)
            volume = nib.load(path)
            img = _to_hu_image(volume, _placed_affine(volume, correction, stack, warnings))
    except DicomImportError as err:
        raise DicomImportError(f"DICOM series {name}: {err}") from None
    record = ImportRecord(
        images=len(images),
        shape="x".join(map(str, img.shape)),
        spacing_mm="x".join(f"{z:.4g}" for z in img.header.get_zooms()[:3]),
        orientation="".join(nib.aff2axcodes(img.affine)),
        dtype=str(img.get_data_dtype()),
        correction=correction,
        dcm2niix=dcm2niix_version(),
    )
    (log.warning if correction != "none" else log.info)("imported DICOM series %s: %s", name, record.describe())
    return img, record


def import_series(source, out_path: str | Path, allow_corrected: bool = False) -> ImportRecord:
    """Convert the DICOM series ``source`` to the NIfTI file ``out_path`` (see ``convert_series``)."""
    import nibabel as nib

    img, record = convert_series(source, allow_corrected)
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, out_path)
    return record


def write_record(record: ImportRecord | None, path: str | Path, subject: str) -> None:
    """The scan's import record as a one-row TSV (empty fields for a scan that was not imported)."""
    import pandas as pd

    values = asdict(record) if record is not None else dict.fromkeys(ImportRecord.columns(), "")
    row = [subject, *(str(values[c]) for c in ImportRecord.columns())]
    write_tsv(pd.DataFrame([row], columns=["subject", *ImportRecord.columns()]), path, missing=BLANK)


def _write_placeholder(out_path: str | Path) -> None:
    import nibabel as nib

    nib.save(nib.Nifti1Image(np.zeros((1, 1, 1), np.int16), np.eye(4)), out_path)


def import_batch(
    subjects: Sequence[str],
    sources: Sequence,
    cts: Sequence[str | Path],
    records: Sequence[str | Path],
    statuses: Sequence[str | Path],
    allow_corrected: bool = False,
    on_error: str = "record",
) -> None:
    """The workflow's import job: each scan's series to its CT file, record and status; a scan that fails
    gets a 1-voxel placeholder CT and a failed status (stage import_ct), which its later stages pass on."""
    from ctcohort.scan_status import run_scan_step

    lists = [subjects, sources, cts, records, statuses]
    if len({len(items) for items in lists}) != 1:
        raise ValueError(
            f"an import batch needs one source, CT, record and status per scan: {[len(items) for items in lists]}"
        )

    def step(subject, source, ct, record) -> Callable[[], None]:
        return lambda: write_record(import_series(source, ct, allow_corrected), record, subject)

    def placeholder(subject, ct, record) -> Callable[[], None]:
        return lambda: (_write_placeholder(ct), write_record(None, record, subject))

    for subject, source, ct, record, status in zip(*lists):
        run_scan_step(
            subject,
            STAGE,
            status,
            on_error,
            step=step(subject, source, ct, record),
            placeholder=placeholder(subject, ct, record),
        )


def import_table(records: Sequence[str | Path], statuses: Sequence[str | Path]):
    """The cohort's imports, one row per DICOM series: subject, imported, error, then the ``ImportRecord``."""
    import pandas as pd

    from ctcohort.scan_status import read_status

    if len(records) != len(statuses):
        raise ValueError(f"{len(records)} import records but {len(statuses)} status files")
    rows = []
    for record, status_path in zip(records, statuses):
        status = read_status(status_path)
        row = read_tsv(record, NOTHING_MISSING, dtype=str).iloc[0].to_dict()
        rows.append(
            {
                "subject": status.subject,
                "imported": status.ok,
                "error": status.error,
                **{c: row.get(c, "") for c in ImportRecord.columns()},
            }
        )
    return pd.DataFrame(rows, columns=["subject", "imported", "error", *ImportRecord.columns()])
