"""Predicted segmentations against reference segmentations, as in the TotalSegmentator paper.

Per scan and structure: Dice and the normalized surface distance (NSD, the
surface Dice at a tolerance of Nikolov et al. 2021, computed as their reference
code does; see surface_metrics) at a 3 mm tolerance. Over scans: the mean per
structure with a bootstrap percentile confidence interval (10,000 resamples of
the scans).

Dice comes from one bincount of the joint (prediction, reference) label pairs
over the foreground, for all labels at once. NSD needs distance transforms; each
structure's is computed only on the voxel-corner grid of the bounding box of
prediction and reference, so the per-structure loop never touches the full
volume. The distance transforms are the cost: ~100 ns per box voxel, twice per
structure.
"""

import itertools
import logging
from collections.abc import Collection, Mapping, Sequence
from functools import cache
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from scipy import ndimage

from ctcohort.aggregate import collect_failures
from ctcohort.figures import GROUP_COLOURS, save_figure  # also selects the Agg backend
from ctcohort.imaging import label_array, load_image, seg_on_ct_grid, voxel_spacing_mm
from ctcohort.structures import GROUPS
from ctcohort.tables import ANY_MISSING, BLANK, STATS_DIGITS, read_tsv, write_tsv

log = logging.getLogger(__name__)

METRIC_COLUMNS = ["structure", "label", "group", "dice", "nsd", "n_pred", "n_ref"]
# The cohort's per-scan table (dice.tsv): one row per evaluated scan and structure.
COHORT_METRIC_COLUMNS = ["subject", "structure", "group", "dice", "nsd", "n_pred", "n_ref"]
SUMMARY_COLUMNS = [
    "structure",
    "group",
    "n",
    "dice_mean",
    "dice_ci_low",
    "dice_ci_high",
    "nsd_mean",
    "nsd_ci_low",
    "nsd_ci_high",
]
# Above this many (prediction, reference) label pairs, Dice counts come from three plain bincounts.
MAX_JOINT_BINS = 50_000_000


def _check_label_map(values: np.ndarray, name: str) -> np.ndarray:
    values = np.asarray(values)
    if values.dtype == bool:
        return values.astype(np.uint8)
    if not np.issubdtype(values.dtype, np.integer):
        raise TypeError(f"{name}: expected an integer label map, got dtype {values.dtype} (use label_array)")
    if values.size and values.min() < 0:
        raise ValueError(f"{name}: label map holds negative labels")
    return values


# Surface elements (surfels) as in Nikolov et al.'s reference code (DeepMind's surface-distance package):
# every voxel corner whose 2x2x2 surrounding voxels are neither all inside nor all outside carries the
# marching-cubes triangles of that neighbourhood, weighted by their area in mm^2. The 256 neighbourhoods
# fall into 14 kinds under the cube's 48 symmetries (axis permutations and reflections) and the exchange
# of inside and outside; their table is symmetric under both, so one example of each of the 13 kinds with a
# surface (the 14th: all inside or all outside) gives all 256. Each kind: its inside voxels as offsets "abc"
# (along axes 0, 1, 2) in the 2x2x2 cube, and the area vectors of its triangles, in eighths of a unit voxel
# face, as component magnitudes (the areas need no signs). These are the reference's marching-cubes normals
# (its lookup_tables.py), triangle by triangle; tests/test_evaluate.py compares the areas code by code.
_SURFEL_KINDS = (
    ("111", ((1, 1, 1),)),  # a corner: a triangle cutting it off
    ("110 111", ((2, 2, 0), (2, 2, 0))),  # an edge: a diagonal rectangle
    ("101 110", ((1, 1, 1), (1, 1, 1))),  # two corners diagonal on a face: two corner triangles
    ("101 110 111", ((4, 0, 0), (2, 2, 2), (1, 1, 1))),  # three corners of a face: a pentagon
    ("100 101 110 111", ((4, 0, 0), (4, 0, 0))),  # a face: a square parallel to it
    ("011 101 110", ((1, 1, 1), (1, 1, 1), (1, 1, 1))),  # three corners, pairwise diagonal on faces
    ("011 101 110 111", ((2, 2, 2), (2, 2, 2), (1, 1, 1), (1, 1, 1))),  # a corner and its neighbours: a hexagon
    ("011 100", ((1, 1, 1), (1, 1, 1))),  # two opposite corners
    ("011 100 111", ((1, 1, 1), (0, 2, 2), (0, 2, 2))),  # an edge and a corner apart from it
    ("011 100 110 111", ((3, 3, 3), (2, 0, 2), (1, 1, 1), (0, 2, 2))),  # a path of three edges along all axes
    ("011 100 101 110", ((4, 0, 0), (2, 2, 2), (1, 1, 1), (1, 1, 1))),  # three corners of a face and one apart
    ("010 011 100 101", ((2, 2, 0), (2, 2, 0), (2, 2, 0), (2, 2, 0))),  # two opposite edges: two rectangles
    ("001 010 100 111", ((1, 1, 1), (1, 1, 1), (1, 1, 1), (1, 1, 1))),  # four corners, no two adjacent
)


@cache
def _surfel_area_vectors() -> np.ndarray:
    """Area vectors (magnitudes, eighths of a unit face) of each code's triangles: (256 codes, 4, 3), zero-padded.

    The code of a corner has bit 4a + 2b + c set when the voxel at offset (a, b, c) of its 2x2x2 neighbourhood
    is inside (see _corner_codes). Codes 0 and 255 (no surface) have none.
    """
    vectors = np.zeros((256, 4, 3), np.int64)
    weights = np.array([4, 2, 1])
    for corners, triangles in _SURFEL_KINDS:
        inside = np.array([[int(digit) for digit in corner] for corner in corners.split()])
        triangles = np.array(triangles)
        for axes in itertools.permutations(range(3)):
            for flips in itertools.product((0, 1), repeat=3):
                code = int(np.sum(1 << ((inside[:, axes] ^ flips) @ weights)))
                vectors[[code, 255 - code], : len(triangles)] = triangles[:, axes]
    return vectors


def _surfel_areas(spacing: np.ndarray) -> np.ndarray:
    """Surfel area in mm^2 of each of the 256 neighbourhood codes, for voxel spacing ``spacing`` (mm per axis).

    A triangle's area vector scales with the grid as the cofactors of the spacing do: component i by the
    product of the other two spacings.
    """
    s0, s1, s2 = spacing
    scale = np.array([s1 * s2, s0 * s2, s0 * s1]) / 8
    return np.sqrt(((_surfel_area_vectors() * scale) ** 2).sum(axis=-1)).sum(axis=-1)


def _corner_codes(mask: np.ndarray) -> np.ndarray:
    """Neighbourhood code of every voxel corner of a 3-D boolean mask, outside the mask's array counting as outside.

    Shape: one more than ``mask`` along each axis; corner (i, j, k) is the one shared by voxels (i-1..i, j-1..j,
    k-1..k), and bit 4a + 2b + c of its code is voxel (i-1+a, j-1+b, k-1+c).
    """
    codes = np.pad(mask, 1).view(np.uint8)
    for axis, shift in ((2, 1), (1, 2), (0, 4)):
        lower = [slice(None)] * 3
        upper = [slice(None)] * 3
        lower[axis], upper[axis] = slice(None, -1), slice(1, None)
        codes = codes[tuple(lower)] | (codes[tuple(upper)] << shift)
    return codes


def _surfels(mask: np.ndarray, areas: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The surfel corners of ``mask`` (boolean, corner grid) and their areas (in the order of the True corners)."""
    codes = _corner_codes(mask)
    surface = (codes != 0) & (codes != 255)
    return surface, areas[codes[surface]]


def _box(a: tuple[slice, ...] | None, b: tuple[slice, ...] | None) -> tuple[slice, ...]:
    """Union of two find_objects boxes (at most one of them None)."""
    boxes = [box for box in (a, b) if box is not None]
    return tuple(
        slice(min(box[axis].start for box in boxes), max(box[axis].stop for box in boxes))
        for axis in range(len(boxes[0]))
    )


def surface_metrics(
    pred: np.ndarray,
    ref: np.ndarray,
    spacing_mm: Sequence[float],
    table: pd.DataFrame,
    tolerance_mm: float = 3.0,
) -> pd.DataFrame:
    """Dice and NSD of every structure of ``table`` (columns METRIC_COLUMNS), one row per structure.

    ``pred`` and ``ref`` are integer label maps on the same voxel grid, with
    voxel spacing ``spacing_mm`` (one value per axis).

    Dice = 2|P∩R| / (|P| + |R|) in voxels.

    NSD is the surface Dice at tolerance ``tolerance_mm`` of Nikolov et al. (2021),
    exactly as their reference code (DeepMind's ``surface-distance``, which the
    TotalSegmentator paper's evaluation script calls: compute_surface_distances
    and compute_surface_dice_at_tolerance) defines it:

    NSD = (area of P's surfels within ``tolerance_mm`` of R's surface
    + area of R's surfels within ``tolerance_mm`` of P's surface) / (area of P's surfels + area of R's surfels).

    Surfels sit on the voxel-corner grid: a corner whose eight surrounding voxels
    are neither all inside nor all outside the structure carries the
    marching-cubes triangles of that 2x2x2 neighbourhood, weighted by their area
    in mm^2 with the anisotropic spacing (outside the image counts as outside).
    A surfel's distance is the Euclidean distance in millimetres from its corner
    to the nearest surfel corner of the other structure (``distance <= tolerance``
    counts). Equal to ``surface-distance``'s value to ~1e-15 (tests/test_evaluate.py);
    it is not the voxel-counting NSD of medpy-based implementations, which counts
    boundary voxels instead and reads lower.

    Conventions: structure absent from both maps -> dice and nsd NaN (not
    evaluable, not a perfect score); present in one only -> dice 0 and nsd 0.
    This penalises false positives too: TotalSegmentator's evaluation script
    scores a structure that only the prediction has as NaN (it evaluates only
    structures in the reference), so its means leave such scans out where ours
    count them as 0. Labels that are not in ``table`` are ignored.
    """
    pred, ref, spacing = _checked_inputs(pred, ref, spacing_mm, tolerance_mm)
    ids = table["label"].to_numpy().astype(np.int64)
    size = int(max(ids.max(initial=0), pred.max(initial=0), ref.max(initial=0))) + 1
    n_pred, n_ref, overlap = _voxel_counts(pred, ref, size)

    unknown = sorted(set(np.flatnonzero(n_pred[1:] + n_ref[1:]) + 1) - set(ids.tolist()))
    if unknown:
        log.warning("label ids %s are not in the structure table and are ignored", unknown)

    with np.errstate(invalid="ignore", divide="ignore"):
        dice = 2.0 * overlap[ids] / (n_pred[ids] + n_ref[ids])  # 0/0 -> NaN for absent in both
    nsd = np.where(np.isnan(dice), np.nan, 0.0)
    both = np.flatnonzero((n_pred[ids] > 0) & (n_ref[ids] > 0))
    if len(both):
        nsd[both] = _surface_dice(pred, ref, ids[both], size, spacing, tolerance_mm)

    out = pd.DataFrame(
        {
            "structure": table["name"].to_numpy(),
            "label": ids,
            "group": table["group"].to_numpy() if "group" in table.columns else "",
            "dice": dice,
            "nsd": nsd,
            "n_pred": n_pred[ids],
            "n_ref": n_ref[ids],
        }
    )
    return out[METRIC_COLUMNS]


def _checked_inputs(
    pred, ref, spacing_mm: Sequence[float], tolerance_mm: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The two label maps and the spacing as arrays; a map, spacing or tolerance that cannot be scored fails."""
    pred = _check_label_map(pred, "prediction")
    ref = _check_label_map(ref, "reference")
    if pred.shape != ref.shape:
        raise ValueError(f"prediction shape {pred.shape} and reference shape {ref.shape} differ")
    spacing = np.asarray(spacing_mm, dtype=np.float64).reshape(-1)
    if spacing.shape != (pred.ndim,) or not np.all(np.isfinite(spacing)) or np.any(spacing <= 0):
        raise ValueError(f"spacing {spacing_mm!r}: need {pred.ndim} positive values (mm)")
    if pred.ndim != 3:
        raise ValueError(f"label maps of shape {pred.shape}: need 3-D maps")
    if not tolerance_mm >= 0:
        raise ValueError(f"tolerance {tolerance_mm!r} mm: must be >= 0")
    return pred, ref, spacing


def _voxel_counts(pred: np.ndarray, ref: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per label id below ``size``: its voxels in ``pred``, in ``ref`` and in both."""
    if size * size > MAX_JOINT_BINS:  # label ids too large for a size x size table
        n_pred = np.bincount(pred.ravel(), minlength=size)
        n_ref = np.bincount(ref.ravel(), minlength=size)
        overlap = np.bincount(pred[(pred == ref) & (pred != 0)], minlength=size)
        return n_pred, n_ref, overlap
    foreground = (pred != 0) | (ref != 0)
    pairs = pred[foreground].astype(np.int64) * size + ref[foreground]
    del foreground
    joint = np.bincount(pairs, minlength=size * size).reshape(size, size)
    del pairs
    # every voxel with pred != 0 is in the foreground
    return joint.sum(axis=1), joint.sum(axis=0), np.diagonal(joint)


def _surface_dice(
    pred: np.ndarray, ref: np.ndarray, labels: np.ndarray, size: int, spacing: np.ndarray, tolerance_mm: float
) -> np.ndarray:
    """The NSD of each of ``labels``, every one present in both maps."""
    areas = _surfel_areas(spacing)
    pred_boxes = ndimage.find_objects(pred, max_label=size - 1)
    ref_boxes = ndimage.find_objects(ref, max_label=size - 1)
    nsd = np.empty(len(labels))
    for k, label in enumerate(labels):
        # The corner grid of the box holds every surfel corner of P and R (outside the box is outside both),
        # and the Euclidean distance between two corners does not depend on what lies around them, so the
        # transforms of the cropped grid are exact.
        box = _box(pred_boxes[label - 1], ref_boxes[label - 1])
        p_surface, p_areas = _surfels(pred[box] == label, areas)
        r_surface, r_areas = _surfels(ref[box] == label, areas)
        to_ref = ndimage.distance_transform_edt(~r_surface, sampling=spacing)[p_surface]
        to_pred = ndimage.distance_transform_edt(~p_surface, sampling=spacing)[r_surface]
        near = p_areas[to_ref <= tolerance_mm].sum() + r_areas[to_pred <= tolerance_mm].sum()
        nsd[k] = near / (p_areas.sum() + r_areas.sum())
    return nsd


def evaluate_scan(
    pred_path: str | Path, ref_path: str | Path, table: pd.DataFrame, tolerance_mm: float = 3.0
) -> pd.DataFrame:
    """Read a predicted and a reference label map (any dtype, any orientation of the same grid) and evaluate.

    The prediction's grid is the frame: the reference is reoriented onto it and
    the voxel spacing comes from the prediction's affine.
    """
    pred_img = load_image(pred_path)
    ref_img = load_image(ref_path)
    pred = label_array(pred_img, pred_path)
    ref = seg_on_ct_grid(ref_img, pred_img, ref_path)
    return surface_metrics(pred, ref, voxel_spacing_mm(pred_img.affine), table, tolerance_mm)


def empty_metrics() -> pd.DataFrame:
    """The table of a scan that could not be evaluated: the columns, no rows."""
    return pd.DataFrame(columns=METRIC_COLUMNS)


def write_metrics(table: pd.DataFrame, path: str | Path) -> None:
    write_tsv(table, path, STATS_DIGITS)


def _bootstrap_mean(values: np.ndarray, n_resamples: int, seed: int, level: float) -> tuple[float, float, float]:
    """Mean and bootstrap percentile CI of the mean (NaN CI below two values)."""
    n = len(values)
    if n == 0:
        return np.nan, np.nan, np.nan
    mean = float(values.mean())
    if n < 2:
        return mean, np.nan, np.nan
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, n, size=(n_resamples, n))].mean(axis=1)
    low, high = np.percentile(means, [50 * (1 - level), 50 * (1 + level)])
    return mean, float(low), float(high)


def summarize(per_scan: pd.DataFrame, n_resamples: int = 10_000, seed: int = 0, level: float = 0.95) -> pd.DataFrame:
    """Mean Dice and NSD per structure over scans, with bootstrap percentile CIs (columns SUMMARY_COLUMNS).

    ``per_scan`` holds surface_metrics rows of many scans (one row per scan and
    structure). NaN values (structure absent from both maps) are dropped first;
    ``n`` counts the scans with a finite Dice. The CI resamples scans with
    replacement ``n_resamples`` times (numpy's default linear percentiles); each
    structure and metric starts from ``np.random.default_rng(seed)``, so a
    structure's CI does not depend on the other structures, and Dice and NSD
    are resampled on the same scans when both are defined on the same scans.
    Fewer than two values -> CI NaN. Memory is n_resamples x n indices per
    structure (80 MB at 1,000 scans).
    """
    if not 0 < level < 1:
        raise ValueError(f"level {level!r}: must lie in (0, 1)")
    if n_resamples < 1:
        raise ValueError(f"n_resamples {n_resamples!r}: must be >= 1")
    rows = []
    for structure, rows_of in per_scan.groupby("structure", sort=False):
        record = {"structure": structure, "group": rows_of["group"].iloc[0] if "group" in rows_of else ""}
        for metric in ("dice", "nsd"):
            values = rows_of[metric].to_numpy(dtype=np.float64)
            values = values[np.isfinite(values)]
            if metric == "dice":
                record["n"] = len(values)
            mean, low, high = _bootstrap_mean(values, n_resamples, seed, level)
            record.update({f"{metric}_mean": mean, f"{metric}_ci_low": low, f"{metric}_ci_high": high})
        rows.append(record)
    return pd.DataFrame(rows, columns=SUMMARY_COLUMNS).astype({"n": int})


def cohort_metrics(scan_paths: Mapping[str, str | Path], failed: Collection[str] = ()) -> pd.DataFrame:
    """The per-scan tables (evaluate_scan's TSVs) of every subject not in ``failed``, stacked (COHORT_METRIC_COLUMNS).

    No rows, but the columns, when every scan failed (or none was evaluated).
    """
    failed = set(failed)
    frames = [
        read_tsv(path, ANY_MISSING).assign(subject=subject)
        for subject, path in scan_paths.items()
        if subject not in failed
    ]
    if not frames:
        return pd.DataFrame(columns=COHORT_METRIC_COLUMNS)
    return pd.concat(frames, ignore_index=True)[COHORT_METRIC_COLUMNS]


def write_evaluation_summary(
    scan_paths: Mapping[str, str | Path],
    status_paths: Sequence[str | Path],
    dice_path: str | Path,
    summary_path: str | Path,
    failures_path: str | Path,
    figure_paths: Sequence[str | Path],
    n_resamples: int = 10_000,
) -> pd.DataFrame:
    """The evaluation's cohort outputs; returns the summary.

    ``scan_paths`` maps each evaluated subject to its per-scan TSV, and
    ``status_paths`` are the per-scan status files. Writes the per-scan table
    of the scans that did not fail (``dice_path``), the per-structure summary
    (``summary_path``), the failed scans with stage and error
    (``failures_path``) and the Dice figure (``figure_paths``). When every scan
    failed the tables hold their columns and no rows, and the figure says that
    no structure was evaluable.
    """
    failures = collect_failures(status_paths)
    per_scan = cohort_metrics(scan_paths, failed=failures["subject"])
    n_evaluated = per_scan["subject"].nunique()
    log.info("%d scans evaluated, %d failed", n_evaluated, len(failures))
    if n_evaluated == 0:
        log.warning("no scan could be evaluated: the summary has no rows (see %s)", failures_path)
    write_metrics(per_scan, dice_path)
    summary = summarize(per_scan, n_resamples=n_resamples)
    write_metrics(summary, summary_path)
    write_tsv(failures, failures_path, missing=BLANK)
    plot_dice(summary, figure_paths)
    return summary


def plot_dice(summary: pd.DataFrame, outputs: Sequence[str | Path]) -> None:
    """Mean Dice with CI per structure, grouped and coloured organ/bone/muscle/vessel (PNG/SVG by suffix)."""
    order = {g: i for i, g in enumerate(GROUPS)}
    shown = (
        summary[np.isfinite(summary["dice_mean"].to_numpy(dtype=np.float64))]
        .assign(_group=lambda t: t["group"].map(order).fillna(len(order)))
        .sort_values(["_group", "structure"])
    )
    fig, ax = plt.subplots(figsize=(5.0, 0.22 * len(shown) + 1.2 if len(shown) else 2.0))
    ys = np.arange(len(shown))[::-1]
    for y, (_, row) in zip(ys, shown.iterrows()):
        colour = GROUP_COLOURS.get(row["group"], "black")
        if np.isfinite(row["dice_ci_low"]):
            ax.plot([row["dice_ci_low"], row["dice_ci_high"]], [y, y], color=colour, lw=1.2)
        ax.plot(row["dice_mean"], y, "o", color=colour, ms=5)
    ax.set_yticks(ys, [s.replace("_", " ") for s in shown["structure"]])
    ax.set_ylim(-1, max(len(shown), 1))
    ax.set_xlim(0, 1)
    ax.grid(axis="x", alpha=0.3)
    if len(shown):
        ax.set_xlabel("Dice (mean over scans, bootstrap CI)")
        handles = [plt.Line2D([], [], marker="o", color=c, ls="", label=g) for g, c in GROUP_COLOURS.items()]
        ax.legend(handles=handles, loc="lower left", fontsize=8)
    else:  # every scan failed, or no structure is in any reference or prediction
        ax.set_xlabel("Dice")
        ax.text(0.5, 0.5, "no structure evaluable", transform=ax.transAxes, ha="center", va="center")
    fig.tight_layout()
    save_figure(fig, outputs)
