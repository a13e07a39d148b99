"""Per-structure volume and attenuation from one CT and its label map.

Everything is computed for all labels at once, in one pass over the volume in
slabs of rows (a few million voxels: the slab's temporaries stay small and are
reused, instead of full-volume copies). Per slab: the foreground voxels, a
joint label x HU histogram (integer CTs) and the interior voxels (6-neighbourhood)
for the eroded means. From the histogram come each structure's voxel count,
mean, standard deviation and exact median. No boolean mask per structure: at
104 structures that is 104 passes over a 512x512x300 volume.

``measure_structures`` measures arrays already in memory; ``measure_files`` reads
the two files and measures them. ``measure_and_qc`` (arrays) and ``measure_and_qc_files``
(files) measure and run the quality control (``qc.scan_qc``) on the same arrays.

A value that cannot be trusted never enters the table as a number: a scan
whose CT is not plausibly in HU (``imaging.check_ct``), whose label map holds
ids the structure table does not know, or no labelled voxel at all, fails with
a one-line error naming the file; a structure that cannot be measured gets NaN
and one of columns.EXCLUSION_REASONS (see ``measure_structures``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from ctcohort.columns import HU_COLUMNS, MEASURE_COLUMNS, SCAN_EXCLUSION_REASONS
from ctcohort.imaging import (
    ScanChecks,
    check_ct,
    check_orientation,
    ct_hounsfield,
    load_image,
    seg_on_ct_grid,
    voxel_volume_ml,
)
from ctcohort.qc import QCSettings, ScanQC, empty_qc, labels_touching_faces, scan_qc, write_qc
from ctcohort.tables import MEASUREMENT_DIGITS, read_tsv, write_tsv

if TYPE_CHECKING:  # pandas is imported where a table is built: `ctcohort measure` starts without it
    import pandas as pd

log = logging.getLogger(__name__)

# Above this many label x HU bins (integer CTs) medians, means and SDs come from sorting the foreground.
MAX_HISTOGRAM_BINS = 1 << 23
# Voxels per slab of the pass over the volume (at least the histogram's bins, whose per-slab cost
# is then no more than the voxels').
SLAB_VOXELS = 1 << 22
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
    return labels_touching_faces(labels, margin, size).any(axis=(0, 1))


def _same_memory_order(hu: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both arrays C-contiguous, as views where they can be: Fortran-ordered arrays (what nibabel returns)
    are transposed, which changes no measure (all are symmetric in the axes); a label map in the other
    order than the CT is copied into the CT's."""
    if hu.flags.f_contiguous and not hu.flags.c_contiguous:
        return _same_memory_order(hu.T, labels.T)
    return np.ascontiguousarray(hu), np.ascontiguousarray(labels)


def _slabs(hu: np.ndarray, labels: np.ndarray, at_least: int = 0):
    """Per slab of rows along the first axis: the labels (intp, which np.bincount takes without a copy)
    and HU of its foreground voxels, and which of them are interior (``interior_mask``)."""
    rows = max(1, max(SLAB_VOXELS, at_least) // max(1, labels[0].size))
    for start in range(0, labels.shape[0], rows):
        stop = min(start + rows, labels.shape[0])
        # one row beyond each side of the slab decides its first and last rows' interior
        low, high = max(start - 1, 0), min(stop + 1, labels.shape[0])
        interior = interior_mask(labels[low:high])[start - low : stop - low]
        block = labels[start:stop]
        foreground = block != 0
        yield block[foreground].astype(np.intp), hu[start:stop][foreground], interior[foreground]


def _medians_from_histogram(histogram: np.ndarray, counts: np.ndarray, lowest: int) -> np.ndarray:
    """Median per label from the joint label x value histogram (numpy's definition: mean of the two
    middle values for even counts)."""
    medians = np.full(len(counts), np.nan)
    width = histogram.shape[1]
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    cumulative = np.cumsum(histogram, axis=None)  # global ranks: label blocks follow each other
    present = np.flatnonzero(counts)
    low_rank, high_rank = (counts[present] - 1) // 2, counts[present] // 2
    low = np.searchsorted(cumulative, starts[present] + low_rank, side="right") % width
    high = np.searchsorted(cumulative, starts[present] + high_rank, side="right") % width
    medians[present] = (low + high) / 2.0 + lowest
    return medians


def _medians_by_sorting(labels: np.ndarray, hu: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Median per label of the foreground voxels ``labels``, ``hu`` (any dtype, any span)."""
    medians = np.full(len(counts), np.nan)
    if labels.size == 0:
        return medians
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    ordered = hu[np.lexsort((hu, labels))]
    present = np.flatnonzero(counts)
    low_rank, high_rank = (counts[present] - 1) // 2, counts[present] // 2
    medians[present] = (
        ordered[starts[present] + low_rank].astype(np.float64) + ordered[starts[present] + high_rank]
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
    hu: np.ndarray,
    fg_labels: np.ndarray,
    fg_hu: np.ndarray,
    size: int,
    table: pd.DataFrame,
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
    if not np.issubdtype(hu.dtype, np.floating):
        return flagged
    # A NaN or inf voxel makes the sum NaN or inf; a finite sum means every voxel is finite.
    # (An overflowing sum of huge finite values only sends us down the exact path below.)
    with np.errstate(over="ignore", invalid="ignore"):
        if np.isfinite(hu.sum()):
            return flagged
    bad = ~np.isfinite(fg_hu)
    inside = int(np.count_nonzero(bad))
    outside = hu.size - int(np.count_nonzero(np.isfinite(hu))) - inside
    if inside:
        flagged[np.unique(fg_labels[bad])] = True
        fg_hu[bad] = 0
        names = dict(zip(table["label"], table["name"]))
        ids = np.flatnonzero(flagged)
        log.warning(
            "%s: %d non-finite (NaN/inf) voxels inside %d structure(s) (%s): their HU is excluded (hu_nonfinite)",
            source,
            inside,
            ids.size,
            ", ".join(str(names.get(i, i)) for i in ids),
        )
    if outside:
        log.warning("%s: %d non-finite (NaN/inf) voxels outside every structure are ignored", source, outside)
    return flagged


def _histogram_statistics(
    hu: np.ndarray,
    labels: np.ndarray,
    size: int,
    table: pd.DataFrame,
    source: str | Path,
) -> tuple[np.ndarray, ...] | None:
    """Per label id: counts, means, variances, medians, eroded means, non-finite flags (none) of an
    integer CT, from one joint histogram of (label, interior or not, HU) over the foreground: exact
    sums and medians. None where the CT is not integer or its values span more than
    MAX_HISTOGRAM_BINS / (2 ``size``) bins."""
    if hu.size == 0 or not np.can_cast(hu.dtype, np.intp):
        return None
    lowest, highest = int(hu.min()), int(hu.max())
    width = highest - lowest + 1
    if 2 * size * width > MAX_HISTOGRAM_BINS:
        return None
    histogram = np.zeros(2 * size * width, dtype=np.intp)
    for index, fg_hu, fg_interior in _slabs(hu, labels, at_least=histogram.size):
        # bin of ((interior, label), HU), computed in intp: the CT's own type wraps when its values
        # span more than it holds (int16 from -3000 to +31000: metal, extended-range scanners)
        index += fg_interior * size
        index *= width
        index += fg_hu
        index -= lowest
        histogram += np.bincount(index, minlength=histogram.size)
    edge, interior = histogram.reshape(2, size, width)
    histogram = edge + interior
    counts = histogram.sum(axis=1)
    _check_labels(counts, table, source)
    values = np.arange(lowest, highest + 1, dtype=np.int64)
    with np.errstate(invalid="ignore", divide="ignore"):
        means = (histogram @ values) / counts
        deviations = values - means[:, None]
        variances = (histogram * deviations * deviations).sum(axis=1) / counts
        eroded_means = (interior @ values) / interior.sum(axis=1)
    medians = _medians_from_histogram(histogram, counts, lowest)
    return counts, means, variances, medians, eroded_means, np.zeros(size, dtype=bool)


def _statistics_by_sorting(
    hu: np.ndarray,
    labels: np.ndarray,
    size: int,
    table: pd.DataFrame,
    source: str | Path,
    ct_source: str | Path,
) -> tuple[np.ndarray, ...]:
    """What ``_histogram_statistics`` gives, for any CT: from the foreground voxels gathered from every
    slab, medians by sorting; float CTs may hold non-finite voxels (``_nonfinite_labels``)."""
    fg_labels, fg_hu, fg_interior = (np.concatenate(part) for part in zip(*_slabs(hu, labels)))
    counts = np.bincount(fg_labels, minlength=size)
    _check_labels(counts, table, source)
    nonfinite = _nonfinite_labels(hu, fg_labels, fg_hu, size, table, ct_source)  # zeroes them in fg_hu
    weights = fg_hu.astype(np.float64)
    sums = np.bincount(fg_labels, weights=weights, minlength=size)
    inner_labels = fg_labels[fg_interior]
    inner_sums = np.bincount(inner_labels, weights=weights[fg_interior], minlength=size)
    with np.errstate(invalid="ignore", divide="ignore"):
        means = sums / counts
        deviations = weights - means[fg_labels]
        del weights
        variances = np.bincount(fg_labels, weights=deviations * deviations, minlength=size) / counts
        eroded_means = inner_sums / np.bincount(inner_labels, minlength=size)
    del deviations
    medians = _medians_by_sorting(fg_labels, fg_hu, counts)
    return counts, means, variances, medians, eroded_means, nonfinite


def measure_structures(
    hu: np.ndarray,
    labels: np.ndarray,
    voxel_ml: float,
    table: pd.DataFrame,
    *,
    border_margin: int = QCSettings.border_margin,
    min_voxels: int = QCSettings.min_voxels,
    source: str | Path = "segmentation",
    ct_source: str | Path = "CT",
) -> pd.DataFrame:
    """One row per structure of ``table`` (columns MEASURE_COLUMNS).

    A structure that cannot be measured gets NaN, never 0, and the first of
    SCAN_EXCLUSION_REASONS that applies:

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
    import pandas as pd

    if hu.shape != labels.shape:
        raise ValueError(f"{source}: CT shape {hu.shape} and label map shape {labels.shape} differ")
    size = int(max(table["label"].max(), labels.max())) + 1
    hu, labels = _same_memory_order(hu, labels)
    stats = _histogram_statistics(hu, labels, size, table, source)
    if stats is None:  # a float CT, or an integer one whose values span too many histogram bins
        stats = _statistics_by_sorting(hu, labels, size, table, source, ct_source)
    counts, means, variances, medians, eroded_means, nonfinite = stats
    touching = _labels_near_border(labels, border_margin, size)

    ids = table["label"].to_numpy()
    n = counts[ids]
    out = pd.DataFrame(
        {
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
        }
    )
    absent = n == 0
    too_small = ~absent & (n < min_voxels)
    hu_nonfinite = ~absent & ~too_small & nonfinite[ids]
    cut_off = ~absent & ~too_small & ~hu_nonfinite & touching[ids]
    rows = {"absent": absent, "too_small": too_small, "hu_nonfinite": hu_nonfinite, "cut_off": cut_off}
    for reason in SCAN_EXCLUSION_REASONS:
        out.loc[rows[reason], "exclusion_reason"] = reason
    out.loc[absent, "complete"] = pd.NA
    out.loc[absent | too_small | touching[ids], "volume_ml"] = np.nan
    out.loc[absent | too_small | hu_nonfinite, HU_COLUMNS] = np.nan
    return out[MEASURE_COLUMNS]


class Scan(NamedTuple):
    """A CT in HU and its label map on the CT's grid, in memory (``read_scan``)."""

    hu: np.ndarray
    labels: np.ndarray
    affine: np.ndarray  # the CT's voxel-to-world matrix (mm)
    ct_path: str | Path
    seg_path: str | Path
    sform_qform_mm: float | None = None  # imaging.check_orientation: how far the CT's sform and qform disagree


def read_scan(ct_path: str | Path, seg_path: str | Path, checks: ScanChecks = ScanChecks()) -> Scan:
    """Read a CT and its segmentation (any dtype, any orientation of the same grid); the CT must pass
    ``imaging.check_ct`` with ``checks`` (ImplausibleScanError otherwise).

    The two files inflate in two threads (the decompressor releases the GIL); errors come in the order of
    a sequential read: the CT's header, the label map's header, the CT's data and checks, the label map's
    data and grid. Every error names the file at fault.
    """
    ct = load_image(ct_path, in_memory=True)
    sform_qform_mm = check_orientation(ct, ct_path)
    seg = load_image(seg_path, in_memory=True)
    with ThreadPoolExecutor(2) as pool:
        hu = pool.submit(ct_hounsfield, ct)
        labels = pool.submit(seg_on_ct_grid, seg, ct, seg_path)
        hu = hu.result()
        check_ct(hu, ct.affine, ct_path, checks)
        return Scan(hu, labels.result(), ct.affine, ct_path, seg_path, sform_qform_mm)


def _read_with_table(ct_path, seg_path, table, checks: ScanChecks) -> tuple[Scan, pd.DataFrame]:
    """``read_scan``, and the structure table (calling ``table`` while the scan is read, if a function)."""
    with ThreadPoolExecutor(1) as pool:
        reading = pool.submit(read_scan, ct_path, seg_path, checks)
        if callable(table):
            table = table()
        return reading.result(), table


def measure_files(
    ct_path: str | Path,
    seg_path: str | Path,
    table: pd.DataFrame | Callable[[], pd.DataFrame],
    *,
    border_margin: int = QCSettings.border_margin,
    min_voxels: int = QCSettings.min_voxels,
    checks: ScanChecks = ScanChecks(),
) -> pd.DataFrame:
    """Read a CT and its segmentation (``read_scan``) and measure them (``measure_structures``).

    ``table``: the structure table, or a function that returns it, called while the scan is read (so
    ``ctcohort measure`` imports pandas while the CT inflates); its errors come first.
    """
    scan, table = _read_with_table(ct_path, seg_path, table, checks)
    return measure_structures(
        scan.hu,
        scan.labels,
        voxel_volume_ml(scan.affine),
        table,
        border_margin=border_margin,
        min_voxels=min_voxels,
        source=seg_path,
        ct_source=ct_path,
    )


class MeasurementsAndQC(NamedTuple):
    """A scan's measurements and its quality control (``measure_and_qc``, ``measure_and_qc_files``)."""

    measurements: pd.DataFrame
    qc: ScanQC


def measure_and_qc_files(
    ct_path: str | Path,
    seg_path: str | Path,
    table: pd.DataFrame | Callable[[], pd.DataFrame],
    *,
    checks: ScanChecks = ScanChecks(),
    qc: QCSettings = QCSettings(),
) -> MeasurementsAndQC:
    """Read a CT and its segmentation (``read_scan``), measure them and check them (``measure_and_qc``; ``qc``
    carries the border margin and the minimum voxel count the measurement uses)."""
    scan, table = _read_with_table(ct_path, seg_path, table, checks)
    return measure_and_qc(
        scan.hu,
        scan.labels,
        scan.affine,
        table,
        qc,
        source=seg_path,
        ct_source=ct_path,
        sform_qform_mm=scan.sform_qform_mm,
    )


def measure_and_qc(
    hu: np.ndarray,
    labels: np.ndarray,
    affine: np.ndarray,
    table: pd.DataFrame,
    qc: QCSettings,
    source: str | Path = "segmentation",
    ct_source: str | Path = "CT",
    sform_qform_mm: float | None = None,
) -> MeasurementsAndQC:
    """Measure arrays in memory (``measure_structures``) and check them (``qc.scan_qc``)."""
    measured = measure_structures(
        hu,
        labels,
        voxel_volume_ml(affine),
        table,
        border_margin=qc.border_margin,
        min_voxels=qc.min_voxels,
        source=source,
        ct_source=ct_source,
    )
    return MeasurementsAndQC(measured, scan_qc(hu, labels, affine, measured, qc, sform_qform_mm))


def empty_measurements_and_qc() -> MeasurementsAndQC:
    """What a scan that could not be measured leaves: no rows, no preview (a placeholder is written)."""
    return MeasurementsAndQC(empty_measurements(), empty_qc())


def write_measurements_and_qc(
    result: MeasurementsAndQC, table_path: str | Path, qc_path: str | Path | None, preview_path: str | Path | None
) -> None:
    """The measurement table, and the QC table and preview where their paths are given."""
    write_measurements(result.measurements, table_path)
    if qc_path:
        write_qc(result.qc, qc_path, preview_path)


def empty_measurements() -> pd.DataFrame:
    """The table of a scan that could not be measured: the columns, no rows."""
    import pandas as pd

    return pd.DataFrame(columns=MEASURE_COLUMNS)


def write_measurements(frame: pd.DataFrame, path: str | Path) -> None:
    """Write a measurement table as TSV (NaN as "NaN"); an infinite value is an error, never written."""
    numbers = frame.select_dtypes("number")
    if np.isinf(numbers.to_numpy(dtype=np.float64)).any():
        columns = [c for c in numbers.columns if np.isinf(numbers[c].to_numpy(dtype=np.float64)).any()]
        raise ValueError(f"{path}: refusing to write infinite values (columns {', '.join(columns)})")
    write_tsv(frame, path, MEASUREMENT_DIGITS)


def read_measurements(path: str | Path) -> pd.DataFrame:
    frame = read_tsv(path)
    frame["complete"] = (
        frame["complete"].map({"True": True, "False": False, True: True, False: False}).astype("boolean")
    )
    return frame
