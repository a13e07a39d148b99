"""How long the longitudinal mixed models take at 10,000 scans: one fit, ctcohort beside statsmodels' MixedLM,
and the whole results/stats/longitudinal.tsv table.

The cohort is synthetic and seeded: N patients (default 7,000), 30% with 2-6 scans (the rest one) over up
to 8 years, 114 structures x 3 measures (342 rows: the total_v1 table's size), each measure drawn with a
patient intercept (SD 20), a patient slope (SD 1 per year), a within-patient change, sex and contrast
effects and noise (SD 10). One fit: the first structure's hu_mean, its scans of patients with 2+ scans,
random intercept and random intercept + slope, with ctcohort.longitudinal.fit_mixed_model and with
statsmodels MixedLM (REML, L-BFGS as statsmodels fits it by default), their fixed effects side by side.
The table: ``longitudinal_table`` over every row, covariates sex and contrast, as the workflow runs it.

Run:  python benchmarks/longitudinal_speed.py [--patients 7000] [--structures 114] [--repeats 3]
"""

import argparse
import os
import platform
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from ctcohort.longitudinal import fit_mixed_model, longitudinal_table, repeated_scans

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_longitudinal import scan_table  # noqa: E402

MEASURES = ["volume_ml", "hu_mean", "hu_mean_eroded"]


def synthetic_cohort(patients: int, structures: int, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    counts = np.where(
        rng.random(patients) < 0.3, rng.choice([2, 3, 4, 5, 6], patients, p=[0.5, 0.25, 0.1, 0.1, 0.05]), 1
    )
    patient = np.repeat(np.arange(patients), counts)
    time_ = np.concatenate([np.sort(np.r_[0.0, rng.uniform(0.2, 8, c - 1)]) for c in counts])
    baseline, sex = rng.uniform(20, 90, patients), rng.choice(["F", "M"], patients)
    scans = scan_table(rng, patient, baseline[patient] + time_, sex[patient], id_digits=(6, 5))
    tables = []
    for k in range(structures):
        values = {}
        for measure in MEASURES:
            intercept, slope = rng.normal(0, 20, patients), rng.normal(0, 1, patients)
            values[measure] = (
                100
                + 0.3 * baseline[patient]
                + (2 + slope[patient]) * time_
                + intercept[patient]
                + 5 * (sex[patient] == "M")
                + 8 * scans["contrast"]
                + rng.normal(0, 10, len(patient))
            )
        tables.append(scans.assign(structure=f"structure_{k:03d}", group="organ", **values))
    return pd.concat(tables, ignore_index=True)


def timed(function, repeats: int):
    """(result, median seconds)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = function()
        times.append(time.perf_counter() - start)
    return result, float(np.median(times))


def one_fit(measurements: pd.DataFrame, repeats: int) -> None:
    from statsmodels.regression.mixed_linear_model import MixedLM

    block = measurements[measurements["structure"] == measurements["structure"].iloc[0]]
    frame = repeated_scans(block, "hu_mean", ["sex", "contrast"])
    X = np.column_stack([np.ones(len(frame)), frame[["time", "baseline_age", "sex[M]", "contrast"]].to_numpy()])
    y, t = frame["y"].to_numpy(), frame["time"].to_numpy()
    patient = frame["patient"].to_numpy()
    starts = np.flatnonzero(np.r_[True, patient[1:] != patient[:-1]])
    print(f"one fit: {len(starts)} patients, {len(y)} scans")
    print(f"{'random effects':<22}{'ctcohort s':>12}{'statsmodels s':>15}{'within ctcohort':>17}{'statsmodels':>13}")
    for slope in (False, True):
        (fit, used, _), ours = timed(lambda slope=slope: fit_mixed_model(X, y, t, starts, slope), repeats)
        exog_re = np.column_stack([np.ones(len(y)), t]) if slope else np.ones((len(y), 1))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            reference, theirs = timed(
                lambda exog_re=exog_re: MixedLM(y, X, groups=patient, exog_re=exog_re).fit(reml=True, method="lbfgs"), 1
            )
        name = "intercept + slope" if slope else "intercept"
        print(
            f"{name:<22}{ours:>12.4f}{theirs:>15.2f}{fit.beta[1]:>17.5f}{reference.fe_params[1]:>13.5f}"
            f"{'' if reference.converged else '  (statsmodels: not converged)'}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=7000)
    parser.add_argument("--structures", type=int, default=114)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, python {platform.python_version()}")
    measurements = synthetic_cohort(args.patients, args.structures)
    scans = measurements.drop_duplicates("subject")
    repeated = scans.groupby("patient")["subject"].transform("size") >= 2
    print(
        f"cohort: {len(scans)} scans of {scans['patient'].nunique()} patients; "
        f"{scans.loc[repeated, 'patient'].nunique()} patients with 2+ scans hold {int(repeated.sum())} scans"
    )
    one_fit(measurements, args.repeats)
    table, seconds = timed(lambda: longitudinal_table(measurements, MEASURES, ["sex", "contrast"]), 1)
    print(
        f"table: {len(table)} rows ({int((table['note'] == '').sum())} tested, "
        f"{int(table['random_slope'].sum())} with a random slope) in {seconds:.1f} s "
        f"({1000 * seconds / len(table):.0f} ms a row)"
    )


if __name__ == "__main__":
    main()
