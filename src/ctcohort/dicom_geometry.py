"""Where the slices of a DICOM series lie: one header reader and one definition of a clean stack of slices, shared
by ``ctcohort sheet`` (which series it chooses) and the import (which series it converts, and whether dcm2niix's
volume puts the slices where the headers do), so that a series the sheet chooses is one the import accepts.

Slice order and spacing come from ImagePositionPatient along the slice normal (the cross product of the row and
column directions of ImageOrientationPatient); never from InstanceNumber (exports number slices in any order, or
not at all), SliceLocation or SliceThickness. InstanceNumber is read for reporting only.

A stack is regular when no two slices share a position, every slice lies within :func:`position_tolerance` of an
evenly spaced stack fitted to the positions along the normal (least squares), and the stack is not tilted:
sheared sideways by more than :data:`MAX_TILT_DEGREES` and, over its length, by more than the position tolerance.

The tolerances. Scanners write positions with a jitter of about 0.01-0.05 mm, and some round them to 0.1 mm
(0.625 mm slices written 0.6 and 0.7 mm apart): a slice within :data:`POSITION_TOLERANCE_MM` (0.1 mm) of its place
is in its place. A missing slice moves the fitted places of its neighbours by about half a spacing, far beyond
that; for slices thinner than 0.5 mm the tolerance is a fifth of the spacing (:data:`MAX_TOLERANCE_FRACTION`), so
that a missing slice is still found. A tilt of :data:`MAX_TILT_DEGREES` (0.1 degree) moves the far end of a 500 mm
stack 0.9 mm sideways, less than a pixel of a body CT: below it the stack is taken as straight. Over a short
stack a jitter alone makes an angle, hence the second condition.
"""

import math
from collections import Counter
from dataclasses import dataclass

import numpy as np

POSITION_TOLERANCE_MM = 0.1
MAX_TOLERANCE_FRACTION = 0.2  # of the slice spacing
MAX_TILT_DEGREES = 0.1
ORIENTATION_TOLERANCE = 1e-4  # direction cosines; dcm2niix splits a stack whose orientations differ by more
GEOMETRY_TAGS = (
    "ImageOrientationPatient",
    "ImagePositionPatient",
    "PixelSpacing",
    "Rows",
    "Columns",
    "NumberOfFrames",
    "InstanceNumber",
)
VECTOR_TAGS = frozenset({"ImageOrientationPatient", "ImagePositionPatient", "PixelSpacing"})
NUMBER_TAGS = frozenset({"Rows", "Columns", "SliceThickness", "KVP", "NumberOfFrames"})
DICOMDIR_CLASS = "1.2.840.10008.1.3.10"  # Media Storage Directory Storage: an index, not an image
LPS_TO_RAS = np.array([-1.0, -1.0, 1.0])  # DICOM patient axes -> NIfTI world axes


# --- reading headers ---------------------------------------------------------------------------------


def _text(value) -> str:
    if value is None:
        return ""
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return "\\".join(str(v).strip() for v in value)
    return str(value).strip()


def as_number(value) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _vector(value) -> tuple[float, ...] | None:
    if value is None:
        return None
    try:
        numbers = tuple(float(v) for v in (value if not isinstance(value, (str, bytes)) else [value]))
    except (TypeError, ValueError):
        return None
    return numbers if numbers and all(math.isfinite(n) for n in numbers) else None


def read_header(path, tags) -> dict | None:
    """The ``tags`` (pydicom keywords) of one file as plain Python values (vectors of :data:`VECTOR_TAGS`, numbers
    of :data:`NUMBER_TAGS`, stripped text of the others, multiple values joined by a backslash) and its ``path``;
    None where it is not a DICOM image (no DICOM preamble, unreadable, a DICOMDIR). No pixel data is read."""
    import pydicom

    try:
        # values are converted when first read: no warning per file for a value outside its VR's rules
        with pydicom.config.disable_value_validation():
            ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=[*tags, "SOPClassUID"])
            header = {"path": path}
            for tag in tags:
                kind = _vector if tag in VECTOR_TAGS else as_number if tag in NUMBER_TAGS else _text
                header[tag] = kind(ds.get(tag))
            media_class = _text(getattr(ds, "file_meta", {}).get("MediaStorageSOPClassUID"))
            sop_class = _text(ds.get("SOPClassUID"))
    except Exception:  # noqa: BLE001 - pydicom raises many kinds on broken or non-DICOM files; all mean "not an image"
        return None
    if DICOMDIR_CLASS in (media_class, sop_class):
        return None
    return header


# --- the stack ---------------------------------------------------------------------------------------------


def slice_normal(orientation) -> np.ndarray | None:
    """The unit normal of the slices (row direction x column direction, patient axes), or None where
    ImageOrientationPatient is missing or degenerate."""
    if orientation is None or len(orientation) != 6:
        return None
    normal = np.cross(np.asarray(orientation[:3], float), np.asarray(orientation[3:], float))
    length = float(np.linalg.norm(normal))
    return None if length < 1e-6 else normal / length


def position_tolerance(spacing: float) -> float:
    """How far a slice may lie from its place in an evenly spaced stack of that spacing (see the module)."""
    return min(POSITION_TOLERANCE_MM, MAX_TOLERANCE_FRACTION * abs(spacing))


@dataclass(frozen=True)
class Stack:
    """What the positions say of a stack of slices: their order, spacing, tilt, and whether it is regular."""

    order: tuple[int, ...]  # indices of the slices, sorted along the normal
    along: tuple[float, ...]  # their positions along the normal (mm), ascending
    normal: tuple[float, float, float]  # patient axes (LPS)
    spacing: float | None  # the median gap (mm)
    start: float | None  # the evenly spaced stack fitted to ``along``: first place and step (mm)
    step: float | None
    tilt_deg: float | None
    problems: tuple[str, ...]  # why it is not regular; none where it is
    doubled: bool = False  # slices at the same position: no volume at all

    @property
    def regular(self) -> bool:
        return not self.problems

    @property
    def problem(self) -> str:
        return "; ".join(self.problems)

    @property
    def extent(self) -> float:
        return self.along[-1] - self.along[0]

    @property
    def tolerance(self) -> float:
        return position_tolerance(self.spacing or POSITION_TOLERANCE_MM)


def _mm(value: float) -> str:
    return f"{round(value, 3):g}"


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def _degrees(value: float) -> str:
    return f"{value:.1f}" if value >= 1 else f"{value:.2f}"


def _shared_positions(along: np.ndarray, tolerance: float) -> str:
    close = np.diff(along) <= tolerance
    if not close.any():
        return ""
    slices = int(np.count_nonzero(np.r_[close, False] | np.r_[False, close]))
    places = int(np.count_nonzero(np.diff(np.r_[False, close].astype(int)) == 1))
    return (
        f"slices at the same position: {slices} slices at {_plural(places, 'position')} (two series or "
        "reconstructions merged, or files given twice)"
    )


def _uneven(along: np.ndarray, spacing: float, tolerance: float) -> str:
    k = np.arange(len(along))
    step, start = np.polyfit(k, along, 1)
    if np.abs(along - (start + step * k)).max() <= tolerance:
        return ""
    gaps = np.diff(along)
    counts = Counter(np.round(gaps, 3)).most_common()
    found = ", ".join(f"{_plural(n, 'gap')} of {g:g} mm" for g, n in counts[:4])
    if len(counts) > 4:
        found += f" and {_plural(sum(n for _, n in counts[4:]), 'other gap')}"
    multiples = np.round(gaps / spacing)
    missing = np.flatnonzero((multiples >= 2) & (np.abs(gaps - multiples * spacing) <= tolerance))
    if not len(missing):
        return f"uneven slice spacing ({found})"
    where = ", ".join(f"{int(multiples[i]) - 1} at {_mm(along[i] + spacing)} mm" for i in missing[:3])
    more = f" and {len(missing) - 3} more places" if len(missing) > 3 else ""
    return f"uneven slice spacing ({found}): slices missing ({where}{more} along the slice normal)"


def _tilt(positions: np.ndarray, normal: np.ndarray) -> tuple[float, float]:
    """(angle in degrees between the stack and the slice normal, sideways shift over the stack in mm), from the
    step of a straight line fitted to the positions in slice order."""
    step = np.polyfit(np.arange(len(positions)), positions, 1)[0]
    forward = abs(float(step @ normal))
    sideways = float(np.linalg.norm(step - (step @ normal) * normal))
    return math.degrees(math.atan2(sideways, forward)), sideways * (len(positions) - 1)


def mixed_orientations(orientations) -> str:
    """Why slices of these ImageOrientationPatient values are not one stack ("" where they are): more than
    ORIENTATION_TOLERANCE apart, as dcm2niix tells stacks apart."""
    kinds: list[np.ndarray] = []  # one orientation of each group of slices within the tolerance
    for value in np.array(orientations, dtype=float):
        if not any(np.abs(value - kind).max() <= ORIENTATION_TOLERANCE for kind in kinds):
            kinds.append(value)
    return f"slices in {len(kinds)} different orientations" if len(kinds) > 1 else ""


def measure_stack(positions, orientation) -> Stack | None:
    """The :class:`Stack` of slices at ``positions`` (ImagePositionPatient of each) with ``orientation`` (one
    ImageOrientationPatient for all); None where the orientation or a position is missing."""
    normal = slice_normal(orientation)
    if normal is None or not positions or any(p is None or len(p) != 3 for p in positions):
        return None
    points = np.asarray(positions, float)
    projected = points @ normal
    order = np.argsort(projected, kind="stable")
    along, points = projected[order], points[order]
    if len(along) < 2:
        return Stack(
            tuple(int(i) for i in order),
            tuple(along),
            tuple(normal),
            None,
            None,
            None,
            None,
            ("a single slice, not a volume",),
        )
    spacing = float(np.median(np.diff(along)))
    tolerance = position_tolerance(spacing)
    problems = [_shared_positions(along, tolerance)]
    tilt_deg, start, step = None, None, None
    if not problems[0]:
        problems.append(_uneven(along, spacing, tolerance))
        step, start = (float(v) for v in np.polyfit(np.arange(len(along)), along, 1))
        tilt_deg, shift = _tilt(points, normal)
        if tilt_deg > MAX_TILT_DEGREES and shift > tolerance:
            problems.append(f"gantry tilt of {_degrees(tilt_deg)} degrees (slices sheared along the table)")
        tilt_deg = round(tilt_deg, 2)
    return Stack(
        tuple(int(i) for i in order),
        tuple(float(a) for a in along),
        tuple(float(v) for v in normal),
        spacing,
        start,
        step,
        tilt_deg,
        tuple(p for p in problems if p),
        doubled=bool(problems[0]),
    )


# --- a converted volume against the stack ------------------------------------------------------------------------


def _slice_axis(affine: np.ndarray, stack: Stack) -> tuple[np.ndarray, float, float]:
    """(the normal in world axes, where the volume's first slice lies along it, the signed step between slices)."""
    normal = LPS_TO_RAS * np.asarray(stack.normal)
    return normal, float(affine[:3, 3] @ normal), float(affine[:3, 2] @ normal)


def volume_disagreement(affine, slices: int, stack: Stack, resliced: bool) -> str:
    """How a volume of ``slices`` slices with ``affine`` (NIfTI world axes, slices along its third axis) disagrees
    with the slices of the headers along the slice normal; "" where it agrees within the stack's tolerance.

    Not resliced (one slice per image): as many slices as the headers have (:func:`affine_on_stack` then puts
    them in their places). Resliced to equal spacing (over a missing slice): from the first header position to
    the last, no coarser than the spacing."""
    affine = np.asarray(affine, float)
    _, first, step = _slice_axis(affine, stack)
    if abs(step) < 0.5 * np.linalg.norm(affine[:3, 2]):  # more than 60 degrees off the normal
        return "its third axis not along the slice normal of the headers"
    if step < 0:  # slices from the top down
        first, step = first + step * (slices - 1), -step
    tolerance = stack.tolerance
    if resliced:
        agrees = (
            abs(first - stack.along[0]) <= tolerance
            and step <= stack.spacing + tolerance
            and abs(step * (slices - 1) - stack.extent) <= max(tolerance, step / 2)
        )
    else:
        agrees = slices == len(stack.along)
    if agrees:
        return ""
    return (
        f"{_plural(slices, 'slice')} {_mm(step)} mm apart from {_mm(first)} mm along the slice normal, where the "
        f"headers put {len(stack.along)} slices {_mm(stack.spacing)} mm apart from {_mm(stack.along[0])} mm over "
        f"{_mm(stack.extent)} mm"
    )


def affine_on_stack(affine, stack: Stack) -> np.ndarray:
    """``affine`` of a volume of one slice per header slice (slices along its third axis, in either direction),
    with the slice axis and the first slice moved along the normal onto the stack fitted to the positions: the
    true geometry where a converter took the spacing from two slices only. The in-plane axes are kept."""
    affine = np.array(affine, float)
    normal, first, step = _slice_axis(affine, stack)
    slices_up = step > 0
    target = stack.start if slices_up else stack.start + stack.step * (len(stack.along) - 1)
    affine[:3, 2] = normal * (stack.step if slices_up else -stack.step)
    affine[:3, 3] += (target - first) * normal
    return affine
