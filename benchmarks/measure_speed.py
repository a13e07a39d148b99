"""How long per-structure measurement of one CT takes, against reading alone and a naive baseline.

Three things are timed on the same synthetic scan (default 512x512x300 voxels,
0.8x0.8x1.5 mm, 104 structures of the ``total_v1`` table):

* read only: reading the CT (int16 .nii.gz) and its label map (uint8 .nii.gz)
  with ctcohort's readers; the floor every method pays.
* ctcohort: ``ctcohort.measure.measure_scan`` (reading included), which
  measures all labels at once.
* per-mask baseline: the same reading, then for each structure a boolean mask
  ``labels == label`` with count, mean, median and std of HU, the mean after a
  one-voxel erosion (6-connected, outside the image counts as outside) and
  whether the mask comes within 3 voxels of the image border: what a naive
  implementation does.

The methods run interleaved (``--repeats`` rounds, order rotated every round)
and the median wall time of each is reported, with the ratios
baseline/ctcohort and ctcohort/read-only. The script also checks that the
baseline and ctcohort give the same numbers and says whether they agree.

The scan is generated, seeded, into a temporary directory (or ``--workdir``):
an ellipsoidal body of fat in air whose interior is split into Voronoi cells of
varied size, most of them labelled, with per-structure HU and noise.

Run:  python benchmarks/measure_speed.py [--shape 512 512 300] [--repeats 3] [--workdir DIR]
"""

import argparse
import concurrent.futures
import gc
import multiprocessing
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import scipy
from scipy import ndimage

from ctcohort.imaging import ct_hounsfield, load_image, seg_on_ct_grid
from ctcohort.measure import measure_scan
from ctcohort.structures import load_structure_table

STRUCTURE_TABLE = "total_v1"
SPACING_MM = (0.8, 0.8, 1.5)
BORDER_MARGIN = 3  # ctcohort's default border_margin for cut-off structures
# Agreement tolerances between the baseline and ctcohort.
RTOL, ATOL = 1e-6, 1e-3
HU_COLUMNS = ["hu_mean", "hu_median", "hu_std", "hu_mean_eroded"]

AIR_HU, FAT_HU = -1000.0, -90.0
# Cells without a label (bowel gas, mesenteric fat, ...) next to the 104 labelled ones.
UNLABELLED_CELLS = 12
# The Voronoi partition is built on a grid coarsened by this factor and upsampled:
# an exact nearest-seed map at full resolution would take far longer and change nothing measured.
COARSENING = 2


# --------------------------------------------------------------------------- synthetic scan

def _structure_intensities(table: pd.DataFrame, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Mean HU and noise SD per label id, by anatomical group (lungs are air-filled)."""
    size = int(table["label"].max()) + 1
    mean_hu = np.zeros(size, dtype=np.float32)
    noise_hu = np.zeros(size, dtype=np.float32)
    ranges = {"organ": (20, 70, 12, 25), "bone": (250, 800, 40, 120), "muscle": (35, 60, 12, 25),
              "vessel": (150, 320, 15, 30)}
    for label, name, group in table[["label", "name", "group"]].itertuples(index=False):
        low, high, noise_low, noise_high = ranges.get(group, (20, 70, 12, 25))
        if name.startswith("lung") or name == "trachea":
            low, high, noise_low, noise_high = -880, -780, 30, 60
        mean_hu[label] = rng.uniform(low, high)
        noise_hu[label] = rng.uniform(noise_low, noise_high)
    return mean_hu, noise_hu


def _ellipsoid_mask(shape: tuple[int, int, int], centre: np.ndarray, semi_axes: np.ndarray) -> np.ndarray:
    """Boolean ellipsoid, built slice by slice so no full-size float array is needed."""
    x = ((np.arange(shape[0]) - centre[0]) / semi_axes[0]) ** 2
    y = ((np.arange(shape[1]) - centre[1]) / semi_axes[1]) ** 2
    z = ((np.arange(shape[2]) - centre[2]) / semi_axes[2]) ** 2
    in_plane = x[:, None] + y[None, :]
    mask = np.empty(shape, dtype=bool)
    for k in range(shape[2]):
        mask[:, :, k] = in_plane <= 1.0 - z[k]
    return mask


def _voronoi_labels(shape, inner_centre, inner_axes, n_labels, rng) -> np.ndarray:
    """Voronoi cells inside the inner ellipsoid; labels 1..n_labels on most cells, 0 on a few.

    Half the seeds cluster around a few hubs, so cells range from small (in a
    hub) to large (isolated seeds), like organs next to vertebrae and vessels.
    """
    coarse_shape = tuple(-(-n // COARSENING) for n in shape)
    coarse_centre = np.asarray(inner_centre) / COARSENING
    coarse_axes = np.asarray(inner_axes) / COARSENING
    n_seeds = n_labels + UNLABELLED_CELLS

    seeds: set[tuple[int, int, int]] = set()
    hubs = coarse_centre + rng.uniform(-0.6, 0.6, size=(5, 3)) * coarse_axes
    while len(seeds) < n_seeds:
        if rng.random() < 0.5:
            point = coarse_centre + rng.uniform(-1, 1, size=3) * coarse_axes
        else:
            point = hubs[rng.integers(len(hubs))] + rng.normal(0, 0.12, size=3) * coarse_axes
        if (((point - coarse_centre) / coarse_axes) ** 2).sum() > 1:
            continue
        seed = tuple(int(v) for v in np.clip(np.round(point), 0, np.array(coarse_shape) - 1))
        seeds.add(seed)
    seed_ids = np.zeros(coarse_shape, dtype=np.int16)
    seed_ids[tuple(np.array(sorted(seeds)).T)] = np.arange(1, n_seeds + 1)

    # Nearest seed for every voxel in one pass: the EDT's feature transform.
    nearest = ndimage.distance_transform_edt(
        seed_ids == 0, sampling=SPACING_MM, return_distances=False, return_indices=True
    )
    cells = seed_ids[tuple(nearest)]
    del nearest
    label_of_seed = np.zeros(n_seeds + 1, dtype=np.uint8)
    label_of_seed[1:] = rng.permutation(np.concatenate([np.arange(1, n_labels + 1), np.zeros(UNLABELLED_CELLS)]))
    coarse_labels = label_of_seed[cells]
    del cells
    labels = coarse_labels
    for axis in range(3):
        labels = np.repeat(labels, COARSENING, axis=axis)
    return np.ascontiguousarray(labels[: shape[0], : shape[1], : shape[2]])


def make_synthetic_scan(shape: tuple[int, int, int], seed: int, table: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """An int16 HU volume and its uint8 label map (labels of ``table``) of the given shape."""
    rng = np.random.default_rng(seed)
    shape_arr = np.asarray(shape, dtype=float)
    # A torso: wider than deep, and longer than the scanned range so the z faces cut it.
    body_centre = shape_arr / 2 + np.array([0.0, 0.03 * shape[1], 0.0])
    body_axes = shape_arr * np.array([0.46, 0.34, 0.8])
    # Structures sit inside a rim of subcutaneous fat.
    inner_axes = body_axes * np.array([0.92, 0.9, 1.0])

    body = _ellipsoid_mask(shape, body_centre, body_axes)
    labels = _voronoi_labels(shape, body_centre, inner_axes, int(table["label"].max()), rng)
    labels[~_ellipsoid_mask(shape, body_centre, inner_axes)] = 0

    mean_hu, noise_hu = _structure_intensities(table, rng)
    # Lookup by tissue class: label ids, then 254 for body fat and 255 for air.
    fat_class, air_class = 254, 255
    class_mean = np.zeros(256, dtype=np.float32)
    class_noise = np.zeros(256, dtype=np.float32)
    class_mean[: len(mean_hu)], class_noise[: len(noise_hu)] = mean_hu, noise_hu
    class_mean[fat_class], class_noise[fat_class] = FAT_HU, 15.0
    class_mean[air_class], class_noise[air_class] = AIR_HU, 10.0

    hu = np.empty(shape, dtype=np.int16)
    slab = 16  # slices at a time keeps the float32 noise small
    for start in range(0, shape[2], slab):
        part = np.s_[:, :, start : start + slab]
        tissue = labels[part].copy()
        tissue[(tissue == 0) & body[part]] = fat_class
        tissue[~body[part]] = air_class
        noise = rng.standard_normal(tissue.shape, dtype=np.float32)
        values = class_mean[tissue] + class_noise[tissue] * noise
        hu[part] = np.clip(np.rint(values), -1024, 3071).astype(np.int16)
    return hu, labels


def write_synthetic_scan(ct_path: Path, seg_path: Path, shape: tuple[int, int, int], seed: int) -> dict:
    """Generate and save the scan; returns a few facts about it (run in a child process)."""
    started = time.perf_counter()
    table = load_structure_table(STRUCTURE_TABLE)
    hu, labels = make_synthetic_scan(shape, seed, table)
    affine = np.diag([*SPACING_MM, 1.0])
    for array, path, dtype in ((hu, ct_path, np.int16), (labels, seg_path, np.uint8)):
        image = nib.Nifti1Image(array, affine)
        image.set_data_dtype(dtype)
        image.header.set_xyzt_units("mm", "sec")
        nib.save(image, path)
    return {
        "labelled_fraction": float(np.count_nonzero(labels) / labels.size),
        "labels_present": int(np.count_nonzero(np.bincount(labels.ravel(), minlength=256)[1:])),
        "seconds": time.perf_counter() - started,
    }


# --------------------------------------------------------------------------- the three methods

def read_only(ct_path: Path, seg_path: Path, table: pd.DataFrame):
    ct = load_image(ct_path)
    seg = load_image(seg_path)
    labels = seg_on_ct_grid(seg, ct, seg_path)
    hu = ct_hounsfield(ct)
    return hu.shape, labels.shape


def run_ctcohort(ct_path: Path, seg_path: Path, table: pd.DataFrame) -> pd.DataFrame:
    return measure_scan(ct_path, seg_path, table)


def per_mask_baseline(ct_path: Path, seg_path: Path, table: pd.DataFrame) -> pd.DataFrame:
    """One full-volume boolean mask per structure: 104 passes (and 104 erosions) over the volume."""
    ct = load_image(ct_path)
    seg = load_image(seg_path)
    labels = seg_on_ct_grid(seg, ct, seg_path)
    hu = ct_hounsfield(ct)
    six_connected = ndimage.generate_binary_structure(3, 1)
    rows = []
    for label in table["label"]:
        mask = labels == label
        values = hu[mask]
        n_voxels = values.size
        if n_voxels == 0:
            rows.append({"label": label, "n_voxels": 0, **dict.fromkeys(HU_COLUMNS, np.nan), "near_border": False})
            continue
        eroded = ndimage.binary_erosion(mask, structure=six_connected, border_value=0)
        inner_values = hu[eroded]
        near_border = any(
            mask[(slice(None),) * axis + (part,)].any()
            for axis in range(3)
            for part in (slice(None, BORDER_MARGIN), slice(-BORDER_MARGIN, None))
        )
        rows.append({
            "label": label,
            "n_voxels": n_voxels,
            "hu_mean": values.mean(dtype=np.float64),
            "hu_median": float(np.median(values)),
            "hu_std": values.std(dtype=np.float64),
            "hu_mean_eroded": inner_values.mean(dtype=np.float64) if inner_values.size else np.nan,
            "near_border": near_border,
        })
    return pd.DataFrame(rows)


METHODS = {"read only": read_only, "ctcohort": run_ctcohort, "per-mask baseline": per_mask_baseline}


# --------------------------------------------------------------------------- checking and reporting

def disagreements(baseline: pd.DataFrame, ours: pd.DataFrame) -> list[str]:
    """Every structure where the baseline and ctcohort differ, one line each."""
    merged = baseline.merge(ours, on="label", suffixes=("_baseline", "_ctcohort"), validate="one_to_one")
    problems = []
    for row in merged.itertuples(index=False):
        row = row._asdict()
        where = f"{row['structure']} (label {row['label']})"
        if row["n_voxels_baseline"] != row["n_voxels_ctcohort"]:
            problems.append(f"{where}: n_voxels {row['n_voxels_baseline']} vs {row['n_voxels_ctcohort']}")
            continue
        if row["n_voxels_baseline"] == 0:
            continue
        for column in HU_COLUMNS:
            expected, got = row[f"{column}_baseline"], row[f"{column}_ctcohort"]
            if not np.isclose(got, expected, rtol=RTOL, atol=ATOL, equal_nan=True):
                problems.append(f"{where}: {column} baseline {expected!r} vs ctcohort {got!r}")
        # ctcohort's `complete` is the negation of the baseline's near-border test.
        if bool(row["complete"]) == bool(row["near_border"]):
            problems.append(f"{where}: near border {row['near_border']} but complete {row['complete']}")
    return problems


def peak_rss_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024 / 1024 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


def _load_average() -> str:
    try:
        return " ".join(f"{value:.2f}" for value in os.getloadavg())
    except (AttributeError, OSError):  # not available on Windows
        return "n/a"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", type=int, nargs=3, default=[512, 512, 300], metavar=("X", "Y", "Z"))
    parser.add_argument("--repeats", type=int, default=3, help="rounds of the three methods (default 3)")
    parser.add_argument("--workdir", type=Path, help="write the scan here and keep it (default: a temporary dir)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    shape = tuple(args.shape)

    print(f"python {platform.python_version()}, numpy {np.__version__}, scipy {scipy.__version__}, "
          f"nibabel {nib.__version__}, pandas {pd.__version__}")
    print(f"{platform.system()} {platform.machine()}, {os.cpu_count()} cores, "
          f"load average {_load_average()} at start")

    with tempfile.TemporaryDirectory(prefix="ctcohort-bench-") as scratch:
        workdir = args.workdir or Path(scratch)
        workdir.mkdir(parents=True, exist_ok=True)
        ct_path, seg_path = workdir / "ct.nii.gz", workdir / "seg.nii.gz"
        # A child process generates the scan, so the peak RSS printed below is the measuring alone.
        spawn = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=spawn) as pool:
            facts = pool.submit(write_synthetic_scan, ct_path, seg_path, shape, args.seed).result()
        size_mb = (ct_path.stat().st_size + seg_path.stat().st_size) / 1e6
        print(f"scan {shape[0]}x{shape[1]}x{shape[2]} at {'x'.join(map(str, SPACING_MM))} mm, seed {args.seed}: "
              f"{facts['labels_present']} labels present, {facts['labelled_fraction']:.1%} of voxels labelled, "
              f"{size_mb:.0f} MB on disk (generated in {facts['seconds']:.0f} s)")

        table = load_structure_table(STRUCTURE_TABLE)
        names = list(METHODS)
        seconds = {name: [] for name in names}
        results = {}
        for round_index in range(args.repeats):
            # Rotate the order so no method always runs first (cold caches) or last.
            shift = round_index % len(names)
            for name in names[shift:] + names[:shift]:
                gc.collect()
                started = time.perf_counter()
                results[name] = METHODS[name](ct_path, seg_path, table)
                seconds[name].append(time.perf_counter() - started)
            print(f"  round {round_index + 1}/{args.repeats}: "
                  + ", ".join(f"{name} {seconds[name][-1]:.2f} s" for name in names), flush=True)

    medians = {name: float(np.median(values)) for name, values in seconds.items()}
    print()
    print(f"{'method':<20}{'median s':>10}{'min s':>10}{'max s':>10}")
    for name in names:
        print(f"{name:<20}{medians[name]:>10.2f}{min(seconds[name]):>10.2f}{max(seconds[name]):>10.2f}")
    print()
    print(f"per-mask baseline / ctcohort : {medians['per-mask baseline'] / medians['ctcohort']:6.1f}x")
    print(f"ctcohort / read only         : {medians['ctcohort'] / medians['read only']:6.2f}x")
    print(f"ctcohort beyond reading      : {medians['ctcohort'] - medians['read only']:6.2f} s")
    print(f"peak RSS (measuring process) : {peak_rss_mb():6.0f} MB")
    # Other work on the machine inflates the timings; the load average shows whether there was any.
    print(f"load average at end          : {_load_average()}")

    ours = results["ctcohort"]
    cut_off = int((ours["exclusion_reason"] == "cut_off").sum())
    print(f"ctcohort: {int((ours['n_voxels'] > 0).sum())} structures present, {cut_off} cut off by the border")
    problems = disagreements(results["per-mask baseline"], ours)
    if problems:
        print(f"baseline and ctcohort DISAGREE on {len(problems)} value(s):")
        for line in problems:
            print(f"  {line}")
    else:
        print(f"baseline and ctcohort agree on all {len(ours)} structures "
              f"(n_voxels exact; {', '.join(HU_COLUMNS)} within rtol {RTOL:g} / atol {ATOL:g}; border flag)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
