"""Cohort tables: every scan's measurements joined with the sheet's covariates."""

from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from ctcohort.measure import MEASURE_COLUMNS, read_measurements
from ctcohort.scan_status import read_status
from ctcohort.sheet import covariate_columns

FAILURE_COLUMNS = ["subject", "stage", "error"]
EXCLUSION_REASONS = ("absent", "cut_off", "too_small")


def collect_failures(status_paths: Sequence[str | Path]) -> pd.DataFrame:
    """subject, stage, error of every failed per-scan step."""
    statuses = [read_status(p) for p in status_paths]
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
