"""How well centile charts (``ctcohort.centiles``) place new healthy scans, by scans per chart, on draws from a
known truth; and how long one chart takes.

For each truth (``normal``: mean and SD change with age; ``skewed``: gamma with shape 8, skewness 0.71, whose mean
changes with age; ``heavy``: Student's t with 5 df and the mean and SD of ``normal``; all in
``ctcohort.centile_truth``) and each n: ``--repeats`` charts, each selected and
fitted on n scans of ages uniform in 20-85 years, then 2,000 new scans drawn at ages inside the chart's range
are placed. Printed per truth x n: the mean share beyond |z| 1.96 over the repeats (nominal 5%), the largest
|z|, the share of charts that the k-fold calibration would refuse, and the share of charts refused at the
module's MIN_SCANS (too_few_scans) or by calibration together. ``--timing``: the time of one chart (selection,
k-fold calibration with selection in every fold, bootstrap intervals; each part) at n scans. ``--families``: the
families the selection chooses from (default: CentileSettings's).

BLAS threads make these small problems slower: run with one thread (set below, before numpy loads).

Run:  python benchmarks/centile_calibration.py [--n 15 30 50 100 120 500] [--repeats 20]
      python benchmarks/centile_calibration.py --timing 5000 [--families normal bccg]
"""

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import argparse  # noqa: E402
import time  # noqa: E402
from dataclasses import replace  # noqa: E402

import numpy as np  # noqa: E402

from ctcohort import centiles  # noqa: E402
from ctcohort.centile_truth import TRUTHS  # noqa: E402

NEW_SCANS = 2000


def placed(truth, n: int, rng, settings) -> tuple[float, float, bool]:
    """(share of new scans beyond |z| 1.96, largest |z|, calibration failed) of one chart on n scans."""
    age, y = truth.draw(n, rng)
    model, _ = centiles.select_model(age, y, settings=settings)
    new_age = rng.uniform(age.min(), age.max(), NEW_SCANS)
    z, _ = model.z(truth.sample(new_age, rng), new_age, z_limit=settings.z_limit)
    failed = centiles.calibrate(age, y, settings=settings)[0][centiles.CALIBRATION_FAILED]
    return float((np.abs(z) > 1.96).mean()), float(np.abs(z).max()), failed


def calibration_table(sizes, repeats: int, seed: int, settings) -> None:
    settings = replace(settings, min_scans=5)
    print("truth   n     beyond_1.96  max|z|  calibration_failed  refused_at_MIN_SCANS")
    for name, truth in TRUTHS.items():
        for n in sizes:
            rng = np.random.default_rng(seed + n)
            rows = np.array([placed(truth, n, rng, settings) for _ in range(repeats)])
            refused = np.where(n < centiles.MIN_SCANS, 1.0, rows[:, 2].mean())
            print(
                f"{name:7s} {n:5d} {rows[:, 0].mean():11.3f} {rows[:, 1].max():7.2f} {rows[:, 2].mean():19.2f} "
                f"{refused:21.2f}",
                flush=True,
            )


def timing(n: int, seed: int, settings) -> None:
    for name, truth in TRUTHS.items():
        age, y = truth.draw(n, np.random.default_rng(seed))
        start = time.perf_counter()
        model, _ = centiles.select_model(age, y, settings=settings)
        selected = time.perf_counter()
        centiles.calibrate(age, y, settings=settings)
        calibrated = time.perf_counter()
        centiles.bootstrap_centiles(model, age, y, settings=settings)
        done = time.perf_counter()
        print(
            f"{name}: n {n}, {model.family} {model.dfs}: selection {selected - start:.2f} s, calibration "
            f"({settings.folds} folds) {calibrated - selected:.2f} s, bootstrap ({settings.bootstrap_resamples}) "
            f"{done - calibrated:.2f} s, total {done - start:.2f} s",
            flush=True,
        )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, nargs="+", default=[15, 30, 50, 100, 120, 500])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--seed", type=int, default=2024)
    parser.add_argument("--timing", type=int, metavar="N", help="time one chart of N scans instead")
    parser.add_argument("--families", nargs="+", default=list(centiles.DEFAULTS.families))
    args = parser.parse_args(argv)
    settings = centiles.CentileSettings(families=tuple(args.families))
    if args.timing:
        timing(args.timing, args.seed, settings)
    else:
        calibration_table(args.n, args.repeats, args.seed, settings)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
