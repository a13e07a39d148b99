"""How long one lms centile chart takes end to end, this checkout against an earlier commit, side by side.

One chart as the workflow's normative_charts rule makes it (``ctcohort.centiles``, default settings): model
selection, the 5-fold calibration with the selection repeated in every fold, the 100 bootstrap refits of the
drawn curves, and the placement of the chart's scans. Both versions of ``centiles.py`` (this checkout's and
``--baseline``'s, read from git) fit the same draws (ages uniform in 20-85 years, a 0/1 covariate), rounds
interleaved; printed per truth and n: the median seconds of each part and the ratio of the totals.

BLAS threads make these small problems slower: run with one thread (set below, before numpy loads).

``--study DIR``: instead, every chart (volume_ml and hu_mean, per sex) of ``--structures`` structures spread over
the structure table of a study that the workflow has aggregated (e.g. benchmarks/cohort_rules.py's, with
``--workdir``), one scan per patient, fitted as the workflow fits them (``normative.fit_panel_charts``, method
lms, covariate contrast, one process): the seconds per chart, what charts of every structure would take, and
the centile scores of every scan on these charts (``normative.centile_scores``) beside placing every row.

Run:  python benchmarks/chart_speed.py [--n 2600 5000] [--rounds 3] [--baseline dc9af5a]
      python benchmarks/chart_speed.py --study DIR [--structures 6]
"""

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import argparse  # noqa: E402
import importlib.util  # noqa: E402
import platform  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from ctcohort import centiles  # noqa: E402
from ctcohort.centile_truth import TRUTHS  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PARTS = ("selection + calibration", "bootstrap", "placement")


def module_at(revision: str, folder: Path):
    """centiles.py as it was at ``revision``, imported under a name of its own."""
    source = subprocess.run(
        ["git", "show", f"{revision}:src/ctcohort/centiles.py"], cwd=REPO, check=True, capture_output=True, text=True
    ).stdout
    path = folder / "centiles_baseline.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("centiles_baseline", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def one_chart(module, age, y, covariates) -> tuple[float, ...]:
    """Seconds of each of PARTS for one chart."""
    started = time.perf_counter()
    chart = module.fit_centile_chart(age, y, covariates)
    fitted = time.perf_counter()
    chart.curves(age, y, covariates)
    drawn = time.perf_counter()
    chart.place(y, age, covariates)
    return fitted - started, drawn - fitted, time.perf_counter() - drawn


def study_charts(folder: Path, count: int) -> None:
    """Seconds per chart of ``count`` structures' charts in an aggregated study, and their extrapolation."""
    from ctcohort.normative import ChartSettings, centile_scores, fit_panel_charts, place_cohort
    from ctcohort.patients import read_cross_sectional, read_scans

    tables = folder / "results" / "tables"
    measurements = read_cross_sectional(tables / "measurements.tsv", tables / "scan_selection.tsv")
    every = list(dict.fromkeys(measurements["structure"]))
    structures = every[:: max(1, len(every) // count)][:count]
    panels = [(structure, measure) for structure in structures for measure in ("volume_ml", "hu_mean")]
    started = time.perf_counter()
    fit = fit_panel_charts(measurements, panels, ChartSettings(method="lms", covariates=["contrast"]))
    elapsed = time.perf_counter() - started
    keys = fit.charts.drop_duplicates(["structure", "measure", "sex"])
    per_chart = elapsed / len(keys)
    print(f"{platform.processor() or platform.machine()}, Python {platform.python_version()}; {folder}")
    print(
        f"{len(keys)} charts ({', '.join(structures)}; volume_ml, hu_mean; M, F), {keys['n'].median():.0f} scans "
        f"each (median), notes {dict(keys['note'].value_counts())}: {elapsed:.1f} s, {per_chart:.2f} s a chart"
    )
    every_chart = len(every) * 2 * 2
    print(
        f"every structure ({len(every)}) x 2 measures x 2 sexes = {every_chart} charts: about "
        f"{every_chart * per_chart / 60:.1f} min in one process, {every_chart * per_chart / 120:.1f} min in two"
    )
    scans = read_scans(tables / "measurements.tsv")
    started = time.perf_counter()
    scores = centile_scores(fit, scans)
    charted = time.perf_counter() - started
    started = time.perf_counter()
    everything = place_cohort(fit.charts, fit.coefficients, scans)
    every_row = time.perf_counter() - started
    print(
        f"centile scores of every scan ({scans['subject'].nunique()}): {charted:.1f} s for the {len(scores):,} rows "
        f"of the charted structures and measures; {every_row:.1f} s for the {len(everything):,} rows of every "
        "structure and measure (what centile_scores placed before)"
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, nargs="+", default=[2600, 5000])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--baseline", default="dc9af5a", help="the git revision to compare with")
    parser.add_argument("--study", type=Path, help="time the charts of this aggregated study instead")
    parser.add_argument("--structures", type=int, default=6)
    args = parser.parse_args(argv)
    if args.study:
        study_charts(args.study, args.structures)
        return 0
    with tempfile.TemporaryDirectory() as folder:
        versions = {"baseline": module_at(args.baseline, Path(folder)), "now": centiles}
        print(
            f"{platform.processor() or platform.machine()}, Python {platform.python_version()}, "
            f"baseline {args.baseline}; median of {args.rounds} rounds, seconds"
        )
        print(f"{'truth':7s} {'n':>5s} {'version':8s} " + " ".join(f"{p:>24s}" for p in PARTS) + f" {'total':>7s}")
        for name, truth in TRUTHS.items():
            for n in args.n:
                rng = np.random.default_rng(n)
                age, y = truth.draw(n, rng)
                covariates = pd.DataFrame({"contrast": rng.integers(0, 2, n).astype(float)})
                times = {version: [] for version in versions}
                for _ in range(args.rounds):
                    for version, module in versions.items():
                        times[version].append(one_chart(module, age, y, covariates))
                totals = {}
                for version, rounds in times.items():
                    parts = np.median(np.array(rounds), axis=0)
                    totals[version] = float(np.median(np.array(rounds).sum(axis=1)))
                    print(
                        f"{name:7s} {n:5d} {version:8s} "
                        + " ".join(f"{t:24.2f}" for t in parts)
                        + f" {totals[version]:7.2f}",
                        flush=True,
                    )
                print(f"{name:7s} {n:5d} baseline / now: {totals['baseline'] / totals['now']:.2f}x", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
