"""How long measuring one CT takes as a whole `ctcohort measure` process, against reading alone and TotalSegmentator.

Four processes are timed on the same synthetic scan (default 512x512x300 voxels,
0.8x0.8x1.5 mm, 104 structures of the ``total_v1`` table), each a fresh Python
process, start-up and imports included (what a per-scan job pays):

* nibabel read (dataobj): ``python -c`` that loads the CT (int16 .nii.gz) and the
  label map (uint8 .nii.gz) with ``nibabel.load`` and reads both arrays as stored,
  ``np.asanyarray(img.dataobj)``: the floor of any method that reads the files with nibabel.
* nibabel read (get_fdata): the same with ``img.get_fdata()`` (float64 arrays), as
  TotalSegmentator reads a CT.
* ctcohort measure: ``python -m ctcohort measure --ct ... --seg ... -o ...``, which
  writes the table of all 104 structures (count, volume, mean, median, SD, eroded mean,
  border check).
* TotalSegmentator: ``totalsegmentator.statistics.get_basic_statistics`` (task
  ``total_v1``, mean intensity, masks at the border excluded) on the label map read as
  TotalSegmentator's own API reads it (``get_fdata().astype(np.uint8)``). It computes
  less (volume and mean HU of the structures away from the border) with one mask per
  structure. It is not a dependency of ctcohort: install it for the benchmark only,
  without its dependencies (it needs numpy, nibabel and tqdm here), e.g.
  ``pip install --no-deps --target DIR totalsegmentator`` and pass ``--totalsegmentator DIR``;
  without it the benchmark times the other three and says so.

The processes run interleaved (``--repeats`` rounds, order rotated every round); the
median wall time of each is reported with its CPU time (user + system) and peak RSS, and
the ratios: TotalSegmentator / ctcohort (target >= 50x) and ctcohort / nibabel read
(target <= 1.5x). The script also checks that ctcohort and TotalSegmentator agree on
the structures both measure (volume and mean HU), and on which ones touch the border.

The scan is generated, seeded, into a temporary directory (or ``--workdir``):
an ellipsoidal body of fat in air whose interior is split into Voronoi cells of
varied size, most of them labelled, with per-structure HU and noise.

Run:  python benchmarks/measure_speed.py [--shape 512 512 300] [--repeats 3] [--workdir DIR]
                                         [--totalsegmentator DIR]
"""

import argparse
import concurrent.futures
import importlib.util
import json
import multiprocessing
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
from scipy import ndimage

from ctcohort.measure import read_measurements
from ctcohort.structures import load_structure_table

STRUCTURE_TABLE = "total_v1"
SPACING_MM = (0.8, 0.8, 1.5)
# Agreement tolerances between TotalSegmentator and ctcohort: volumes (mm3 from float32 zooms
# against ml from the affine) and mean HU (TotalSegmentator rounds to 5 decimals).
VOLUME_RTOL, HU_ATOL = 1e-5, 1e-4

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
    ranges = {
        "organ": (20, 70, 12, 25),
        "bone": (250, 800, 40, 120),
        "muscle": (35, 60, 12, 25),
        "vessel": (150, 320, 15, 30),
    }
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


# --------------------------------------------------------------------------- the four processes

READ_DATAOBJ = "import sys, numpy as np, nibabel as nib; [np.asanyarray(nib.load(p).dataobj) for p in sys.argv[1:]]"
READ_FDATA = "import sys, nibabel as nib; [nib.load(p).get_fdata() for p in sys.argv[1:]]"
TOTALSEGMENTATOR = """
import sys
import numpy as np, nibabel as nib
from totalsegmentator.statistics import get_basic_statistics
ct, seg, out = sys.argv[1:]
labels = nib.load(seg).get_fdata().astype(np.uint8)  # as totalsegmentator.python_api reads its segmentation
get_basic_statistics(labels, ct, out, quiet=True, task="total_v1")
"""


def commands(ct: Path, seg: Path, workdir: Path, totalsegmentator: Path | None) -> dict[str, tuple[list[str], dict]]:
    """name: (command line, environment) of each process to time."""
    python, env = sys.executable, dict(os.environ)
    methods = {
        "nibabel read (dataobj)": ([python, "-c", READ_DATAOBJ, str(ct), str(seg)], env),
        "nibabel read (get_fdata)": ([python, "-c", READ_FDATA, str(ct), str(seg)], env),
        "ctcohort measure": (
            [
                python,
                "-m",
                "ctcohort",
                "measure",
                "--ct",
                str(ct),
                "--seg",
                str(seg),
                "-o",
                str(workdir / "ctcohort.tsv"),
            ],
            env,
        ),
    }
    if totalsegmentator is not None:
        ts_env = dict(env, PYTHONPATH=os.pathsep.join(filter(None, [str(totalsegmentator), env.get("PYTHONPATH")])))
        methods["TotalSegmentator"] = (
            [python, "-c", TOTALSEGMENTATOR, str(ct), str(seg), str(workdir / "totalsegmentator.json")],
            ts_env,
        )
    return methods


def run_process(command: list[str], env: dict) -> dict:
    """Wall seconds, CPU seconds (user + system) and peak RSS (MB) of one process; it must succeed."""
    started = time.perf_counter()
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - started
    process.returncode = os.waitstatus_to_exitcode(status)
    error = process.stderr.read().decode(errors="replace")
    process.stderr.close()
    if process.returncode != 0:
        raise RuntimeError(f"{command[:3]} failed ({process.returncode}): {error[-2000:]}")
    peak = usage.ru_maxrss / 1024 / 1024 if sys.platform == "darwin" else usage.ru_maxrss / 1024
    return {"wall": wall, "cpu": usage.ru_utime + usage.ru_stime, "rss": peak}


def find_totalsegmentator(folder: Path | None) -> tuple[Path | None, str]:
    """The folder to put on PYTHONPATH for TotalSegmentator (None: importable as is), or why it is not there."""
    if folder is not None:
        if not (folder / "totalsegmentator" / "statistics.py").is_file():
            raise SystemExit(f"--totalsegmentator {folder}: no totalsegmentator package in it")
        return folder, ""
    if importlib.util.find_spec("totalsegmentator") is not None:
        return Path(importlib.util.find_spec("totalsegmentator").origin).parent.parent, ""
    return None, (
        "TotalSegmentator not installed: not timed (pip install --no-deps --target DIR totalsegmentator; "
        "--totalsegmentator DIR)"
    )


# --------------------------------------------------------------------------- checking and reporting


def disagreements(ours: pd.DataFrame, theirs: dict) -> list[str]:
    """Where ctcohort and TotalSegmentator differ on what both measure, one line each.

    TotalSegmentator reports volume 0 and intensity 0 for a structure that touches the border
    (3 voxels, as ctcohort's default border_margin) or is absent; ctcohort NaN with a reason.
    """
    problems = []
    for row in ours.itertuples(index=False):
        stats = theirs[row.structure]
        excluded = row.n_voxels == 0 or not row.complete
        if excluded != (stats["volume"] == 0):
            problems.append(
                f"{row.structure}: TotalSegmentator volume {stats['volume']}, ctcohort "
                f"n_voxels {row.n_voxels}, complete {row.complete}"
            )
        elif not excluded:
            if not np.isclose(row.volume_ml * 1000, stats["volume"], rtol=VOLUME_RTOL, atol=0):
                problems.append(f"{row.structure}: volume {stats['volume']} mm3 vs {row.volume_ml} ml")
            if not abs(row.hu_mean - stats["intensity"]) <= HU_ATOL:
                problems.append(f"{row.structure}: mean HU {stats['intensity']} vs {row.hu_mean}")
    return problems


def _load_average() -> str:
    try:
        return " ".join(f"{value:.2f}" for value in os.getloadavg())
    except (AttributeError, OSError):  # not available on Windows
        return "n/a"


def _versions() -> str:
    import isal

    return (
        f"python {platform.python_version()}, numpy {np.__version__}, nibabel {nib.__version__}, "
        f"pandas {pd.__version__}, isal {isal.__version__}"
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", type=int, nargs=3, default=[512, 512, 300], metavar=("X", "Y", "Z"))
    parser.add_argument("--repeats", type=int, default=3, help="rounds of the processes (default 3)")
    parser.add_argument("--workdir", type=Path, help="write the scan here and keep it (default: a temporary dir)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--totalsegmentator",
        type=Path,
        metavar="DIR",
        help="folder holding the totalsegmentator package (pip install --no-deps --target DIR)",
    )
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    shape = tuple(args.shape)
    totalsegmentator, missing = find_totalsegmentator(args.totalsegmentator)

    print(_versions())
    print(f"{platform.system()} {platform.machine()}, {os.cpu_count()} cores, load average {_load_average()} at start")
    if missing:
        print(missing)

    with tempfile.TemporaryDirectory(prefix="ctcohort-bench-") as scratch:
        workdir = args.workdir or Path(scratch)
        workdir.mkdir(parents=True, exist_ok=True)
        ct_path, seg_path = workdir / "ct.nii.gz", workdir / "seg.nii.gz"
        spawn = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=spawn) as pool:
            facts = pool.submit(write_synthetic_scan, ct_path, seg_path, shape, args.seed).result()
        size_mb = (ct_path.stat().st_size + seg_path.stat().st_size) / 1e6
        print(
            f"scan {shape[0]}x{shape[1]}x{shape[2]} at {'x'.join(map(str, SPACING_MM))} mm, seed {args.seed}: "
            f"{facts['labels_present']} labels present, {facts['labelled_fraction']:.1%} of voxels labelled, "
            f"{size_mb:.0f} MB on disk (generated in {facts['seconds']:.0f} s)"
        )

        methods = commands(ct_path, seg_path, workdir, totalsegmentator)
        names = list(methods)
        runs = {name: [] for name in names}
        for round_index in range(args.repeats):
            # Rotate the order so no process always runs first (cold caches) or last.
            shift = round_index % len(names)
            for name in names[shift:] + names[:shift]:
                runs[name].append(run_process(*methods[name]))
            print(
                f"  round {round_index + 1}/{args.repeats}: "
                + ", ".join(f"{name} {runs[name][-1]['wall']:.2f} s" for name in names),
                flush=True,
            )
        ours = read_measurements(workdir / "ctcohort.tsv")
        theirs = json.loads((workdir / "totalsegmentator.json").read_text()) if "TotalSegmentator" in methods else None

    median = {
        name: {key: float(np.median([run[key] for run in values])) for key in ("wall", "cpu", "rss")}
        for name, values in runs.items()
    }
    print()
    print(f"{'process':<26}{'median s':>10}{'min s':>9}{'max s':>9}{'CPU s':>9}{'peak MB':>9}")
    for name in names:
        walls = [run["wall"] for run in runs[name]]
        print(
            f"{name:<26}{median[name]['wall']:>10.2f}{min(walls):>9.2f}{max(walls):>9.2f}"
            f"{median[name]['cpu']:>9.2f}{median[name]['rss']:>9.0f}"
        )
    print()
    wall = {name: median[name]["wall"] for name in names}
    ctcohort, read = wall["ctcohort measure"], wall["nibabel read (dataobj)"]
    if theirs is not None:
        print(
            f"TotalSegmentator / ctcohort measure        : {wall['TotalSegmentator'] / ctcohort:6.1f}x  (target >= 50x)"
        )
        print(
            f"TotalSegmentator / nibabel read (dataobj)  : {wall['TotalSegmentator'] / read:6.1f}x  "
            "(what reading alone allows)"
        )
    print(f"ctcohort measure / nibabel read (dataobj)  : {ctcohort / read:6.2f}x  (target <= 1.5x)")
    print(f"ctcohort measure / nibabel read (get_fdata): {ctcohort / wall['nibabel read (get_fdata)']:6.2f}x")
    # Other work on the machine inflates the timings; the load average shows whether there was any.
    print(f"load average at end: {_load_average()}")

    cut_off = int((ours["exclusion_reason"] == "cut_off").sum())
    print(f"ctcohort: {int((ours['n_voxels'] > 0).sum())} structures present, {cut_off} cut off by the border")
    if theirs is None:
        return 0
    problems = disagreements(ours, theirs)
    if problems:
        print(f"ctcohort and TotalSegmentator DISAGREE on {len(problems)} value(s):")
        for line in problems:
            print(f"  {line}")
        return 1
    measured = sum(1 for stats in theirs.values() if stats["volume"] > 0)
    print(
        f"ctcohort and TotalSegmentator agree on all {len(ours)} structures (border exclusions; volume within "
        f"rtol {VOLUME_RTOL:g} and mean HU within {HU_ATOL:g} for the {measured} both measure)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
