"""How long Snakemake takes to plan a large cohort: dry runs at two cohort sizes, side by side.

A cluster study of 10,000 scans is planned by the main Snakemake process, and every cluster job parses
the workflow again; both must stay fast and grow linearly with the cohort. The script writes a synthetic
cohort sheet of N rows (the files exist but are empty: a dry run opens none of them), with
``segmentation.method: nnunet`` and the bundled model (20 scans per segmentation job, the default), and
times ``snakemake --dry-run`` for each size in one run, interleaved, reporting the median of
``--repeats`` and the ratio per scan between the sizes (1.0 is linear).

Run:  python benchmarks/planning.py [--sizes 1000 10000] [--repeats 2] [--workdir DIR]
"""

import argparse
import platform
import statistics
import tempfile
from pathlib import Path

import yaml
from snakemake_runs import REPO, timed_snakemake


def write_study(folder: Path, n: int) -> Path:
    """A cohort of n rows (empty CT files) and a config that segments them with the bundled model."""
    data = folder / "data"
    (data / "ct").mkdir(parents=True, exist_ok=True)
    rows = ["subject\tct\tage\tsex\tcontrast"]
    for i in range(n):
        subject = f"sub{i:06d}"
        (data / "ct" / f"{subject}.nii.gz").touch()
        rows.append(f"{subject}\tct/{subject}.nii.gz\t{20 + i % 70}\t{'MF'[i % 2]}\t{i % 2}")
    (data / "cohort.tsv").write_text("\n".join(rows) + "\n")
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    config["cohort"] = str(data / "cohort.tsv")
    # a user cohort must name a model; the bundled one is fine for planning
    config["segmentation"]["model"] = str(REPO / "resources" / "models" / "demo")
    (folder / "config").mkdir(exist_ok=True)
    (folder / "config" / "config.yaml").write_text(yaml.safe_dump(config))
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs=2, default=[1000, 10000])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--workdir", help="where the synthetic cohorts go (default: a temporary folder)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.workdir or tmp)
        studies = {n: write_study(root / f"cohort{n}", n) for n in args.sizes}
        times = {n: [] for n in args.sizes}
        for repeat in range(args.repeats):
            for n in args.sizes if repeat % 2 == 0 else args.sizes[::-1]:
                times[n].append(timed_snakemake(studies[n], "--dry-run", "--quiet", "all"))
                print(f"  dry run, {n} scans: {times[n][-1]:.1f} s", flush=True)
    print(f"\n{platform.processor() or platform.machine()}, Python {platform.python_version()}")
    print(f"{'scans':>8} {'dry run s':>10} {'ms per scan':>12}")
    median = {n: statistics.median(t) for n, t in times.items()}
    for n in args.sizes:
        print(f"{n:>8} {median[n]:>10.1f} {1000 * median[n] / n:>12.2f}")
    small, large = args.sizes
    print(
        f"per-scan time {large} vs {small} scans: {(median[large] / large) / (median[small] / small):.2f}x "
        "(1.0: linear; includes Snakemake's fixed start-up, which favours the larger cohort)"
    )


if __name__ == "__main__":
    main()
