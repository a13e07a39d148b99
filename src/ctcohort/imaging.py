"""Reading CT volumes and label maps as they come from the wild.

CT: int16/int32/float on disk, possibly with scl_slope/scl_inter; we return HU
without inflating to float64 when the scaling keeps values integral.
Label maps: often stored as float (nnU-Net and TotalSegmentator outputs are);
we cast to an integer type after checking the values really are integers.
Plausibility: ``check_ct`` rejects a CT whose header or intensities cannot be a
CT in HU (see ``ScanChecks``), so that it fails instead of entering the cohort
as a plausible-looking number.

Gzipped NIfTI (.nii.gz) is inflated with ISA-L (``isal.igzip``), about twice as
fast as zlib: reading is most of the time it takes to measure a scan. nibabel
still parses the header and scales the data; only the decompressor differs.

Every error message is one line that names the file and the cause: the
workflow records it in failures.tsv.
"""

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path

import nibabel as nib
import numpy as np

try:
    from isal import igzip as fast_gzip  # ISA-L's inflate, a drop-in for the gzip module
except ImportError:  # a platform without isal's wheels: nibabel's own reader (zlib)
    fast_gzip = None

AFFINE_TOLERANCE_MM = 1e-3
# |det| / product of the voxel sizes below this: the axes are (nearly) parallel, no 3-D grid
MIN_AFFINE_ORTHOGONALITY = 1e-6
CT_CHECKS_KEY = "measure.ct_checks"
# sform and qform placing the volume's corners further apart than this disagree (the qform's quaternion
# rounds an affine by far less)
ORIENTATION_TOLERANCE_MM = 0.5
log = logging.getLogger(__name__)


class GridMismatchError(ValueError):
    """The segmentation does not lie on the CT's voxel grid."""


class ImplausibleScanError(ValueError):
    """The CT's header or intensities cannot be those of a CT in HU."""


def one_line(text: object) -> str:
    """``text`` with every run of whitespace (newlines included) collapsed to one space."""
    return " ".join(str(text).split())


@dataclass(frozen=True)
class ScanChecks:
    """Thresholds of ``check_ct`` (config: ``measure.ct_checks``); ``None`` disables a check.

    ``min_spacing_mm``, ``max_spacing_mm``: plausible voxel size of a CT along each axis.
    Thin-slice CT is 0.2-0.5 mm, old thick-slice CT up to 10 mm; the defaults (0.1 and 15 mm)
    catch headers whose zooms are in the wrong unit (metres, micrometres) or broken.
    ``lowest_hu_at_most``: the lowest finite voxel must be at most this (default -500 HU).
    Every CT in HU holds air, outside the body or in lungs and bowel, near -1000 HU; a minimum
    >= 0 is the classic missing rescale intercept (raw 0..4095 scanner values stored without
    the -1024; with padding below -1024 the shifted minimum can stay negative, so the message
    asks about the intercept whenever this check fails). Raise it (or disable it) only for a
    field of view cropped inside the body.
    A constant image (every finite voxel the same value) always fails, and so does a CT whose
    voxels are all non-finite.
    """

    min_spacing_mm: float | None = 0.1
    max_spacing_mm: float | None = 15.0
    lowest_hu_at_most: float | None = -500.0

    def __post_init__(self):
        for field in fields(self):
            value = getattr(self, field.name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{CT_CHECKS_KEY}.{field.name} must be a finite number or null, not {value!r}")
            object.__setattr__(self, field.name, float(value))
        for name in ("min_spacing_mm", "max_spacing_mm"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{CT_CHECKS_KEY}.{name} must be positive, not {value!r}")
        low, high = self.min_spacing_mm, self.max_spacing_mm
        if low is not None and high is not None and low > high:
            raise ValueError(
                f"{CT_CHECKS_KEY}.min_spacing_mm ({low:g}) is above {CT_CHECKS_KEY}.max_spacing_mm ({high:g})"
            )

    @classmethod
    def from_config(cls, mapping: Mapping | None) -> "ScanChecks":
        """From the config's ``measure.ct_checks`` (missing keys keep their defaults; null disables)."""
        mapping = {} if mapping is None else dict(mapping)
        known = {field.name for field in fields(cls)}
        unknown = sorted(set(mapping) - known)
        if unknown:
            raise ValueError(
                f"{CT_CHECKS_KEY}: unknown key(s) {', '.join(map(str, unknown))}; known: {', '.join(sorted(known))}"
            )
        return cls(**mapping)


def _mm(values) -> str:
    return " x ".join(f"{v:.4g}" for v in values)


def finite_range(values: np.ndarray) -> tuple[float | None, float | None, int]:
    """(lowest, highest, number of non-finite voxels) over the finite voxels of ``values``.

    Integer arrays cannot hold NaN: two reductions. Float arrays: two reductions too unless
    they hold NaN or inf; then one boolean mask and two masked reductions (no float copy).
    Lowest and highest are None when no voxel is finite.
    """
    if values.size == 0:
        return None, None, 0
    if not np.issubdtype(values.dtype, np.floating):
        return values.min().item(), values.max().item(), 0
    with np.errstate(invalid="ignore"):
        lowest, highest = values.min(), values.max()
    if np.isfinite(lowest) and np.isfinite(highest):
        return lowest.item(), highest.item(), 0
    finite = np.isfinite(values)
    n_finite = int(np.count_nonzero(finite))
    if n_finite == 0:
        return None, None, values.size
    lowest = values.min(where=finite, initial=np.inf)
    highest = values.max(where=finite, initial=-np.inf)
    return lowest.item(), highest.item(), values.size - n_finite


def check_affine(affine: np.ndarray, source: str | Path, checks: ScanChecks = ScanChecks()) -> None:
    """Raise ImplausibleScanError for a broken voxel-to-world matrix or an implausible voxel size."""
    linear = np.asarray(affine, dtype=np.float64)[:3, :3]
    if not np.all(np.isfinite(linear)):
        raise ImplausibleScanError(
            f"{source}: the header's affine holds non-finite values: {one_line(linear.tolist())}"
        )
    spacing = voxel_spacing_mm(linear)
    determinant = abs(float(np.linalg.det(linear)))
    if determinant == 0 or determinant < MIN_AFFINE_ORTHOGONALITY * float(np.prod(spacing)):
        raise ImplausibleScanError(
            f"{source}: the header's affine is not invertible (voxel volume {determinant:.3g} mm3, "
            f"voxel axes {one_line(np.round(linear, 4).tolist())}): no voxel grid to measure on"
        )
    if checks.min_spacing_mm is not None and spacing.min() < checks.min_spacing_mm:
        raise ImplausibleScanError(
            f"{source}: implausible voxel size {_mm(spacing)} mm: {spacing.min():.4g} mm is below "
            f"{checks.min_spacing_mm:g} mm (header zooms in the wrong unit?) ({CT_CHECKS_KEY}.min_spacing_mm)"
        )
    if checks.max_spacing_mm is not None and spacing.max() > checks.max_spacing_mm:
        raise ImplausibleScanError(
            f"{source}: implausible voxel size {_mm(spacing)} mm: {spacing.max():.4g} mm is above "
            f"{checks.max_spacing_mm:g} mm (header zooms in the wrong unit?) ({CT_CHECKS_KEY}.max_spacing_mm)"
        )


def sform_qform_disagreement(img: nib.Nifti1Image) -> float | None:
    """How far apart (mm, the largest over the volume's 8 corners) the sform and the qform put the volume, where
    the header sets both (codes above 0) and they differ by more than ORIENTATION_TOLERANCE_MM; else None."""
    header = img.header
    if not hasattr(header, "get_sform") or header["sform_code"] <= 0 or header["qform_code"] <= 0:
        return None
    corners = np.array(
        [[i, j, k, 1.0] for i in (0, img.shape[0] - 1) for j in (0, img.shape[1] - 1) for k in (0, img.shape[2] - 1)]
    ).T
    distance = float(np.linalg.norm(((header.get_sform() - header.get_qform()) @ corners)[:3], axis=0).max())
    return distance if distance > ORIENTATION_TOLERANCE_MM else None


def orientation_words(img: nib.Nifti1Image) -> str:
    """One clause on a CT whose sform and qform disagree ("" where they agree or one is unset)."""
    distance = sform_qform_disagreement(img)
    if distance is None:
        return ""
    return (
        f"its sform and qform disagree by up to {distance:.1f} mm (sform_code {int(img.header['sform_code'])}, "
        f"qform_code {int(img.header['qform_code'])}); the sform is used, as nibabel and ITK do"
    )


def check_orientation(img: nib.Nifti1Image, source: str | Path) -> float | None:
    """A CT without an orientation (sform_code and qform_code both 0) fails: left and right cannot be told apart,
    and the QC's faces and preview would come out mirrored. One whose sform and qform disagree is measured on
    the sform, with a warning that says by how much; the distance (mm) is returned for the QC table (None where
    they agree)."""
    header = img.header
    if hasattr(header, "get_sform") and header["sform_code"] <= 0 and header["qform_code"] <= 0:
        raise ImplausibleScanError(
            f"{source}: orientation undefined (sform_code and qform_code are 0): left and right cannot be told "
            "apart; write the image with its orientation (convert the DICOM series again, or set the sform)"
        )
    words = orientation_words(img)
    if words:
        log.warning("%s: %s", source, words)
    return sform_qform_disagreement(img)


def check_ct(hu: np.ndarray, affine: np.ndarray, source: str | Path, checks: ScanChecks = ScanChecks()) -> None:
    """Raise ImplausibleScanError (one line naming ``source``) if ``hu`` on ``affine`` is not plausibly a CT in HU.

    Header: a finite, invertible affine with voxel sizes within ``checks``' spacing range.
    Intensities, over the finite voxels only: at least one finite voxel, not constant, and the
    lowest at most ``checks.lowest_hu_at_most``. Non-finite voxels themselves are measure's
    business (outside every structure they are ignored, inside one its HU is excluded).
    No float64 copy of the volume: min/max reductions, plus one boolean mask for float CTs
    that hold NaN or inf.
    """
    check_affine(affine, source, checks)
    if hu.size == 0:
        raise ImplausibleScanError(f"{source}: the CT holds no voxel (shape {hu.shape})")
    lowest, highest, _ = finite_range(hu)
    if lowest is None:
        raise ImplausibleScanError(f"{source}: not plausibly in HU: all {hu.size} voxels are NaN or infinite")
    if lowest == highest:
        raise ImplausibleScanError(f"{source}: not plausibly in HU: constant image (every finite voxel is {lowest:g})")
    limit = checks.lowest_hu_at_most
    if limit is not None and lowest > limit:
        # the hint also when the minimum is negative: padding below -1024 HU (common) shifted by +1024
        raise ImplausibleScanError(
            f"{source}: not plausibly in HU: lowest value {lowest:g} is above {limit:g} HU (no air); "
            f"was the rescale intercept (-1024) not applied? ({CT_CHECKS_KEY}.lowest_hu_at_most)"
        )


GZIP_MAGIC = b"\x1f\x8b"
# Single-file NIfTI: (image class, offset of the magic string in the header, magic)
SINGLE_FILE_NIFTI = ((nib.Nifti1Image, 344, b"n+1\x00"), (nib.Nifti2Image, 4, b"n+2\x00"))
NIFTI_HEADER_BYTES = max(klass.header_class.sizeof_hdr for klass, _, _ in SINGLE_FILE_NIFTI)


def _nifti_class(head: bytes) -> type[nib.Nifti1Image] | None:
    """The single-file NIfTI class whose header ``head`` (the file's first bytes) starts, if any."""
    for klass, offset, magic in SINGLE_FILE_NIFTI:
        if head[offset : offset + len(magic)] == magic and klass.header_class.may_contain_header(head):
            return klass
    return None


def _load_gzipped_nifti(path: Path, in_memory: bool) -> nib.Nifti1Image | None:
    """A gzipped single-file NIfTI inflated by ISA-L, or None for anything else (nibabel decides).

    The image is the one ``nib.load`` gives (header, affine, scaling, a proxy for the data). Lazily, nibabel
    reads the data through the decompressing stream when the proxy is first read; ``in_memory``, the whole
    file is inflated now, in one call that releases the GIL, and the proxy reads the inflated bytes.
    """
    if fast_gzip is None:
        return None
    with path.open("rb") as raw:
        if raw.read(len(GZIP_MAGIC)) != GZIP_MAGIC:
            return None
        if in_memory:
            data = fast_gzip.decompress(GZIP_MAGIC + raw.read())
            klass = _nifti_class(data[:NIFTI_HEADER_BYTES])
            return None if klass is None else klass.from_bytes(data)
    stream = fast_gzip.open(path, "rb")
    klass = _nifti_class(stream.read(NIFTI_HEADER_BYTES))
    if klass is None:
        stream.close()
        return None
    stream.seek(0)
    return klass.from_stream(stream)


def load_image(path: str | Path, *, in_memory: bool = False) -> nib.Nifti1Image:
    """A 3-D NIfTI image; gzipped files inflate with ISA-L where it is installed.

    The data are read when first used, unless ``in_memory``: then a gzipped file is inflated at once, in
    one call that lets other threads run (the image holds the inflated bytes until it is dropped).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such image: {path}")
    try:
        img = _load_gzipped_nifti(path, in_memory) or nib.load(path)
    except Exception as err:  # nibabel raises several types for unreadable files
        hint = (
            "; the file is cut short (an interrupted copy or download?): copy it again"
            if isinstance(err, EOFError) or "ended before" in str(err)
            else ""
        )
        raise ValueError(f"cannot read {path} as NIfTI: {one_line(err)}{hint}") from err
    if len(img.shape) != 3:
        raise ValueError(
            f"{path}: expected a 3-D volume, got shape {img.shape}: give one CT volume (not a slice, "
            "not a series of volumes)"
        )
    return img


def _scaling(img: nib.Nifti1Image) -> tuple[float, float]:
    slope, inter = img.dataobj.slope, img.dataobj.inter
    slope = 1.0 if slope is None or not np.isfinite(slope) or slope == 0 else float(slope)
    inter = 0.0 if inter is None or not np.isfinite(inter) else float(inter)
    return slope, inter


def ct_hounsfield(img: nib.Nifti1Image) -> np.ndarray:
    """CT voxel values in HU: an integer array where the scaling allows, else float32."""
    if not nib.is_proxy(img.dataobj):  # an image built in memory holds its values already
        return np.asanyarray(img.dataobj)
    raw = np.asanyarray(img.dataobj.get_unscaled())
    slope, inter = _scaling(img)
    if np.issubdtype(raw.dtype, np.integer) and slope.is_integer() and inter.is_integer():
        if slope == 1 and inter == 0:
            return raw
        return raw.astype(np.int32) * int(slope) + int(inter)
    hu = raw.astype(np.float32)
    if slope != 1 or inter != 0:
        hu = hu * np.float32(slope) + np.float32(inter)
    return hu


def label_array(img: nib.Nifti1Image, source: str | Path = "label map") -> np.ndarray:
    """Integer labels (uint8 or uint16) from a label map stored with any dtype."""
    values = np.asanyarray(img.dataobj)
    if not np.issubdtype(values.dtype, np.integer):
        rounded = np.rint(values)
        if not np.allclose(values, rounded, atol=1e-3, equal_nan=False):
            raise ValueError(f"{source}: label map holds non-integer values (is it a probability map?)")
        values = rounded
    lowest, highest = values.min(), values.max()
    if lowest < 0:
        raise ValueError(f"{source}: label map holds negative labels (min {lowest})")
    dtype = np.uint8 if highest <= np.iinfo(np.uint8).max else np.uint16
    if highest > np.iinfo(np.uint16).max:
        raise ValueError(f"{source}: label {highest} is too large for a label map")
    return values.astype(dtype, copy=False)


def voxel_volume_ml(affine: np.ndarray) -> float:
    return abs(float(np.linalg.det(affine[:3, :3]))) / 1000.0


def voxel_spacing_mm(affine: np.ndarray) -> np.ndarray:
    return np.sqrt((affine[:3, :3] ** 2).sum(axis=0))


def seg_on_ct_grid(seg: nib.Nifti1Image, ct: nib.Nifti1Image, source: str | Path = "segmentation") -> np.ndarray:
    """Labels of ``seg`` on the voxel grid of ``ct``.

    A segmentation stored in another orientation of the same grid (e.g. LPS
    instead of RAS) is reoriented; anything else is a GridMismatchError.
    """
    labels = label_array(seg, source)
    if seg.shape == ct.shape and np.allclose(seg.affine, ct.affine, atol=AFFINE_TOLERANCE_MM):
        return labels
    transform = nib.orientations.ornt_transform(
        nib.orientations.io_orientation(seg.affine), nib.orientations.io_orientation(ct.affine)
    )
    reoriented = nib.orientations.apply_orientation(labels, transform)
    affine = seg.affine @ nib.orientations.inv_ornt_aff(transform, seg.shape)
    if reoriented.shape == ct.shape and np.allclose(affine, ct.affine, atol=AFFINE_TOLERANCE_MM):
        return np.ascontiguousarray(reoriented)
    ct_words = orientation_words(ct)
    raise GridMismatchError(
        f"{source}: grid does not match the CT (shape {seg.shape} vs {ct.shape}, "
        f"affine {np.round(seg.affine, 3).tolist()} vs {np.round(ct.affine, 3).tolist()}); "
        + (f"the CT itself is in doubt: {ct_words}; " if ct_words else "")
        + "segment the CT itself or resample the label map onto it (nearest neighbour)"
    )
