"""Quality control of each scan and structure, and the plausibility exclusions applied before the statistics.

Per scan, where the CT and its label map are already in memory (right after measuring, ``scan_qc``):

- which faces of the field of view cut each structure off (``cut_faces``), named in RAS+ world axes:
  ``x-``/``x+`` the subject's left/right, ``y-``/``y+`` posterior/anterior, ``z-``/``z+`` inferior/superior
  (caudal/cranial); an image stored in another orientation is mapped to these by its affine's nearest axes;
- body coverage: the most cranial and the most caudal vertebra present (``vertebral_coverage``);
- a preview PNG: axial, coronal and sagittal planes through the body's centre with the label overlay
  (``preview_png``), deterministic bytes.

Cohort-wide, where the measurements are joined (``apply_plausibility``, in the aggregate rule): a volume
outside a structure's plausible range (a table, ``load_plausible_volumes``) is excluded as
``implausible_volume``; a median HU outside a tissue window as ``implausible_hu``. Done there, not per scan,
so that a change of the table or the window re-runs one cohort job, not every scan's segmentation.
"""

from __future__ import annotations

import io
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from ctcohort.columns import GEOMETRY_COLUMNS, HU_COLUMNS, QC_COLUMNS
from ctcohort.resources import resources_dir
from ctcohort.tables import BLANK, MISSING, read_tsv, write_tsv

if TYPE_CHECKING:
    import pandas as pd

FACES = ("x-", "x+", "y-", "y+", "z-", "z+")
PLAUSIBLE_COLUMNS = ["structure", "min_ml", "max_ml", "source"]
BUILTIN_PLAUSIBLE_VOLUMES = {"total_v1": "plausible_volumes_total_v1.csv"}
# Vertebrae from cranial to caudal: TotalSegmentator's names (v1 and v2) vertebrae_C1 .. vertebrae_S1
VERTEBRA_PATTERN = re.compile(r"^vertebrae_([CTLS])(\d+)$")
VERTEBRA_REGIONS = "CTLS"
# The preview: soft-tissue window (level 40, width 400 HU), body = voxels above BODY_HU
PREVIEW_WINDOW = (-160.0, 240.0)
BODY_HU = -500.0
OVERLAY_ALPHA = 0.45
# The geometry checks look at every k-th voxel along each axis, k chosen so that the grid is about this coarse
# (a 0.8 x 0.8 x 1.5 mm scan: every 3rd, 3rd and 2nd voxel, 1/18 of them; a 3 mm scan: all). Centres of mass
# move by less than a grid step, a piece of 1 ml still holds about 37 grid points, and parts thinner than a step
# can fall between them: hence ONE_PIECE leaves thin structures out. Measured: benchmarks/qc_speed.py.
GEOMETRY_GRID_MM = 3.0
# Structures that are one piece in a body, named as in TotalSegmentator v1 and v2: a second sizeable piece is
# a mislabelled region (a fragment of a neighbour). Left out: thin or tubular structures that a segmentation
# often breaks without being wrong (ribs, adrenal glands, pancreas, bowel, vessels but the aorta, muscles).
ONE_PIECE = frozenset(
    {
        "spleen",
        "kidney_left",
        "kidney_right",
        "liver",
        "gallbladder",
        "stomach",
        "urinary_bladder",
        "brain",
        "heart",
        "aorta",
        "trachea",
        "lung_upper_lobe_left",
        "lung_lower_lobe_left",
        "lung_upper_lobe_right",
        "lung_middle_lobe_right",
        "lung_lower_lobe_right",
        "sacrum",
        "sternum",
        "skull",
        *(
            f"{bone}_{side}"
            for bone in ("femur", "hip", "humerus", "scapula", "clavicula")
            for side in ("left", "right")
        ),
        *(
            f"vertebrae_{region}{n}"
            for region, count in (("C", 7), ("T", 12), ("L", 5), ("S", 1))
            for n in range(1, count + 1)
        ),
    }
)


@dataclass(frozen=True)
class QCSettings:
    """Quality control: config's ``qc`` block key for key (documented in config/README.md), plus the border
    margin and minimum voxel count of the ``measure`` block, which the cut-off faces and the vertebral
    coverage share with the measurement. The field defaults are the only defaults (``ctcohort.config_defaults``
    writes them into config/config.yaml).

    Per scan (``scan_qc``, in the job that measures the scan): ``border_margin``, ``min_voxels`` and
    ``preview_width`` (pixels; None: no preview). The rest is applied cohort-wide (aggregate rule,
    review.py), so that changing a threshold re-runs one cohort job, not every scan's segmentation.
    """

    border_margin: int = 3
    min_voxels: int = 10
    preview_width: int | None = 600
    plausible_volumes: str | None = "total_v1"
    hu_window: tuple[float, float] | None = (-1100.0, 3000.0)
    # the sanity checks of review.py (thresholds documented there)
    laterality_margin_mm: float = 0.0
    vertebra_order_margin_mm: float = 5.0
    fragment_min_ml: float = 1.0
    volume_outlier_z: float = 5.0
    volume_outlier_min_scans: int = 20
    review_decisions: str | None = None

    def __post_init__(self):
        if self.hu_window is not None:
            object.__setattr__(self, "hu_window", tuple(float(v) for v in self.hu_window))
        for name in ("laterality_margin_mm", "vertebra_order_margin_mm", "fragment_min_ml"):
            if getattr(self, name) < 0:
                raise ValueError(f"qc.{name} must be 0 or more, not {getattr(self, name)}")
        if self.volume_outlier_z <= 0 or self.volume_outlier_min_scans < 3:
            raise ValueError("qc.volume_outlier_z must be above 0 and qc.volume_outlier_min_scans at least 3")

    @classmethod
    def from_config(cls, config: Mapping) -> QCSettings:
        """From the whole config (its ``qc`` block and ``measure``'s border_margin and min_voxels)."""
        values = {key: value for key, value in dict(config["qc"]).items() if key not in ("preview",)}
        if not config["qc"].get("preview", True):
            values["preview_width"] = None
        measure = config["measure"]
        return cls(border_margin=measure["border_margin"], min_voxels=measure["min_voxels"], **values)

    def per_scan(self) -> dict:
        """The fields ``scan_qc`` uses: the per-scan jobs' params (a cohort threshold re-runs no scan)."""
        return {"border_margin": self.border_margin, "min_voxels": self.min_voxels, "preview_width": self.preview_width}


class ScanQC(NamedTuple):
    table: pd.DataFrame  # QC_COLUMNS, one row per structure
    preview: bytes | None  # PNG


# --- field of view ----------------------------------------------------------------------------------------


def face_names(affine: np.ndarray) -> list[tuple[str, str]]:
    """Per voxel axis: the RAS+ names of its low (index 0) and high (last index) faces."""
    import nibabel as nib

    names = []
    for world, direction in nib.orientations.io_orientation(affine):
        axis = "xyz"[int(world)]
        low, high = (f"{axis}-", f"{axis}+") if direction > 0 else (f"{axis}+", f"{axis}-")
        names.append((low, high))
    return names


def labels_touching_faces(labels: np.ndarray, margin: int, size: int) -> np.ndarray:
    """Boolean (axes, 2, size): label id has a voxel within ``margin`` voxels of the low (0) or high (1)
    face of each voxel axis (ids from ``size`` on are left out). ``margin`` <= 0: none."""
    touching = np.zeros((labels.ndim, 2, size), dtype=bool)
    if margin <= 0:
        return touching
    for axis in range(labels.ndim):
        for end, part in enumerate((slice(None, margin), slice(-margin, None))):
            index = [slice(None)] * labels.ndim
            index[axis] = part
            found = np.unique(labels[tuple(index)])
            touching[axis, end, found[found < size]] = True
    return touching


def cut_faces(labels: np.ndarray, affine: np.ndarray, ids: Sequence[int], margin: int) -> list[str]:
    """Per label id of ``ids``: the faces (RAS+, in FACES order, joined by ";") it touches; "" for none."""
    ids = np.asarray(ids, dtype=np.intp)
    size = int(ids.max(initial=0)) + 1
    touching = labels_touching_faces(labels, margin, size)
    names = face_names(affine)
    by_face = {face: np.zeros(size, dtype=bool) for face in FACES}
    for axis, (low, high) in enumerate(names):
        by_face[low] |= touching[axis, 0]
        by_face[high] |= touching[axis, 1]
    return [";".join(face for face in FACES if by_face[face][i]) for i in ids]


# --- body coverage ----------------------------------------------------------------------------------------


def vertebra_rank(name: str) -> int | None:
    """Position from cranial (C1: 0) to caudal of a vertebra's structure name; None for other structures."""
    match = VERTEBRA_PATTERN.match(str(name))
    if match is None:
        return None
    return VERTEBRA_REGIONS.index(match.group(1)) * 100 + int(match.group(2))


def vertebral_coverage(structures: Sequence[str], present: Sequence[bool]) -> tuple[str, str]:
    """(most cranial, most caudal) vertebra among ``structures`` that are ``present``; ("", "") for none."""
    found = [
        (rank, name) for name, here in zip(structures, present) if here and (rank := vertebra_rank(name)) is not None
    ]
    if not found:
        return "", ""
    return min(found)[1], max(found)[1]


# --- geometry: where each structure lies, and in how many pieces -----------------------------------------


def geometry_strides(affine: np.ndarray) -> tuple[int, ...]:
    """Per voxel axis: every k-th voxel makes a grid of about GEOMETRY_GRID_MM (1 for coarse scans)."""
    zooms = np.sqrt((np.asarray(affine, dtype=float)[:3, :3] ** 2).sum(axis=0))
    return tuple(max(1, int(GEOMETRY_GRID_MM // zoom)) if zoom > 0 else 1 for zoom in zooms)


def _centroid(mask: np.ndarray) -> np.ndarray:
    """Centre of mass (voxel index, float) of a boolean array, from its three profiles."""
    total = np.count_nonzero(mask)
    return np.array(
        [
            float(profile @ np.arange(profile.size)) / total
            for profile in (np.count_nonzero(mask, axis=tuple(a for a in range(3) if a != axis)) for axis in range(3))
        ]
    )


def _second_piece_voxels(mask: np.ndarray) -> int:
    """Voxels of the second-largest connected piece (26-connected; 0 for one piece)."""
    from scipy import ndimage

    pieces, n = ndimage.label(mask, structure=np.ones((3, 3, 3), dtype=bool))
    if n < 2:
        return 0
    return int(np.sort(np.bincount(pieces.ravel())[1:])[-2])


def structure_geometry(
    labels: np.ndarray, affine: np.ndarray, ids: Sequence[int], names: Sequence[str], present: Sequence[bool]
) -> pd.DataFrame:
    """Per label id of ``ids`` (GEOMETRY_COLUMNS): the centre of mass in world millimetres (RAS+: x grows to
    the subject's right, y anterior, z superior), and for structures of ONE_PIECE the volume (ml) of the
    second-largest connected piece; NaN where the structure is not ``present``. On the grid of ``geometry_strides``:
    one bounding-box pass, then each structure's box only."""
    import pandas as pd
    from scipy import ndimage

    strides = geometry_strides(affine)
    grid = labels[tuple(slice(None, None, k) for k in strides)]
    values = np.full((len(ids), len(GEOMETRY_COLUMNS)), np.nan)
    boxes = ndimage.find_objects(grid, max_label=int(max(ids, default=0)))
    voxel_ml = abs(float(np.linalg.det(np.asarray(affine, dtype=float)[:3, :3]))) * float(np.prod(strides)) / 1000.0
    for row, (label, name, here) in enumerate(zip(ids, names, present)):
        box = boxes[label - 1] if 0 < label <= len(boxes) else None
        if not here or box is None:
            continue
        mask = grid[box] == label
        index = (np.array([part.start for part in box]) + _centroid(mask)) * np.array(strides)
        values[row, :3] = (np.asarray(affine, dtype=float) @ np.append(index, 1.0))[:3]
        if name in ONE_PIECE:
            values[row, 3] = _second_piece_voxels(mask) * voxel_ml
    return pd.DataFrame(values, columns=GEOMETRY_COLUMNS)


# --- preview ----------------------------------------------------------------------------------------------


def _label_colours(size: int) -> np.ndarray:
    """A fixed colour per label id (hues spaced by the golden angle), uint8 (size, 3)."""
    import colorsys

    colours = np.zeros((size, 3), dtype=np.uint8)
    for label in range(1, size):
        hue = (label * 0.618033988749895) % 1.0
        colours[label] = np.round(np.array(colorsys.hsv_to_rgb(hue, 0.85, 1.0)) * 255)
    return colours


def body_centre(hu: np.ndarray, step: int = 2) -> tuple[int, ...]:
    """Voxel index of the centre of mass of the body (voxels above BODY_HU, on every ``step``-th voxel);
    the image's centre where there is none."""
    sample = hu[(slice(None, None, step),) * hu.ndim] > BODY_HU
    total = np.count_nonzero(sample)
    if total == 0:
        return tuple(n // 2 for n in hu.shape)
    centre = []
    for axis in range(hu.ndim):
        profile = np.count_nonzero(sample, axis=tuple(a for a in range(hu.ndim) if a != axis))
        index = float(profile @ np.arange(profile.size)) / total
        centre.append(min(int(round(index * step)), hu.shape[axis] - 1))
    return tuple(centre)


def _panel(hu: np.ndarray, labels: np.ndarray, colours: np.ndarray, spacing: tuple[float, float], tile: int):
    """A tile x tile RGB image of one plane (rows, columns), aspect from ``spacing`` (mm), centred on black."""
    from PIL import Image

    low, high = PREVIEW_WINDOW
    grey = np.nan_to_num(np.clip((hu.astype(np.float64) - low) * (255.0 / (high - low)), 0, 255))
    rgb = np.repeat(grey[..., None], 3, axis=-1)
    inside = labels > 0
    rgb[inside] = (1 - OVERLAY_ALPHA) * rgb[inside] + OVERLAY_ALPHA * colours[labels[inside]]
    image = Image.fromarray(np.round(rgb).astype(np.uint8), "RGB")
    height_mm, width_mm = hu.shape[0] * spacing[0], hu.shape[1] * spacing[1]
    scale = tile / max(height_mm, width_mm)
    size = (max(1, round(width_mm * scale)), max(1, round(height_mm * scale)))
    image = image.resize(size, Image.Resampling.NEAREST)
    canvas = Image.new("RGB", (tile, tile))
    canvas.paste(image, ((tile - size[0]) // 2, (tile - size[1]) // 2))
    return canvas


def preview_png(hu: np.ndarray, labels: np.ndarray, affine: np.ndarray, width: int = QCSettings.preview_width) -> bytes:
    """PNG of three square panels side by side (``width`` x ``width`` // 3 pixels): axial, coronal and sagittal
    planes through the body's centre (``body_centre``), soft-tissue window, labels as coloured overlay.

    Shown in radiological convention: the subject's right on the left of the axial and coronal panels,
    anterior up (axial), superior up (coronal, sagittal), anterior on the left (sagittal). The bytes depend on
    the arrays and the affine only (no time stamp, no metadata)."""
    import nibabel as nib
    from PIL import Image

    ornt = nib.orientations.io_orientation(affine)
    ras_hu = nib.orientations.apply_orientation(hu, ornt)  # views: flips and a transpose
    ras_labels = nib.orientations.apply_orientation(labels, ornt)
    zooms = np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0))
    sx, sy, sz = (float(zooms[int(np.flatnonzero(ornt[:, 0] == world)[0])]) for world in range(3))
    cx, cy, cz = body_centre(ras_hu)
    tile = width // 3
    # each plane as (rows, columns): np.flip so that the first row/column is what the convention puts there
    planes = [
        (ras_hu[::-1, ::-1, cz].T, ras_labels[::-1, ::-1, cz].T, (sy, sx)),  # axial: rows anterior->posterior
        (ras_hu[::-1, cy, ::-1].T, ras_labels[::-1, cy, ::-1].T, (sz, sx)),  # coronal: superior->inferior
        (ras_hu[cx, ::-1, ::-1].T, ras_labels[cx, ::-1, ::-1].T, (sz, sy)),  # sagittal: anterior on the left
    ]
    colours = _label_colours(max(int(plane.max(initial=0)) for _, plane, _ in planes) + 1)
    canvas = Image.new("RGB", (3 * tile, tile))
    for k, (plane_hu, plane_labels, spacing) in enumerate(planes):
        canvas.paste(_panel(plane_hu, np.asarray(plane_labels, dtype=np.intp), colours, spacing, tile), (k * tile, 0))
    buffer = io.BytesIO()
    canvas.save(buffer, format="PNG")
    return buffer.getvalue()


def placeholder_png() -> bytes:
    """The preview of a scan that failed: one black pixel."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buffer, format="PNG")
    return buffer.getvalue()


# --- per scan ---------------------------------------------------------------------------------------------


def scan_qc(
    hu: np.ndarray,
    labels: np.ndarray,
    affine: np.ndarray,
    measurements: pd.DataFrame,
    settings: QCSettings = QCSettings(),
    sform_qform_mm: float | None = None,
) -> ScanQC:
    """QC of one measured scan: per structure of ``measurements`` (columns.MEASURE_COLUMNS) the faces that
    cut it (only for structures with a voxel), its geometry (``structure_geometry``), and the scan's vertebral
    coverage (vertebrae with at least ``settings.min_voxels`` voxels, cut off or not) and ``sform_qform_mm``
    (imaging.sform_qform_disagreement; None: they agree); the preview where ``settings.preview_width``."""
    import pandas as pd

    faces = cut_faces(labels, affine, measurements["label"].to_numpy(), settings.border_margin)
    present = measurements["n_voxels"].to_numpy() > 0
    cranial, caudal = vertebral_coverage(
        measurements["structure"], measurements["n_voxels"].to_numpy() >= settings.min_voxels
    )
    table = pd.DataFrame(
        {
            "structure": measurements["structure"].to_numpy(),
            "label": measurements["label"].to_numpy(),
            "cut_faces": [f if here else "" for f, here in zip(faces, present)],
            "cranial_vertebra": cranial,
            "caudal_vertebra": caudal,
            "sform_qform_mm": np.nan if sform_qform_mm is None else float(sform_qform_mm),
        }
    )
    geometry = structure_geometry(labels, affine, table["label"].to_numpy(), table["structure"].to_numpy(), present)
    table[GEOMETRY_COLUMNS] = geometry.to_numpy()
    preview = preview_png(hu, labels, affine, settings.preview_width) if settings.preview_width else None
    return ScanQC(table[QC_COLUMNS], preview)


def empty_qc() -> ScanQC:
    import pandas as pd

    return ScanQC(pd.DataFrame(columns=QC_COLUMNS), None)


def write_qc(result: ScanQC, table_path: str | Path, preview_path: str | Path | None) -> None:
    """Write the QC table (TSV) and, where a path is given, the preview (a placeholder pixel if none)."""
    write_tsv(result.table, table_path, missing=BLANK)
    if preview_path:
        Path(preview_path).write_bytes(result.preview if result.preview is not None else placeholder_png())


def read_qc(path: str | Path) -> pd.DataFrame:
    numbers = [*GEOMETRY_COLUMNS, "sform_qform_mm"]
    table = read_tsv(
        path,
        {c: [MISSING, BLANK] for c in numbers},
        dtype={"cut_faces": str, "cranial_vertebra": str, "caudal_vertebra": str},
    )
    # a table written before a column existed (an older results folder) reads with it empty
    for column in numbers:
        if column not in table:
            table[column] = np.nan
    return table[QC_COLUMNS]


# --- plausibility, cohort-wide ----------------------------------------------------------------------------


def plausible_volumes_path(spec: str | Path | None) -> Path | None:
    """The table a config value names: a built-in name (BUILTIN_PLAUSIBLE_VOLUMES), a path, or None."""
    if spec is None or str(spec) == "":
        return None
    spec = str(spec)
    if spec in BUILTIN_PLAUSIBLE_VOLUMES:
        return resources_dir() / "qc" / BUILTIN_PLAUSIBLE_VOLUMES[spec]
    return Path(spec)


def load_plausible_volumes(spec: str | Path | None) -> pd.DataFrame | None:
    """The plausible-volume table (PLAUSIBLE_COLUMNS; min_ml < max_ml, unique structures), or None."""
    import pandas as pd

    path = plausible_volumes_path(spec)
    if path is None:
        return None
    if not path.is_file():
        raise FileNotFoundError(
            f"plausible volume table {spec!r}: not a built-in table "
            f"({', '.join(BUILTIN_PLAUSIBLE_VOLUMES)}) and no such file {path}"
        )
    table = pd.read_csv(path, dtype={"structure": str, "source": str}, keep_default_na=False)
    missing = set(PLAUSIBLE_COLUMNS[:3]) - set(table.columns)
    if missing:
        raise ValueError(f"plausible volume table {path}: missing column(s) {sorted(missing)}")
    for column in ("min_ml", "max_ml"):
        table[column] = pd.to_numeric(table[column], errors="raise").astype(float)
    bad = table.loc[~(table["min_ml"] < table["max_ml"]) | (table["min_ml"] < 0), "structure"].tolist()
    if bad:
        raise ValueError(f"plausible volume table {path}: need 0 <= min_ml < max_ml, not for {bad}")
    dupes = table.loc[table["structure"].duplicated(), "structure"].tolist()
    if dupes:
        raise ValueError(f"plausible volume table {path}: duplicate structure(s) {dupes}")
    if "source" not in table.columns:
        table["source"] = ""
    return table[PLAUSIBLE_COLUMNS]


def apply_plausibility(
    measurements: pd.DataFrame, volumes: pd.DataFrame | None, hu_window: Sequence[float] | None
) -> pd.DataFrame:
    """A copy of ``measurements`` with implausible values excluded and two flag columns.

    ``volume_implausible``: a finite volume outside [min_ml, max_ml] of the structure's row in ``volumes``
    (structures it does not list are not checked): volume NaN. ``hu_implausible``: a finite hu_median outside
    ``hu_window`` ([low, high] HU): every HU measure NaN. The median, not the mean: it says what most of the
    structure's voxels are, so a structure whose typical voxel is no tissue in HU (values stored in another
    scale, a label on the wrong image) is caught, and one holding some metal (an implant, on an
    extended-range scanner: 30,000 HU) is not excluded for it. The exclusion_reason becomes ``implausible_hu``
    where it was empty or ``cut_off`` (which would claim the HU usable), and ``implausible_volume`` where
    it was empty; both excluded values are NaN whatever the reason says, and the flags say each.
    """
    from ctcohort.structures import own_names

    out = measurements.copy()
    volume = out["volume_ml"].to_numpy(dtype=float)
    flag = np.zeros(len(out), dtype=bool)
    if volumes is not None and len(out):
        bounds = volumes.set_index("structure")
        names = own_names(out["structure"])  # a later model's body:liver has liver's bounds
        low = names.map(bounds["min_ml"]).to_numpy(dtype=float)
        high = names.map(bounds["max_ml"]).to_numpy(dtype=float)
        with np.errstate(invalid="ignore"):
            flag = np.isfinite(volume) & np.isfinite(low) & ((volume < low) | (volume > high))
    out["volume_implausible"] = flag
    hu_flag = np.zeros(len(out), dtype=bool)
    if hu_window is not None and len(out):
        hu = out["hu_median"].to_numpy(dtype=float)
        with np.errstate(invalid="ignore"):
            hu_flag = np.isfinite(hu) & ((hu < hu_window[0]) | (hu > hu_window[1]))
    out["hu_implausible"] = hu_flag
    reason = out["exclusion_reason"].fillna("")
    out.loc[hu_flag & reason.isin(["", "cut_off"]).to_numpy(), "exclusion_reason"] = "implausible_hu"
    out.loc[flag & (reason == "").to_numpy() & ~hu_flag, "exclusion_reason"] = "implausible_volume"
    out.loc[flag, "volume_ml"] = np.nan
    out.loc[hu_flag, HU_COLUMNS] = np.nan
    return out
