"""Per-structure volume and attenuation from one CT and its label map.

Everything is computed for all labels at once: a handful of bincounts over the
foreground voxels, a joint label x HU histogram for exact medians, and one
interior mask (6-neighbourhood) for the eroded means. No boolean mask per
structure: at 104 structures that is 104 passes over a 512x512x300 volume.

A value that cannot be trusted never enters the table as a number: a scan
whose CT is not plausibly in HU (``imaging.check_ct``), whose label map holds
ids the structure table does not know, or no labelled voxel at all, fails with
a one-line error naming the file; a structure that cannot be measured gets NaN
and one of EXCLUSION_REASONS (see ``measure_structures``).
"""

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from ctcohort.imaging import (
    ScanChecks,
    check_ct,
    ct_hounsfield,
    load_image,
    seg_on_ct_grid,
    voxel_volume_ml,
)

log = logging.getLogger(__name__)

MEASURE_COLUMNS = [
    "structure", "label", "group", "n_voxels", "volume_ml", "hu_mean", "hu_median", "hu_std",
    "hu_mean_eroded", "complete", "exclusion_reason",
]
HU_COLUMNS = ["hu_mean", "hu_median", "hu_std", "hu_mean_eroded"]
# Every exclusion_reason, in order of precedence: a structure gets the first that applies.
EXCLUSION_REASONS = ("absent", "too_small", "hu_nonfinite", "cut_off")
# Above this many label x HU bins the exact median falls back to sorting.
MAX_HISTOGRAM_BINS = 50_000_000
# Unknown label ids listed in an error message; the rest are counted.
MAX_LISTED_LABELS = 5


class LabelMapError(ValueError):
    """The label map cannot be measured with the structure table: unknown label ids, or no labelled voxel."""


def interior_mask(labels: np.ndarray) -> np.ndarray:
    """Voxels whose six face neighbours all carry the same label (one-voxel erosion of every label)."""
    interior = labels != 0
    for axis in range(labels.ndim):
        lead = [slice(None)] * labels.ndim
        lag = [slice(None)] * labels.ndim
        lead[axis], lag[axis] = slice(1, None), slice(None, -1)
        same = labels[tuple(lead)] == labels[tuple(lag)]
        interior[tuple(lead)] &= same
        interior[tuple(lag)] &= same
        # outside the image counts as another label
        edge = [slice(None)] * labels.ndim
        for index in (0, -1):
            edge[axis] = index
            interior[tuple(edge)] = False
    return interior


def _labels_near_border(labels: np.ndarray, margin: int, size: int) -> np.ndarray:
    """Boolean per label id: has a voxel within ``margin`` voxels of any image face."""
    touching = np.zeros(size, dtype=bool)
    if margin <= 0:
        return touching
    for axis in range(labels.ndim):
        for part in (slice(None, margin), slice(-margin, None)):
            index = [slice(None)] * labels.ndim
            index[axis] = part
            touching[np.unique(labels[tuple(index)])] = True
    return touching


def _medians(labels: np.ndarray, hu: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Median HU per label (numpy's definition: mean of the two middle values for even counts)."""
    size = len(counts)
    medians = np.full(size, np.nan)
    if labels.size == 0:
        return medians
    low_rank, high_rank = (counts - 1) // 2, counts // 2
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    integral = np.issubdtype(hu.dtype, np.integer)
    lowest, highest = (int(hu.min()), int(hu.max())) if integral else (0, 0)
    width = highest - lowest + 1
    if integral and width * size <= MAX_HISTOGRAM_BINS:
        # bin index in int64: ``hu - lowest`` in the CT's own type wraps when the values span
        # more than the type holds (int16 from -3000 to +31000: metal, extended-range scanners)
        index = np.multiply(labels, width, dtype=np.int64)
        np.add(index, hu, out=index, casting="unsafe")
        index -= lowest
        histogram = np.bincount(index, minlength=size * width)
        del index
        cumulative = np.cumsum(histogram)  # global ranks: label blocks follow each other
        present = np.flatnonzero(counts)
        low = np.searchsorted(cumulative, starts[present] + low_rank[present], side="right") % width
        high = np.searchsorted(cumulative, starts[present] + high_rank[present], side="right") % width
        medians[present] = (low + high) / 2.0 + lowest
        return medians
    ordered = hu[np.lexsort((hu, labels))]
    present = np.flatnonzero(counts)
    medians[present] = (
        ordered[starts[present] + low_rank[present]].astype(np.float64)
        + ordered[starts[present] + high_rank[present]]
    ) / 2.0
    return medians


def _check_labels(counts: np.ndarray, table: pd.DataFrame, source: str | Path) -> None:
    """LabelMapError if the label map holds no labelled voxel, or ids that ``table`` does not know."""
    labelled = np.flatnonzero(counts[1:]) + 1
    if labelled.size == 0:
        raise LabelMapError(
            f"{source}: the segmentation holds no labelled voxel (every voxel is 0): nothing to measure; "
            "did the segmentation fail, or was it run on another scan?"
        )
    known = table["label"].to_numpy()
    unknown = np.setdiff1d(labelled, known)
    if unknown.size:
        listed = ", ".join(f"{i} ({counts[i]} voxels)" for i in unknown[:MAX_LISTED_LABELS])
        more = f" and {unknown.size - MAX_LISTED_LABELS} more" if unknown.size > MAX_LISTED_LABELS else ""
        raise LabelMapError(
            f"{source}: {unknown.size} label id(s) not in the structure table ({len(known)} structures, "
            f"ids {known.min()}-{known.max()}): {listed}{more}; the structure table probably does not match "
            "the segmentation model (e.g. a TotalSegmentator v2 segmentation measured with the v1 table): "
            "set the config key structures to the model's table"
        )


def _nonfinite_labels(
    flat_hu: np.ndarray, fg_labels: np.ndarray, fg_hu: np.ndarray, size: int, table: pd.DataFrame,
    source: str | Path,
) -> np.ndarray:
    """Boolean per label id: the structure holds a NaN or infinite voxel.

    Those voxels of ``fg_hu`` (the foreground copy) are set to 0 so that the other
    structures' statistics are computed as usual; the flagged structures' HU is
    discarded by the caller. Non-finite voxels outside every structure are only logged.
    Integer CTs cannot hold NaN: no pass. Float CTs: one summing pass (no copy); the
    masks below only when that sum is not finite.
    """
    flagged = np.zeros(size, dtype=bool)
    if not np.issubdtype(flat_hu.dtype, np.floating):
        return flagged
    # A NaN or inf voxel makes the sum NaN or inf; a finite sum means every voxel is finite.
    # (An overflowing sum of huge finite values only sends us down the exact path below.)
    with np.errstate(over="ignore", invalid="ignore"):
        if np.isfinite(flat_hu.sum()):
            return flagged
    bad = ~np.isfinite(fg_hu)
    inside = int(np.count_nonzero(bad))
    outside = flat_hu.size - int(np.count_nonzero(np.isfinite(flat_hu))) - inside
    if inside:
        flagged[np.unique(fg_labels[bad])] = True
        fg_hu[bad] = 0
        names = dict(zip(table["label"], table["name"]))
        ids = np.flatnonzero(flagged)
        log.warning(
            "%s: %d non-finite (NaN/inf) voxels inside %d structure(s) (%s): their HU is excluded (hu_nonfinite)",
            source, inside, ids.size, ", ".join(str(names.get(i, i)) for i in ids),
        )
    if outside:
        log.warning("%s: %d non-finite (NaN/inf) voxels outside every structure are ignored", source, outside)
    return flagged


def measure_structures(
    hu: np.ndarray,
    labels: np.ndarray,
    voxel_ml: float,
    table: pd.DataFrame,
    *,
    border_margin: int = 3,
    min_voxels: int = 10,
    source: str | Path = "segmentation",
    ct_source: str | Path = "CT",
) -> pd.DataFrame:
    """One row per structure of ``table`` (columns MEASURE_COLUMNS).

    A structure that cannot be measured gets NaN, never 0, and the first of
    EXCLUSION_REASONS that applies:

    - ``absent``: no voxel. Volume and HU NaN, ``complete`` NA.
    - ``too_small``: fewer than ``min_voxels`` voxels. Volume and HU NaN.
    - ``hu_nonfinite``: a NaN or infinite CT voxel inside the structure (float CTs).
      All HU columns NaN; the volume, which depends on the labels only, is kept.
    - ``cut_off``: a voxel within ``border_margin`` voxels of the image border (cut by
      the field of view). Volume NaN; HU kept: the visible part is real tissue.

    ``complete`` (False: touches the border) is reported for every present structure
    whatever its reason, and an incomplete structure never has a volume. So a
    structure both cut off and holding non-finite voxels reads ``hu_nonfinite`` with
    ``complete`` False: volume NaN (cut off) and HU NaN (non-finite), both said;
    ``cut_off`` would claim its HU is usable.
    Non-finite voxels outside every structure (e.g. NaN padding outside the field
    of view) change no number; they are logged as a warning with their count.

    Raises LabelMapError (naming ``source``, the segmentation) if the label map
    holds no labelled voxel, or label ids that ``table`` does not list.
    """
    if hu.shape != labels.shape:
        raise ValueError(f"{source}: CT shape {hu.shape} and label map shape {labels.shape} differ")
    size = int(max(table["label"].max(), labels.max())) + 1
    # Work on flat views in the arrays' own memory order: boolean selection on a 3-D
    # Fortran-ordered array (what nibabel returns) is ~50x slower than on its flat view.
    order = "F" if labels.flags.f_contiguous and hu.flags.f_contiguous else "C"
    flat_labels, flat_hu = labels.ravel(order=order), hu.ravel(order=order)
    foreground = flat_labels != 0
    # bincount casts small integer types to intp on every call; cast once
    fg_labels = flat_labels[foreground].astype(np.intp)
    counts = np.bincount(fg_labels, minlength=size)
    _check_labels(counts, table, source)
    fg_hu = flat_hu[foreground]  # a copy: _nonfinite_labels may zero its NaN voxels
    nonfinite = _nonfinite_labels(flat_hu, fg_labels, fg_hu, size, table, ct_source)
    weights = fg_hu.astype(np.float64)
    sums = np.bincount(fg_labels, weights=weights, minlength=size)
    with np.errstate(invalid="ignore", divide="ignore"):
        means = sums / counts
        deviations = weights - means[fg_labels]
        del weights
        variances = np.bincount(fg_labels, weights=deviations * deviations, minlength=size) / counts
    del deviations
    medians = _medians(fg_labels, fg_hu, counts)
    del fg_labels, fg_hu

    interior = interior_mask(labels).ravel(order=order)
    inner_labels = flat_labels[interior].astype(np.intp)
    inner_values = flat_hu[interior].astype(np.float64)
    del interior
    if nonfinite.any():
        inner_values[~np.isfinite(inner_values)] = 0  # only in flagged structures, whose HU is dropped
    inner_counts = np.bincount(inner_labels, minlength=size)
    inner_sums = np.bincount(inner_labels, weights=inner_values, minlength=size)
    del inner_labels, inner_values
    with np.errstate(invalid="ignore", divide="ignore"):
        eroded_means = inner_sums / inner_counts
    touching = _labels_near_border(labels, border_margin, size)

    ids = table["label"].to_numpy()
    n = counts[ids]
    out = pd.DataFrame({
        "structure": table["name"].to_numpy(),
        "label": ids,
        "group": table["group"].to_numpy(),
        "n_voxels": n,
        "volume_ml": n * voxel_ml,
        "hu_mean": means[ids],
        "hu_median": medians[ids],
        "hu_std": np.sqrt(variances[ids]),
        "hu_mean_eroded": eroded_means[ids],
        "complete": pd.array(~touching[ids], dtype="boolean"),
        "exclusion_reason": "",
    })
    absent = n == 0
    too_small = ~absent & (n < min_voxels)
    hu_nonfinite = ~absent & ~too_small & nonfinite[ids]
    cut_off = ~absent & ~too_small & ~hu_nonfinite & touching[ids]
    rows = {"absent": absent, "too_small": too_small, "hu_nonfinite": hu_nonfinite, "cut_off": cut_off}
    for reason in EXCLUSION_REASONS:
        out.loc[rows[reason], "exclusion_reason"] = reason
    out.loc[absent, "complete"] = pd.NA
    out.loc[absent | too_small | touching[ids], "volume_ml"] = np.nan
    out.loc[absent | too_small | hu_nonfinite, HU_COLUMNS] = np.nan
    return out[MEASURE_COLUMNS]


def measure_scan(
    ct_path: str | Path,
    seg_path: str | Path,
    table: pd.DataFrame,
    *,
    border_margin: int = 3,
    min_voxels: int = 10,
    checks: ScanChecks = ScanChecks(),
) -> pd.DataFrame:
    """Read a CT and its segmentation (any dtype, any orientation of the same grid) and measure.

    The CT must pass ``imaging.check_ct`` with ``checks`` (ImplausibleScanError otherwise);
    see ``measure_structures`` for the rest. Every error names the file at fault.
    """
    ct = load_image(ct_path)
    seg = load_image(seg_path)
    hu = ct_hounsfield(ct)
    check_ct(hu, ct.affine, ct_path, checks)
    labels = seg_on_ct_grid(seg, ct, seg_path)
    return measure_structures(
        hu, labels, voxel_volume_ml(ct.affine), table,
        border_margin=border_margin, min_voxels=min_voxels, source=seg_path, ct_source=ct_path,
    )


def empty_measurements() -> pd.DataFrame:
    """The table of a scan that could not be measured: the columns, no rows."""
    return pd.DataFrame(columns=MEASURE_COLUMNS)


def write_measurements(frame: pd.DataFrame, path: str | Path) -> None:
    """Write a measurement table as TSV (NaN as "NaN"); an infinite value is an error, never written."""
    numbers = frame.select_dtypes("number")
    if np.isinf(numbers.to_numpy(dtype=np.float64)).any():
        columns = [c for c in numbers.columns if np.isinf(numbers[c].to_numpy(dtype=np.float64)).any()]
        raise ValueError(f"{path}: refusing to write infinite values (columns {', '.join(columns)})")
    frame.to_csv(path, sep="\t", index=False, na_rep="NaN", float_format="%.10g")


def read_measurements(path: str | Path) -> pd.DataFrame:
    frame = pd.read_csv(path, sep="\t", keep_default_na=False, na_values=["NaN"])
    frame["complete"] = frame["complete"].map({"True": True, "False": False, True: True, False: False}).astype("boolean")
    return frame
