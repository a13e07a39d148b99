"""Patients, not scans: which scan of each patient enters the cross-sectional statistics.

A scan belongs to a patient: the sheet's optional ``patient`` column (``ctcohort sheet`` writes a
pseudonym there). A sheet without the column, or a blank cell, makes the scan its own patient.

Repeated scans of one patient are not independent observations: counted as separate subjects they give
false positives far above the nominal rate (1,000 patients, 30% with 2-6 scans, within-patient
correlation 0.92, no age effect: 24% of Spearman P values below .05). So every cross-sectional analysis
(age correlations, partial, by sex, regression, normative charts, figures) uses one scan per patient,
chosen by ``statistics.scan_per_patient``; within-patient change is the longitudinal model's
(``ctcohort.longitudinal``). Per-scan tables (measurements, QC) keep every scan.

The rule, among the patient's measured scans (failed scans are not in the measurement table) that have
an age and that a reviewer did not exclude as a whole; a patient with no such scan keeps one all the same,
and the age statistics leave it out like any scan without an age or values:

- ``first``: the earliest scan: the smallest ``years`` (years since the patient's first study) where the
  table has that column, else the youngest age; ties go to the scan listed first in the sheet.
- ``last``: the latest, likewise (ties: listed first).
- ``random``: the scan with the smallest keyed hash of (seed, subject): reproducible for a seed, and a
  patient's choice does not change when other patients join the cohort.
"""

import hashlib
from dataclasses import dataclass

import numpy as np
import pandas as pd

from ctcohort.columns import REVIEWER_EXCLUDED
from ctcohort.tables import ANY_MISSING, read_tsv

RULES = ("first", "last", "random")
SELECTION_COLUMNS = ["subject", "patient", "age", "scans_of_patient", "chosen"]


@dataclass(frozen=True)
class PatientSettings:
    """How one scan per patient is chosen (config ``statistics.scan_per_patient``, ``statistics.seed``)."""

    scan_per_patient: str = "first"
    seed: int = 1

    def __post_init__(self):
        if self.scan_per_patient not in RULES:
            raise ValueError(
                f"statistics.scan_per_patient must be one of {', '.join(RULES)}, got {self.scan_per_patient!r}"
            )

    @classmethod
    def from_config(cls, statistics: dict) -> "PatientSettings":
        return cls(statistics["scan_per_patient"], statistics["seed"])


def patient_of(scans: pd.DataFrame) -> pd.Series:
    """Each scan's patient: the ``patient`` column where given, else the scan's own subject id."""
    subject = scans["subject"].astype(str)
    if "patient" not in scans.columns:
        return subject
    patient = scans["patient"].astype(object).where(scans["patient"].notna(), "").astype(str).str.strip()
    return patient.where(patient != "", subject)


def _keyed_hash(seed: int, subject: str) -> int:
    return int.from_bytes(hashlib.blake2b(f"{seed}\0{subject}".encode(), digest_size=8).digest(), "big")


def _order_key(scans: pd.DataFrame, settings: PatientSettings) -> np.ndarray:
    """Sort key within a patient: the chosen scan has the smallest."""
    if settings.scan_per_patient == "random":
        return np.array([_keyed_hash(settings.seed, s) for s in scans["subject"]], dtype=float)
    time_column = "years" if "years" in scans.columns else "age"
    time = pd.to_numeric(scans[time_column], errors="coerce").to_numpy(dtype=float)
    return time if settings.scan_per_patient == "first" else -time


def choose_scans(scans: pd.DataFrame, settings: PatientSettings = PatientSettings()) -> pd.DataFrame:
    """One row per scan of ``scans`` (one row per subject, in sheet order; columns subject, age and
    optionally patient, years): SELECTION_COLUMNS, ``chosen`` True for one scan of each patient (module
    docstring)."""
    table = pd.DataFrame({"subject": scans["subject"].astype(str).to_numpy(), "patient": patient_of(scans).to_numpy()})
    table["age"] = pd.to_numeric(scans["age"], errors="coerce").to_numpy(dtype=float) if "age" in scans else np.nan
    table["no_age"] = table["age"].isna()
    if "reviewer_excluded" in scans:  # scan_selection: the whole scan excluded
        table["no_age"] |= scans["reviewer_excluded"].to_numpy(dtype=bool)
    key = _order_key(scans, settings)
    table["key"] = np.where(np.isfinite(key), key, np.inf)
    table["position"] = np.arange(len(table))
    # scans with an age first, then the rule's key, then sheet order
    ranked = table.sort_values(["patient", "no_age", "key", "position"], kind="stable")
    first = ranked.groupby("patient", sort=False)["position"].first()
    table["chosen"] = table["position"].isin(first.to_numpy())
    table["scans_of_patient"] = table.groupby("patient")["subject"].transform("size").astype(int)
    return table[SELECTION_COLUMNS]


def scan_selection(measurements: pd.DataFrame, settings: PatientSettings = PatientSettings()) -> pd.DataFrame:
    """``choose_scans`` over the scans of a cohort measurement table (one row per scan x structure)."""
    scans = measurements.drop_duplicates("subject").reset_index(drop=True)
    if {"label", "exclusion_reason"} <= set(measurements.columns):
        own = measurements[pd.to_numeric(measurements["label"], errors="coerce").notna()]  # not combined rows
        excluded = (own["exclusion_reason"] == REVIEWER_EXCLUDED).groupby(own["subject"]).all()
        scans["reviewer_excluded"] = scans["subject"].map(excluded).fillna(False).to_numpy(dtype=bool)
    return choose_scans(scans, settings)


def cross_sectional(measurements: pd.DataFrame, selection: pd.DataFrame) -> pd.DataFrame:
    """The rows of ``measurements`` whose scan is chosen in ``selection`` (one scan per patient)."""
    chosen = set(selection.loc[selection["chosen"].astype(str).str.lower() == "true", "subject"].astype(str))
    return measurements[measurements["subject"].astype(str).isin(chosen)].reset_index(drop=True)


def read_scans(path) -> pd.DataFrame:
    """A table of scans (measurements, the selection) with its subject and patient ids read as text: "007" is
    an id, not the number 7. A blank cell is missing as "NaN" is: a blank covariate leaves the scan out of what
    needs it."""
    return read_tsv(path, ANY_MISSING, dtype={"subject": str, "patient": str})


def read_cross_sectional(measurements_path, selection_path) -> pd.DataFrame:
    """The cohort measurement table reduced to one scan per patient, as the statistics rules read it."""
    return cross_sectional(read_scans(measurements_path), read_scans(selection_path))


def patient_counts(selection: pd.DataFrame) -> dict[str, int]:
    """Scans, patients, patients with repeated scans, and chosen scans with an age: what Methods reports."""
    per_patient = selection.groupby("patient")["subject"].size()
    chosen = selection["chosen"].astype(str).str.lower() == "true"
    return {
        "scans": len(selection),
        "patients": int(per_patient.size),
        "patients_with_repeats": int((per_patient > 1).sum()),
        "patients_with_age": int((chosen & pd.to_numeric(selection["age"], errors="coerce").notna()).sum()),
    }
