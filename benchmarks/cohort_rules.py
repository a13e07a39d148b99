"""How long the cohort rules take at 10,000 scans: aggregation, statistics, figures and the report.

The per-scan work is not what is timed here: the script writes a synthetic study whose per-scan
measurement tables and status files already exist (N scans x 104 structures of ``total_v1``, volumes and
HU drawn with an age trend, a few structures absent or cut off, 1% of the scans failed; scans of patients,
30% of whom have 2-6 scans over up to 6 years, so the longitudinal models have work to do), with empty CT and
segmentation files older than them, then runs the real workflow (``segmentation.method: precomputed``,
``--rerun-triggers mtime`` so that only the cohort rules run) and ``snakemake --report``. It prints the
wall time of each, the peak memory of the largest process (the cohort rules run as local jobs) and the
seconds of each rule's job (from Snakemake's log).
Two sizes run side by side; the ratio per scan says whether the cohort rules grow linearly.

Run:  python benchmarks/cohort_rules.py [--sizes 1000 10000] [--workdir DIR]
"""

import argparse
import platform
import re
import resource
import tempfile
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from snakemake_runs import REPO, timed_snakemake

from ctcohort.columns import MEASURE_COLUMNS, QC_COLUMNS
from ctcohort.measure import write_measurements
from ctcohort.qc import ScanQC, empty_qc, write_qc
from ctcohort.review import vertebra_rank
from ctcohort.scan_status import ScanStatus
from ctcohort.structures import load_structure_table


def patients_of(n: int, rng: np.random.Generator) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(patient of each of n scans, the patient's age at the first scan, years since it): 70% of the patients
    scanned once, 30% two to six times over up to 6 years."""
    patients, baseline, years = [], [], []
    while len(patients) < n:
        visits = int(rng.integers(2, 7)) if rng.random() < 0.3 else 1
        times = np.sort(rng.uniform(0, 6, visits)) if visits > 1 else np.zeros(1)
        patients += [f"pat{len(baseline):06d}"] * visits
        years += list(times - times[0])
        baseline.append(rng.uniform(18, 89))
    first = np.array([baseline[int(p[3:])] for p in patients[:n]])
    return patients[:n], first, np.array(years[:n])


def write_study(folder: Path, n: int, seed: int = 0) -> Path:
    """Sheet, empty image files, then per-scan tables and statuses (newer than the images)."""
    rng = np.random.default_rng(seed)
    table = load_structure_table("total_v1")
    data, measure, qc = folder / "data", folder / "results" / "measure", folder / "results" / "qc"
    for made in (data, measure, qc):
        made.mkdir(parents=True)
    subjects = [f"sub{i:06d}" for i in range(n)]
    patients, first_age, years = patients_of(n, rng)
    ages = (first_age + years).round(1)
    sheet = pd.DataFrame(
        {
            "subject": subjects,
            "ct": [f"{s}_ct.nii.gz" for s in subjects],
            "seg": [f"{s}_seg.nii.gz" for s in subjects],
            "age": ages,
            "sex": [("M", "F")[int(p[3:]) % 2] for p in patients],
            "contrast": rng.integers(0, 2, n),
            "patient": patients,
            "years": years.round(4),
        }
    )
    for path in [*sheet["ct"], *sheet["seg"]]:
        (data / path).touch()
    sheet.to_csv(data / "cohort.tsv", sep="\t", index=False)
    time.sleep(1.1)  # the measurements must be newer than their inputs
    base_volume = rng.uniform(5, 1500, len(table))
    base_hu = rng.uniform(-100, 400, len(table))
    failed = set(rng.choice(subjects, max(1, n // 100), replace=False))
    # the QC geometry of a sane scan: left twins at smaller x (RAS+), vertebrae cranial above caudal, one piece
    side = np.where(table["name"].str.contains("left"), -50.0, np.where(table["name"].str.contains("right"), 50.0, 0.0))
    spine = table["name"].map(vertebra_rank).astype(float)
    height = np.where(spine.notna(), -30.0 * spine, 0.0)
    geometry = {
        "centroid_x_mm": side,
        "centroid_y_mm": 0.0,
        "centroid_z_mm": height,
        "second_piece_ml": 0.0,
        "sform_qform_mm": 0.0,
    }
    for subject, age in zip(subjects, ages):
        status = ScanStatus(subject, "measure")
        if subject in failed:
            status.ok, status.error = False, "ValueError: synthetic failure"
            write_measurements(pd.DataFrame(columns=MEASURE_COLUMNS), measure / f"{subject}.tsv")
            write_qc(empty_qc(), qc / f"{subject}.tsv", qc / f"{subject}.png")
        else:
            n_voxels = (base_volume * (1 + 0.002 * (age - 50)) * rng.lognormal(0, 0.1, len(table)) * 1000).astype(int)
            hu = base_hu - 0.5 * (age - 50) + rng.normal(0, 20, len(table))
            reason = np.where(
                rng.random(len(table)) < 0.05, "absent", np.where(rng.random(len(table)) < 0.05, "cut_off", "")
            )
            frame = pd.DataFrame(
                {
                    "structure": table["name"],
                    "label": table["label"],
                    "group": table["group"],
                    "n_voxels": np.where(reason == "absent", 0, n_voxels),
                    "volume_ml": np.where(reason == "", n_voxels / 1000.0, np.nan),
                    "hu_mean": np.where(reason == "absent", np.nan, hu),
                    "hu_median": np.where(reason == "absent", np.nan, hu + 1),
                    "hu_std": np.where(reason == "absent", np.nan, 30.0),
                    "hu_mean_eroded": np.where(reason == "absent", np.nan, hu + 2),
                    "complete": pd.array(np.where(reason == "absent", None, reason != "cut_off"), dtype="boolean"),
                    "exclusion_reason": reason,
                }
            )
            write_measurements(frame, measure / f"{subject}.tsv")
            # what the measuring job writes beside the table (the preview as the placeholder pixel)
            faces = pd.DataFrame(
                {
                    "structure": table["name"],
                    "label": table["label"],
                    "cut_faces": np.where(reason == "cut_off", "z+", ""),
                    "cranial_vertebra": "vertebrae_T12",
                    "caudal_vertebra": "vertebrae_L5",
                    **geometry,
                }
            )
            write_qc(ScanQC(faces[QC_COLUMNS], None), qc / f"{subject}.tsv", qc / f"{subject}.png")
        status.write(measure / f"{subject}.status.json")
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    config["cohort"] = str(data / "cohort.tsv")
    config["segmentation"]["method"] = "precomputed"
    config["figures"]["boxplots"] = config["figures"]["boxplots"][:6]
    (folder / "config").mkdir()
    (folder / "config" / "config.yaml").write_text(yaml.safe_dump(config))
    return folder


def rule_seconds(folder: Path) -> dict[str, float]:
    """Wall seconds of each rule's job in the folder's first Snakemake run, from the timestamps (1 s apart) its
    log writes before a job starts (``localrule NAME:``) and as it finishes (``Finished jobid: N (Rule: NAME)``);
    jobs of a rule run one after another here, so per rule is per job."""
    log = sorted((folder / ".snakemake" / "log").glob("*.snakemake.log"))[0].read_text().splitlines()
    started, seconds = {}, {}
    for stamp, line in zip(log, log[1:]):
        if not (stamp.startswith("[") and stamp.endswith("]")):
            continue
        when = datetime.strptime(stamp[1:-1], "%a %b %d %H:%M:%S %Y")
        begun = re.match(r"(?:local)?rule (\w+):$", line)
        finished = re.match(r"Finished jobid: \d+ \(Rule: (\w+)\)", line)
        if begun:
            started[begun.group(1)] = when
        elif finished and finished.group(1) in started:
            seconds[finished.group(1)] = (when - started[finished.group(1)]).total_seconds()
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs=2, default=[1000, 10000])
    parser.add_argument("--workdir", help="where the synthetic studies go (default: a temporary folder)")
    args = parser.parse_args()
    rows, per_rule = [], []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.workdir or tmp)
        for n in args.sizes:
            folder = write_study(root / f"study{n}", n)
            run = timed_snakemake(folder, "--rerun-triggers", "mtime")
            jobs = sorted(p.stem for p in (folder / "results" / "logs").glob("*.log"))
            report = timed_snakemake(folder, "--rerun-triggers", "mtime", "--report", "results/report.html")
            size_mb = (folder / "results" / "report.html").stat().st_size / 1e6
            rows.append((n, run, report, size_mb))
            per_rule.append(rule_seconds(folder))
            print(
                f"  {n} scans: cohort rules {run:.1f} s ({', '.join(jobs)}), report {report:.1f} s, "
                f"report {size_mb:.1f} MB",
                flush=True,
            )
    peak_gb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024**2  # kB on Linux
    print(f"\n{platform.processor() or platform.machine()}, Python {platform.python_version()}")
    print(f"{'scans':>8} {'cohort rules s':>15} {'report s':>9} {'report MB':>10}")
    for n, run, report, size_mb in rows:
        print(f"{n:>8} {run:>15.1f} {report:>9.1f} {size_mb:>10.1f}")
    (small, run_small, *_), (large, run_large, *_) = rows
    print(
        f"cohort rules per scan, {large} vs {small} scans: {(run_large / large) / (run_small / small):.2f}x "
        "(1.0: linear; Snakemake's start-up favours the larger cohort)"
    )
    print(f"peak memory of the largest process: {peak_gb:.2f} GB")
    print(f"\nseconds per rule (two jobs at a time on --cores 2; longest at {large} scans first)")
    print(f"{'rule':32s} {small:>8d} {large:>8d}")
    for rule in sorted(per_rule[1], key=per_rule[1].get, reverse=True):
        print(f"{rule:32s} {per_rule[0].get(rule, float('nan')):8.0f} {per_rule[1][rule]:8.0f}")


if __name__ == "__main__":
    main()
