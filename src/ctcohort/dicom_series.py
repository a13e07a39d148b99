"""A cohort sheet from a tree of DICOM files: series inventory, one CT series chosen per study, no PHI.

``ctcohort sheet DICOM_ROOT -o cohort.tsv`` reads the header of every file under the root (pydicom,
``stop_before_pixels`` and only the tags below: a few KB per file), in worker processes, and:

- groups the files into series: by StudyInstanceUID and SeriesInstanceUID; where the series UID is blank,
  by FrameOfReferenceUID, SeriesNumber, SeriesDescription, ConvolutionKernel, ImageOrientationPatient,
  Rows/Columns and AcquisitionNumber. A study is its StudyInstanceUID, or where that is blank its
  StudyDate, StudyTime, StudyID and AccessionNumber; a patient is the PatientID (the study, where blank).
- in each series drops localizer files (ImageType LOCALIZER) and files whose orientation or matrix differs
  from the stack's (the largest set of files alike); measures the slice spacing from ImagePositionPatient
  along the slice normal (never from SliceThickness or InstanceNumber), the gantry tilt, and whether the
  stack is regular ("complete": evenly spaced, none missing or doubled, no tilt), all by
  :mod:`ctcohort.dicom_geometry`, whose definition the import applies too.
- chooses one CT series per study (:data:`CHOICE_RULE`), or the series the user names by
  SeriesInstanceUID, and writes the cohort sheet (one row per study that has one) and, when asked, the
  series table (one row per series: chosen or why not).

Patients and studies are named by keyed pseudonyms (:func:`pseudonyms`). No name, ID, birth date, UID,
institution or accession number is written to the sheet or the series table; the pseudonym -> PatientID
key is written only to the file named by ``key_out``.
"""

import csv
import hmac
import math
import os
import re
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import date
from hashlib import sha256
from pathlib import Path

from ctcohort import dicom_geometry
from ctcohort.dicom_geometry import (
    GEOMETRY_TAGS,
    NUMBER_TAGS,
    VECTOR_TAGS,
    Stack,
    as_number,
    measure_stack,
    mixed_orientations,
    slice_normal,
)

SECRET_VARIABLE = "CTCOHORT_PSEUDONYM_SECRET"
DEFAULT_MIN_SLICES = 10
LIST_FOLDER_SUFFIX = "_series"  # cohort.tsv -> cohort_series/<subject>.txt: file lists of series that share a folder

CHOICE_RULE = (
    "Eligible: modality CT, not a localizer, axial (the slice normal closest to the patient's z axis), at least "
    "--min-slices slices, slice positions in the header, complete (evenly spaced along the slice normal, none "
    "missing or doubled, no gantry tilt: what the import accepts without a correction). "
    "Among the eligible series of a study: soft-tissue kernel first (then kernels of unknown kind, then sharp "
    "bone/lung kernels), then the smallest slice spacing (from the positions), then the thinnest "
    "SliceThickness, then the most slices, then the lowest SeriesNumber. A series named by "
    "--series-uid is chosen for its study whatever the rule says."
)

# header tags read from every file (pydicom keywords); nothing else is parsed
TAGS = [
    "SOPClassUID",
    "Modality",
    "PatientID",
    "PatientBirthDate",
    "PatientAge",
    "PatientSex",
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "StudyID",
    "AccessionNumber",
    "SeriesInstanceUID",
    "SeriesNumber",
    "SeriesDescription",
    "FrameOfReferenceUID",
    "AcquisitionNumber",
    "ImageType",
    "SliceThickness",
    "ConvolutionKernel",
    "ContrastBolusAgent",
    "ContrastBolusRoute",
    "Manufacturer",
    "ManufacturerModelName",
    "KVP",
    "PatientName",
    *GEOMETRY_TAGS,
]
# text values that thousands of files repeat: one copy of each is kept
_SHARED_TEXT = [t for t in TAGS if t not in VECTOR_TAGS | NUMBER_TAGS and t != "InstanceNumber"]

# ContrastBolusAgent/Route values that say "none"
NO_CONTRAST = {"", "NONE", "NO", "N", "0", "NATIVE", "WITHOUT", "NIL"}

SHEET_COLUMNS = [
    "subject",
    "ct",
    "age",
    "sex",
    "contrast",
    "age_source",
    "patient",
    "years",
    "series",
    "series_number",
    "slices",
    "slice_spacing",
    "slice_thickness",
    "kernel",
    "kernel_class",
    "manufacturer",
    "model",
    "kvp",
    "study_year",
]
SERIES_COLUMNS = [
    "study",
    "patient",
    "series",
    "series_number",
    "modality",
    "description",
    "image_type",
    "orientation",
    "rows",
    "columns",
    "pixel_spacing",
    "files",
    "slices",
    "dropped_files",
    "slice_spacing",
    "slice_thickness",
    "tilt_deg",
    "complete",
    "kernel",
    "kernel_class",
    "contrast",
    "eligible",
    "chosen",
    "reason",
]
KEY_COLUMNS = [
    "subject",
    "patient",
    "PatientID",
    "StudyInstanceUID",
    "StudyDate",
    "series",
    "SeriesInstanceUID",
    "SeriesNumber",
]


# --- reading headers ---------------------------------------------------------------------------------


def read_header(path: str) -> dict | None:
    """The tags of :data:`TAGS` of one file as plain Python values; None where it is not a DICOM image
    (:func:`ctcohort.dicom_geometry.read_header`)."""
    return dicom_geometry.read_header(path, TAGS)


def list_files(root: str | Path) -> list[str]:
    """Every regular file under ``root`` (symbolic links to folders are not followed), sorted."""
    root = str(root)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"DICOM folder {root} does not exist or is not a folder")
    found = []
    for folder, folders, files in os.walk(root):
        folders.sort()
        found.extend(os.path.join(folder, name) for name in sorted(files))
    return found


class Progress:
    """A counter on stderr: a line updated in place on a terminal, a line every 10 s otherwise."""

    def __init__(self, total: int, what: str, stream=None):
        self.total, self.what, self.done = total, what, 0
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.start = self.last = time.monotonic()

    def update(self, n: int = 1) -> None:
        self.done += n
        now = time.monotonic()
        if self.done == self.total or now - self.last >= (0.2 if self.tty else 10):
            self.last = now
            self._show(now)

    def _show(self, now: float) -> None:
        rate = self.done / max(now - self.start, 1e-9)
        left = (self.total - self.done) / rate if rate > 0 else 0
        line = (
            f"{self.what}: {self.done:,} of {self.total:,} ({100 * self.done / max(self.total, 1):.0f}%), "
            f"{rate:,.0f}/s, {left:,.0f} s left"
        )
        self.stream.write(("\r" + line + ("\n" if self.done == self.total else "")) if self.tty else line + "\n")
        self.stream.flush()


def read_headers(paths: list[str], processes: int = 1, progress: bool = True) -> list[dict]:
    """:func:`read_header` of every path (in ``processes`` worker processes), the non-images left out."""
    counter = Progress(len(paths), "DICOM headers read") if progress and paths else None
    headers = []

    def collect(results):
        for header in results:
            if header is not None:
                for tag in _SHARED_TEXT:  # one copy of a value that thousands of files repeat
                    header[tag] = sys.intern(header[tag])
                headers.append(header)
            if counter:
                counter.update()

    if processes <= 1 or len(paths) < 2 * processes:
        collect(map(read_header, paths))
    else:
        from concurrent.futures import ProcessPoolExecutor

        chunk = max(1, min(256, len(paths) // (8 * processes)))
        with ProcessPoolExecutor(processes) as pool:
            collect(pool.map(read_header, paths, chunksize=chunk))
    return headers


# --- series --------------------------------------------------------------------------------------------


def _round(vector, digits=3):
    return None if vector is None else tuple(round(v, digits) + 0.0 for v in vector)


def orientation_name(orientation) -> str:
    normal = slice_normal(orientation)
    if normal is None:
        return "unknown"
    return ("sagittal", "coronal", "axial")[max(range(3), key=lambda i: abs(normal[i]))]


def kernel_class(kernel: str) -> str:
    """``soft`` (soft-tissue / standard body kernels), ``sharp`` (bone, lung, edge-enhancing) or ``unknown``.

    Siemens B/Br/I/Q/H kernels by their number (below 50 soft, 50 and above sharp), Canon/Toshiba FC kernels
    (below FC30 soft), Philips A-C soft, D-E and L/Y sharp, and the words STANDARD/SOFT/SMOOTH/BODY/ABDOMEN
    against BONE/LUNG/SHARP/EDGE/DETAIL/CHEST/ULTRA. The first value of a multi-valued kernel decides."""
    first = kernel.split("/")[0].strip().upper()
    if not first:
        return "unknown"
    if re.search(r"BONE|LUNG|SHARP|EDGE|DETAIL|CHEST|ULTRA", first):
        return "sharp"
    if re.search(r"STAND|SOFT|SMOOTH|BODY|ABD|BRAIN", first):
        return "soft"
    siemens = re.fullmatch(r"(?:B|BR|BF|BV|I|IR|Q|QR|H|HR|D|T)(\d{2})[A-Z]?(?:\s*\d)?", first)
    if siemens:
        return "soft" if int(siemens.group(1)) < 50 else "sharp"
    canon = re.fullmatch(r"FC(\d{1,2})", first)
    if canon:
        return "soft" if int(canon.group(1)) < 30 else "sharp"
    if first in ("A", "B", "C", "UA", "UB", "UC"):
        return "soft"
    if first in ("D", "E", "L", "YA", "YB", "YC", "YD", "YE", "YF"):
        return "sharp"
    return "unknown"


KERNEL_RANK = {"soft": 0, "unknown": 1, "sharp": 2}


@dataclass
class Series:
    """One series: its files, the stack of them that makes the volume, and what was measured on it."""

    patient_key: str
    study_key: str
    files: list[dict]
    stack: list[dict] = field(default_factory=list)  # sorted along the slice normal
    dropped: Counter = field(default_factory=Counter)
    geometry: Stack | None = None  # where the positions put the stack's slices (None: no positions)
    problem: str = ""  # why not eligible ("" = eligible)
    index: int = 0  # 1, 2, ... within the study
    chosen: bool = False
    named: bool = False  # named by the user
    reason: str = ""

    def first(self, tag: str):
        source = self.stack or self.files
        return source[0][tag]

    def common(self, tag: str):
        values = Counter(h[tag] for h in (self.stack or self.files) if h[tag] not in (None, ""))
        return values.most_common(1)[0][0] if values else (None if tag in NUMBER_TAGS else "")

    @property
    def kernel(self) -> str:
        return self.common("ConvolutionKernel").replace("\\", "/")

    @property
    def kernel_class(self) -> str:
        return kernel_class(self.kernel)

    @property
    def thickness(self) -> float | None:
        values = sorted(h["SliceThickness"] for h in self.stack if h["SliceThickness"] is not None)
        return values[len(values) // 2] if values else None

    @property
    def series_number(self) -> str:
        return self.common("SeriesNumber")

    @property
    def contrast(self) -> int:
        return int(
            any(
                h[tag].upper() not in NO_CONTRAST
                for h in (self.stack or self.files)
                for tag in ("ContrastBolusAgent", "ContrastBolusRoute")
            )
        )

    @property
    def spacing(self) -> float | None:
        return None if self.geometry is None or self.geometry.spacing is None else round(self.geometry.spacing, 4)

    @property
    def tilt_deg(self) -> float | None:
        return None if self.geometry is None else self.geometry.tilt_deg

    @property
    def complete(self) -> bool:
        """Regular by :func:`ctcohort.dicom_geometry.measure_stack`: what the import accepts."""
        return self.geometry is not None and self.geometry.regular

    def rank(self) -> tuple:
        number = as_number(self.series_number)
        return (
            not self.named,
            KERNEL_RANK[self.kernel_class],
            round(self.spacing or math.inf, 2),
            round(self.thickness or math.inf, 2),
            -len(self.stack),
            number if number is not None else math.inf,
            self.index,
        )


def _study_key(h: dict) -> str:
    if h["StudyInstanceUID"]:
        return "uid\0" + h["StudyInstanceUID"]
    return "\0".join(("date", h["StudyDate"], h["StudyTime"], h["StudyID"], h["AccessionNumber"]))


def _series_key(h: dict) -> tuple:
    if h["SeriesInstanceUID"]:
        return ("uid", h["SeriesInstanceUID"])
    return (
        "blank",
        h["FrameOfReferenceUID"],
        h["SeriesNumber"],
        h["SeriesDescription"],
        h["ConvolutionKernel"],
        _round(h["ImageOrientationPatient"]),
        h["Rows"],
        h["Columns"],
        h["AcquisitionNumber"],
    )


def _stack_key(h: dict) -> tuple:
    return (_round(h["ImageOrientationPatient"]), h["Rows"], h["Columns"], _round(h["PixelSpacing"]))


def group_series(headers: list[dict], min_slices: int = DEFAULT_MIN_SLICES) -> list[Series]:
    """The files grouped into series (see the module's description), each measured by :func:`_measure`
    (a series of fewer than ``min_slices`` slices is not eligible)."""
    groups = defaultdict(list)
    for h in headers:
        study = _study_key(h)
        patient = h["PatientID"] or "study\0" + study
        groups[(patient, study, _series_key(h))].append(h)
    series = [
        Series(patient, study, sorted(files, key=lambda h: h["path"])) for (patient, study, _), files in groups.items()
    ]
    for s in series:
        _measure(s, min_slices)
    return series


def _measure(s: Series, min_slices: int = DEFAULT_MIN_SLICES) -> None:
    images = []
    for h in s.files:
        if "LOCALIZER" in h["ImageType"].upper().split("\\"):
            s.dropped["localizer"] += 1
        else:
            images.append(h)
    if images:
        stacks = Counter(_stack_key(h) for h in images)
        main = max(stacks, key=lambda k: (stacks[k], str(k)))
        s.stack = [h for h in images if _stack_key(h) == main]
        if len(s.stack) < len(images):
            s.dropped["other orientation or matrix"] += len(images) - len(s.stack)
    if s.stack:
        s.geometry = measure_stack([h["ImagePositionPatient"] for h in s.stack], s.stack[0]["ImageOrientationPatient"])
    if s.geometry is not None:
        s.stack = [s.stack[i] for i in s.geometry.order]
    s.problem = _problem(s, min_slices)


def _problem(s: Series, min_slices: int) -> str:
    modality = s.common("Modality")
    if modality != "CT":
        return f"modality {modality or 'not given'}, not CT"
    if not s.stack:
        return "localizer"
    if any((h["NumberOfFrames"] or 1) > 1 for h in s.stack):
        return "multi-frame (enhanced) images: not read by the inventory"
    if len(s.stack) < min_slices:
        return "single slice" if len(s.stack) == 1 else f"{len(s.stack)} slices, fewer than {min_slices}"
    orientation = orientation_name(s.first("ImageOrientationPatient"))
    if orientation != "axial":
        return f"{orientation}, not axial"
    if s.geometry is None:
        return "no slice positions (ImagePositionPatient/ImageOrientationPatient) in the headers"
    # the stack's orientations agree to 3 decimals (_stack_key); the import asks as much as dcm2niix does
    return mixed_orientations([h["ImageOrientationPatient"] for h in s.stack]) or s.geometry.problem


def choose(series: list[Series], named_uids: list[str] | None = None) -> dict[tuple[str, str], Series]:
    """Number the series of each study, choose one per study by :data:`CHOICE_RULE`, and say of every other
    why it was not chosen. Returns the chosen series by (patient key, study key)."""
    named_uids = list(dict.fromkeys(named_uids or []))
    by_uid = defaultdict(list)
    for s in series:
        uid = s.first("SeriesInstanceUID")
        if uid:
            by_uid[uid].append(s)
    unknown = [uid for uid in named_uids if uid not in by_uid]
    if unknown:
        raise ValueError(f"no series with SeriesInstanceUID {', '.join(unknown)} under the DICOM folder")
    for uid in named_uids:
        for s in by_uid[uid]:
            s.named = True
    studies = defaultdict(list)
    for s in series:
        studies[(s.patient_key, s.study_key)].append(s)
    chosen = {}
    for key, members in studies.items():
        members.sort(
            key=lambda s: (
                as_number(s.series_number) if as_number(s.series_number) is not None else math.inf,
                s.common("SeriesDescription"),
                s.kernel,
                s.files[0]["path"],
            )
        )
        for i, s in enumerate(members, start=1):
            s.index = i
        named = [s for s in members if s.named]
        if len(named) > 1:
            raise ValueError(f"--series-uid names {len(named)} series of the same study; name one per study")
        candidates = named or [s for s in members if not s.problem]
        if not candidates:
            for s in members:
                s.reason = s.problem
            continue
        best = min(candidates, key=Series.rank)
        best.chosen = True
        chosen[key] = best
        for s in members:
            if s is best:
                s.reason = "named by --series-uid" + (f" ({s.problem})" if s.problem else "") if s.named else ""
            else:
                s.reason = s.problem or _why_not(s, best)
    return chosen


def _why_not(s: Series, best: Series) -> str:
    if best.named:
        return "another series named by --series-uid"
    if KERNEL_RANK[s.kernel_class] != KERNEL_RANK[best.kernel_class]:
        return f"{s.kernel_class} kernel, series {best.index} has a {best.kernel_class} one"
    if round(s.spacing, 2) != round(best.spacing, 2):
        return f"slice spacing {s.spacing:g} mm, series {best.index} has {best.spacing:g} mm"
    if round(s.thickness or math.inf, 2) != round(best.thickness or math.inf, 2):
        return f"slice thickness {s.thickness or 'not given'}, series {best.index} is thinner"
    if len(s.stack) != len(best.stack):
        return f"{len(s.stack)} slices, series {best.index} has {len(best.stack)}"
    return f"alike, series {best.index} has the lower series number"


# --- the study's covariates ------------------------------------------------------------------------------

_AGE = re.compile(r"^(\d+(?:\.\d+)?)\s*([DWMY]?)$", re.IGNORECASE)
DAYS_PER_YEAR = 365.2425


def _date(text: str) -> date | None:
    match = re.fullmatch(r"(\d{4})(\d{2})(\d{2})", text.strip().replace(".", "").replace("-", ""))
    if not match:
        return None
    try:
        return date(*map(int, match.groups()))
    except ValueError:
        return None


def age_years(patient_age: str, study_date: str = "", birth_date: str = "") -> tuple[float | None, str]:
    """(age in years, where it came from): PatientAge ``nnnD``/``nnnW``/``nnnM``/``nnnY`` (``age_tag``), a bare
    number read as years (``age_tag_bare_number``, flagged: the unit is a guess), else StudyDate -
    PatientBirthDate (``birth_date``); (None, "") when neither is usable or the age is outside 0-130."""
    match = _AGE.match(patient_age.strip())
    if match:
        number, unit = float(match.group(1)), match.group(2).upper()
        years = {"D": number / DAYS_PER_YEAR, "W": number * 7 / DAYS_PER_YEAR, "M": number / 12}.get(unit, number)
        if 0 <= years <= 130:
            return round(years, 4), "age_tag" if unit else "age_tag_bare_number"
    study, birth = _date(study_date), _date(birth_date)
    if study and birth:
        years = (study - birth).days / DAYS_PER_YEAR
        if 0 <= years <= 130:
            return round(years, 4), "birth_date"
    return None, ""


def sex_code(patient_sex: str) -> str:
    """``M`` or ``F``; blank for anything else (``O``, blank, unknown)."""
    value = patient_sex.strip().upper()
    return value if value in ("M", "F") else ""


# --- pseudonyms --------------------------------------------------------------------------------------------


def resolve_secret(secret: str | None) -> bytes:
    """The pseudonym key: the option's value, else the environment variable; an error without one."""
    secret = secret if secret else os.environ.get(SECRET_VARIABLE, "")
    if not secret:
        raise ValueError(
            f"a secret is needed for the pseudonyms: set {SECRET_VARIABLE} (or --secret); keep it, "
            "the same secret gives the same pseudonyms in a later run"
        )
    return secret.encode("utf-8")


def _digest(secret: bytes, *parts: str) -> str:
    return hmac.new(secret, "\0".join(parts).encode("utf-8"), sha256).hexdigest()


def pseudonyms(secret: bytes, patient_key: str, study_key: str) -> tuple[str, str]:
    """(subject, patient): ``p`` + the first 12 hex digits of HMAC-SHA256(secret, "patient" NUL PatientID),
    and for the study that patient pseudonym, ``_`` and the first 8 hex digits of HMAC-SHA256(secret,
    "study" NUL PatientID NUL study key). The study key is the StudyInstanceUID, or where blank StudyDate,
    StudyTime, StudyID and AccessionNumber; a blank PatientID is replaced by the study key. Studies of
    one patient share the prefix; without the secret neither can be recomputed from a PatientID."""
    patient = "p" + _digest(secret, "patient", patient_key)[:12]
    return f"{patient}_{_digest(secret, 'study', patient_key, study_key)[:8]}", patient


# --- writing ---------------------------------------------------------------------------------------------


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(int(value))
    if isinstance(value, float):
        return f"{value:.6g}" if math.isfinite(value) else ""
    return re.sub(r"[\t\r\n]+", " ", str(value)).strip()


def add_years_since_first_study(rows: list[dict]) -> None:
    """Each row's ``years``: years since its patient's first study (rounded to 4 decimals: about an hour),
    None where the study has no date. A time relative to the patient, never the date itself; it orders a
    patient's scans and times within-patient change. Removes ``study_date`` from the rows."""
    first = {}
    for row in rows:
        if row["study_date"] is not None:
            first[row["patient"]] = min(first.get(row["patient"], row["study_date"]), row["study_date"])
    for row in rows:
        date = row.pop("study_date")
        row["years"] = None if date is None else round((date - first[row["patient"]]).days / DAYS_PER_YEAR, 4)


def _write_tsv(path: Path, columns: list[str], rows: list[dict], mode: int = 0o666) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".part")
    temporary.unlink(missing_ok=True)  # a new file, so that it gets ``mode``
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(descriptor, "w", newline="", encoding="utf-8") as stream:
        writer = csv.writer(stream, delimiter="\t", quoting=csv.QUOTE_NONE, escapechar=None, lineterminator="\n")
        writer.writerow(columns)
        for row in rows:
            writer.writerow([_cell(row.get(c)) for c in columns])
    os.replace(temporary, path)


def _below(path: str, folder: Path) -> bool:
    relative = os.path.relpath(os.path.abspath(path), os.path.abspath(folder))
    return relative.split(os.sep)[0] != os.pardir


# header values that identify a patient or a study; free text and folder names are checked against them
IDENTIFYING_TAGS = ("PatientName", "PatientID", "AccessionNumber", "StudyID", "PatientBirthDate", "StudyDate")
REMOVED = "[removed]"
# numbers of six digits or more in free text: record numbers and dates that the headers did not name
_LONG_NUMBER = re.compile(r"\d{6,}")


def identifying_values(s: Series) -> list[str]:
    """The identifying header values of a series' files (IDENTIFYING_TAGS; a name also by its parts; a date also
    as YYYY-MM-DD and DD.MM.YYYY) of three characters or more, longest first."""
    values = set()
    for header in s.files:
        for tag in IDENTIFYING_TAGS:
            value = str(header.get(tag) or "").strip()
            if not value:
                continue
            values.add(value)
            if tag == "PatientName":
                values.update(part for part in re.split(r"[\^\s,]+", value) if len(part) >= 3)
            if re.fullmatch(r"\d{8}", value):
                values.update({f"{value[:4]}-{value[4:6]}-{value[6:]}", f"{value[6:]}.{value[4:6]}.{value[:4]}"})
    # shorter ones (a StudyID "1") would match everywhere
    return sorted((v for v in values if len(v) >= 3), key=len, reverse=True)


def scrub(text: str, values: list[str]) -> str:
    """``text`` with every identifying value (case-insensitive) and every number of six digits or more replaced
    by REMOVED: free-text header fields (SeriesDescription) are typed by hand and hold names and record numbers."""
    for value in values:
        text = re.sub(re.escape(value), REMOVED, text, flags=re.IGNORECASE)
    return _LONG_NUMBER.sub(REMOVED, text)


def names_identifying_value(path: str, values: list[str]) -> bool:
    """Whether a path holds an identifying value (export folders are often named after the patient)."""
    lowered = path.lower()
    return any(value.lower() in lowered for value in values)


def _exclusive_folder(s: Series, files_below: Counter) -> str | None:
    """The folder holding the series' stack and no other file (sub-folders included), if there is one."""
    folders = {os.path.dirname(h["path"]) for h in s.stack}
    if len(folders) != 1:
        return None
    folder = folders.pop()
    return folder if files_below[folder] == len(s.stack) else None


def _files_below(paths: list[str], root: str) -> Counter:
    """For every folder from ``root`` down, the number of files below it (sub-folders included)."""
    counts = Counter()
    root = os.path.normpath(root)
    for path in paths:
        folder = os.path.dirname(path)
        while True:
            counts[folder] += 1
            if os.path.normpath(folder) == root or os.path.dirname(folder) == folder:
                break
            folder = os.path.dirname(folder)
    return counts


def _refuse_results(path: Path, what: str) -> None:
    if "results" in Path(os.path.abspath(path)).parts:
        raise ValueError(
            f"{what} {path} lies in a folder named results: the key re-identifies patients and "
            "is never written next to the study's outputs; name a file elsewhere"
        )


@dataclass
class Inventory:
    files: int
    images: int
    series: list[Series]
    chosen: dict
    sheet_rows: list[dict]


@dataclass(frozen=True)
class InventorySettings:
    """How ``write_inventory`` reads the tree and chooses a series per study (``ctcohort sheet``'s options)."""

    secret: str | None = None  # key of the pseudonyms (None: the environment variable SECRET_VARIABLE)
    series_uids: list[str] | None = None  # SeriesInstanceUIDs to take for their study instead of the rule's choice
    processes: int = 1  # processes reading headers
    min_slices: int = DEFAULT_MIN_SLICES  # fewer slices make a series unusable
    file_lists: bool = False  # name every series by a file list, never by its folder
    progress: bool = True  # say on stderr how the reading goes


def write_inventory(
    dicom_root: str | Path,
    sheet: str | Path,
    series_table: str | Path | None = None,
    key_out: str | Path | None = None,
    settings: InventorySettings = InventorySettings(),
) -> Inventory:
    """Read the tree, choose a CT series per study and write the cohort sheet (and the series table and the
    pseudonym key where asked). The ``ct`` of a row is the series' folder where that folder holds the
    series' files and nothing else, else (and always with ``settings.file_lists``) a file list
    ``<sheet stem>_series/<subject>.txt`` next to the sheet: UTF-8, one absolute path a line, in slice order."""
    key = resolve_secret(settings.secret)
    sheet = Path(sheet)
    if key_out is not None:
        key_out = Path(key_out)
        _check_key_out(key_out, sheet, series_table)
    paths = list_files(dicom_root)
    if settings.progress:
        print(f"{len(paths):,} files under {dicom_root}", file=sys.stderr)
    headers = read_headers(paths, processes=settings.processes, progress=settings.progress)
    series = group_series(headers, settings.min_slices)
    chosen = choose(series, settings.series_uids)
    names = _study_pseudonyms(series, key)
    rows = _write_sheet(sheet, chosen, names, _files_below(paths, str(dicom_root)), settings.file_lists)
    if series_table is not None:
        _write_series_table(Path(series_table), series, names)
    if key_out is not None:
        _write_key(key_out, series, chosen, names)
    return Inventory(len(paths), len(headers), series, chosen, rows)


def _check_key_out(key_out: Path, sheet: Path, series_table: str | Path | None) -> None:
    """The key goes neither into a results folder nor over another output."""
    _refuse_results(key_out, "--key-out")
    outputs = {os.path.abspath(p) for p in (sheet, series_table) if p is not None}
    if os.path.abspath(key_out) in outputs:
        raise ValueError(f"--key-out {key_out} is also the sheet or the series table")


def _study_pseudonyms(series: list[Series], key: bytes) -> dict[tuple[str, str], tuple[str, str]]:
    """(patient key, study key) -> (subject, patient) pseudonyms; two studies or patients named alike fail."""
    names, seen = {}, {}
    for s in series:
        subject, patient = pseudonyms(key, s.patient_key, s.study_key)
        for name, source in ((subject, (s.patient_key, s.study_key)), (patient, s.patient_key)):
            if seen.setdefault(name, source) != source:
                raise ValueError(
                    f"two studies or patients have the same pseudonym {name}: a 1 in 10^9 event "
                    "at 10,000 studies; run again with another secret"
                )
        names[(s.patient_key, s.study_key)] = (subject, patient)
    return names


def _write_sheet(
    sheet: Path, chosen: dict[tuple[str, str], Series], names: dict, files_below: Counter, file_lists: bool
) -> list[dict]:
    """The cohort sheet's rows (one per chosen series, by subject), written with their file lists; the lists
    of an earlier run whose study has no row now are removed."""
    list_dir = sheet.parent / (sheet.stem + LIST_FOLDER_SUFFIX)
    written_lists = set()
    rows = []
    for study, s in chosen.items():
        subject, patient = names[study]
        folder = None if file_lists else _exclusive_folder(s, files_below)
        if folder and names_identifying_value(os.path.abspath(folder), identifying_values(s)):
            folder = None  # a folder named after the patient or study would carry PHI into every log: list it
        if folder is None:
            ct = _write_file_list(s, list_dir / f"{subject}.txt", subject)
            written_lists.add(ct.name)
        else:
            ct = Path(folder)
        ct = (
            os.path.relpath(os.path.abspath(ct), os.path.abspath(sheet.parent))
            if _below(ct, sheet.parent)
            else os.path.abspath(ct)
        )
        rows.append(_sheet_row(s, subject, patient, ct))
    add_years_since_first_study(rows)
    rows.sort(key=lambda r: r["subject"])
    _remove_stale_lists(list_dir, written_lists)
    _write_tsv(sheet, SHEET_COLUMNS, rows)
    return rows


def _write_file_list(s: Series, listing: Path, subject: str) -> Path:
    """The series' files, one absolute path a line, in slice order."""
    listing.parent.mkdir(parents=True, exist_ok=True)
    if any("\n" in h["path"] or "\r" in h["path"] for h in s.stack):
        raise ValueError(f"a file of study {subject} has a line break in its name: it cannot be listed")
    listing.write_text("".join(os.path.abspath(h["path"]) + "\n" for h in s.stack), encoding="utf-8")
    return listing


def _remove_stale_lists(list_dir: Path, written_lists: set[str]) -> None:
    """The file lists of an earlier run whose study has no row now."""
    if list_dir.is_dir():
        for stale in list_dir.glob("p*_*.txt"):
            if re.fullmatch(r"p[0-9a-f]{12}_[0-9a-f]{8}\.txt", stale.name) and stale.name not in written_lists:
                stale.unlink()


def _sheet_row(s: Series, subject: str, patient: str, ct: str) -> dict:
    """The chosen series' row of the cohort sheet: no name, ID, birth date or UID."""
    age, age_source = age_years(s.first("PatientAge"), s.first("StudyDate"), s.first("PatientBirthDate"))
    study_date = _date(s.first("StudyDate"))
    return {
        "subject": subject,
        "ct": ct,
        "age": age,
        "sex": sex_code(s.first("PatientSex")),
        "contrast": s.contrast,
        "age_source": age_source,
        "patient": patient,
        "series": s.index,
        "series_number": s.series_number,
        "slices": len(s.stack),
        "slice_spacing": s.spacing,
        "slice_thickness": s.thickness,
        "kernel": s.kernel,
        "kernel_class": s.kernel_class,
        "manufacturer": s.common("Manufacturer"),
        "model": s.common("ManufacturerModelName"),
        "kvp": s.common("KVP"),
        "study_year": study_date.year if study_date else None,
        "study_date": study_date,
    }


def _write_series_table(path: Path, series: list[Series], names: dict) -> None:
    """One row per series: chosen or why not."""
    table = []
    for s in series:
        subject, patient = names[(s.patient_key, s.study_key)]
        pixel = s.first("PixelSpacing")
        table.append(
            {
                "study": subject,
                "patient": patient,
                "series": s.index,
                "series_number": s.series_number,
                "modality": s.common("Modality"),
                "description": scrub(s.common("SeriesDescription"), identifying_values(s)),
                "image_type": s.common("ImageType").replace("\\", "/"),
                "orientation": orientation_name(s.first("ImageOrientationPatient")) if s.stack else "",
                "rows": s.first("Rows"),
                "columns": s.first("Columns"),
                "pixel_spacing": "x".join(f"{v:.7g}" for v in pixel) if pixel else "",
                "files": len(s.files),
                "slices": len(s.stack),
                "dropped_files": ", ".join(f"{n} {why}" for why, n in sorted(s.dropped.items())),
                "slice_spacing": s.spacing,
                "slice_thickness": s.thickness,
                "tilt_deg": s.tilt_deg,
                "complete": s.complete,
                "kernel": s.kernel,
                "kernel_class": s.kernel_class,
                "contrast": s.contrast,
                "eligible": not s.problem,
                "chosen": s.chosen,
                "reason": s.reason,
            }
        )
    table.sort(key=lambda r: (r["study"], r["series"]))
    _write_tsv(path, SERIES_COLUMNS, table)


def _write_key(key_out: Path, series: list[Series], chosen: dict[tuple[str, str], Series], names: dict) -> None:
    """The pseudonym -> PatientID/StudyInstanceUID key, one row per study, readable by its owner only."""
    studies = {}
    for s in series:
        study = (s.patient_key, s.study_key)
        best = chosen.get(study)
        subject, patient = names[study]
        studies[study] = {
            "subject": subject,
            "patient": patient,
            "PatientID": s.first("PatientID"),
            "StudyInstanceUID": s.first("StudyInstanceUID"),
            "StudyDate": s.first("StudyDate"),
            "series": best.index if best else None,
            "SeriesInstanceUID": best.first("SeriesInstanceUID") if best else "",
            "SeriesNumber": best.series_number if best else "",
        }
    _write_tsv(key_out, KEY_COLUMNS, sorted(studies.values(), key=lambda r: r["subject"]), mode=0o600)
