"""Cohort tables: every scan's measurements joined with the sheet's covariates."""

from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from ctcohort.measure import EXCLUSION_REASONS, MEASURE_COLUMNS, read_measurements
from ctcohort.scan_status import ScanStatus, read_status
from ctcohort.sheet import covariate_columns

FAILURE_COLUMNS = ["subject", "stage", "error"]
SUMMARY_MEASURES = ("volume_ml", "hu_mean", "hu_median", "hu_std", "hu_mean_eroded")
SUMMARY_COLUMNS = ["structure", "group", "measure", "n", "mean", "sd", "q25", "median", "q75"]


def collect_failures(status_paths: Sequence[str | Path]) -> pd.DataFrame:
    """subject, stage, error of every failed per-scan step."""
    return failure_table([read_status(p) for p in status_paths])


def failure_table(statuses: Sequence[ScanStatus]) -> pd.DataFrame:
    """subject, stage, error of the failed ones among ``statuses``."""
    rows = [(s.subject, s.stage, s.error) for s in statuses if not s.ok]
    return pd.DataFrame(rows, columns=FAILURE_COLUMNS)


def cohort_measurements(
    sheet: pd.DataFrame, measurement_paths: dict[str, str | Path], failed: set[str]
) -> pd.DataFrame:
    """One row per subject x structure: covariates first, then the measures. Failed scans are left out."""
    frames = [
        read_measurements(path).assign(subject=subject)
        for subject, path in measurement_paths.items()
        if subject not in failed
    ]
    covariates = sheet[["subject", *covariate_columns(sheet)]].reset_index(drop=True)
    if not frames:
        return pd.DataFrame(columns=[*covariates.columns, *MEASURE_COLUMNS])
    measured = pd.concat(frames, ignore_index=True)
    return covariates.merge(measured, on="subject", how="inner", validate="one_to_many")


def qc_summary(measurements: pd.DataFrame) -> pd.DataFrame:
    """Per structure: scans measured, and how many were excluded for each reason."""
    counts = pd.crosstab(
        [measurements["structure"], measurements["group"]],
        measurements["exclusion_reason"].replace("", "measured"),
    )
    for column in ("measured", *EXCLUSION_REASONS):
        if column not in counts.columns:
            counts[column] = 0
    counts = counts[["measured", *EXCLUSION_REASONS]].reset_index()
    counts.insert(2, "n_scans", counts[["measured", *EXCLUSION_REASONS]].sum(axis=1))
    order = measurements.drop_duplicates("structure")["structure"]
    return counts.set_index("structure").loc[order].reset_index()


def measurement_summary(measurements: pd.DataFrame, measures=SUMMARY_MEASURES) -> pd.DataFrame:
    """Per structure and measure: n (finite values), mean, SD, quartiles. What the report shows in place
    of the full table, which at thousands of scans is too big to embed and carries every covariate."""
    long = measurements.melt(id_vars=["structure", "group"], value_vars=list(measures), var_name="measure")
    long = long[pd.to_numeric(long["value"], errors="coerce").notna()].astype({"value": float})
    if long.empty:
        return pd.DataFrame(columns=SUMMARY_COLUMNS)
    stats = long.groupby(["structure", "group", "measure"], sort=False, dropna=False)["value"].agg(
        n="count", mean="mean", sd="std",
        q25=lambda v: v.quantile(0.25), median="median", q75=lambda v: v.quantile(0.75),
    ).reset_index()
    return stats[SUMMARY_COLUMNS]


def exclusion_counts(n_scans: int, failures: pd.DataFrame, measurements: pd.DataFrame) -> pd.DataFrame:
    """How many scans were measured or failed (by stage), and how many structure measurements were
    excluded (by reason): the counts a reader of the report checks first."""
    rows = [("scans", "in the sheet", n_scans),
            ("scans", "measured", n_scans - failures["subject"].nunique())]
    rows += [("scans", f"failed: {stage}", int(count)) for stage, count in failures["stage"].value_counts().items()]
    # a sheet may leave age or sex blank (de-identified exports): such scans are measured and left out of
    # the analyses that need the value
    scans = measurements.drop_duplicates("subject")
    rows += [("scans", f"measured, no {column}", int(scans[column].isna().sum()))
             for column in ("age", "sex") if column in scans.columns]
    reasons = measurements["exclusion_reason"].fillna("").replace("", "measured").value_counts()
    rows += [("structures", reason, int(reasons.get(reason, 0))) for reason in ("measured", *EXCLUSION_REASONS)]
    rows += [("structures", reason, int(count)) for reason, count in reasons.items()
             if reason not in ("measured", *EXCLUSION_REASONS)]
    return pd.DataFrame(rows, columns=["level", "kind", "count"])


def failure_summary(failures: pd.DataFrame, n_scans: int, table_path: str | Path) -> str | None:
    """One line for the console at the end of a run that left scans out (None when none failed)."""
    if failures.empty:
        return None
    stages = ", ".join(f"{stage}: {count}" for stage, count in failures["stage"].value_counts().items())
    return (f"ctcohort: {failures['subject'].nunique()} of {n_scans} scans failed and are left out of the study "
            f"({stages}); the causes are in {table_path}")


def read_failures(path: str | Path) -> pd.DataFrame:
    return pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
