"""A cohort shaped like a PACS export, with no age effect at all: every table's P must hold its level.

400 patients, 30% of them scanned 2 to 6 times over up to 6 years, a measure that is mostly the patient's own
(within-patient correlation 0.92) and has nothing to do with age, sex or contrast. Each of many structures is
an independent draw, so a table's rows are independent tests. With one scan per patient (the workflow's
scan_selection) every P at .05 must reject 3-7% of the rows; counting every scan as a subject rejects far
more (the issue measured 24% for Spearman).
"""

import numpy as np
import pandas as pd
import pytest

from ctcohort.longitudinal import longitudinal_table
from ctcohort.models import by_sex_table, partial_table, regression_table
from ctcohort.patients import cross_sectional, scan_selection
from ctcohort.stats import age_correlations

PATIENTS = 400
REPEATED = 0.3
WITHIN_CORRELATION = 0.92


def pacs_cohort(structures: int, seed: int = 2026) -> pd.DataFrame:
    """One row per scan x structure (column volume_ml), no effect of age, time, sex or contrast."""
    rng = np.random.default_rng(seed)
    visits = np.where(rng.random(PATIENTS) < REPEATED, rng.integers(2, 7, PATIENTS), 1)
    patient = np.repeat(np.arange(PATIENTS), visits)
    # years since the patient's first scan: 0 for the first, up to 6
    years = np.concatenate([np.sort(rng.uniform(0, 6, v)) for v in visits])
    years -= np.repeat([times[0] for times in np.split(years, np.cumsum(visits)[:-1])], visits)
    age = np.repeat(rng.uniform(20, 85, PATIENTS), visits) + years
    sex = np.repeat(np.where(rng.random(PATIENTS) < 0.5, "M", "F"), visits)
    scans = pd.DataFrame(
        {
            "subject": [f"s{i}" for i in range(len(patient))],
            "patient": [f"p{i}" for i in patient],
            "age": age.round(2),
            "years": years.round(4),
            "sex": sex,
            "contrast": rng.integers(0, 2, len(patient)),
        }
    )
    own = rng.normal(0, np.sqrt(WITHIN_CORRELATION), (structures, PATIENTS))[:, patient]
    noise = rng.normal(0, np.sqrt(1 - WITHIN_CORRELATION), (structures, len(patient)))
    frames = [
        scans.assign(structure=f"null{k}", group="organ", volume_ml=1000 + 50 * (own[k] + noise[k]))
        for k in range(structures)
    ]
    return pd.concat(frames, ignore_index=True)


def rejection_rate(p: pd.Series) -> float:
    p = p.dropna()
    assert len(p) >= 300
    return float((p < 0.05).mean())


@pytest.fixture(scope="module")
def cohort():
    table = pacs_cohort(800)
    return table, cross_sectional(table, scan_selection(table))


def test_counting_scans_as_subjects_gives_false_positives(cohort):
    every_scan, _ = cohort
    naive = age_correlations(every_scan, ["volume_ml"], partial_covariates=[])
    assert rejection_rate(naive["p"]) > 0.12


def test_one_scan_per_patient_holds_the_level_of_every_correlation_table(cohort):
    _, one_per_patient = cohort
    assert one_per_patient.groupby("structure")["patient"].nunique().eq(PATIENTS).all()
    correlations = age_correlations(one_per_patient, ["volume_ml"], partial_covariates=["sex", "contrast"])
    assert (correlations["n_patients"] == PATIENTS).all()
    partial = partial_table(one_per_patient, ["volume_ml"], ["sex", "contrast"])
    by_sex = by_sex_table(one_per_patient, ["volume_ml"])
    rates = {
        "spearman": rejection_rate(correlations["p"]),
        "p_partial": rejection_rate(correlations["p_partial"]),
        "partial": rejection_rate(partial["p"]),
        "men": rejection_rate(by_sex["p_M"]),
        "women": rejection_rate(by_sex["p_F"]),
        "sex difference": rejection_rate(by_sex["p_diff"]),
    }
    assert all(0.03 <= rate <= 0.07 for rate in rates.values()), rates


def test_one_scan_per_patient_holds_the_level_of_the_regression(cohort):
    _, one_per_patient = cohort
    subset = one_per_patient[one_per_patient["structure"].isin([f"null{k}" for k in range(350)])]
    regression = regression_table(subset, ["volume_ml"], ["sex", "contrast"])
    rates = {"slope": rejection_rate(regression["p"]), "spline": rejection_rate(regression["p_nonlinear"])}
    assert all(0.03 <= rate <= 0.07 for rate in rates.values()), rates


def test_the_within_patient_model_holds_its_level(cohort):
    every_scan, _ = cohort
    subset = every_scan[every_scan["structure"].isin([f"null{k}" for k in range(400)])]
    table = longitudinal_table(subset, ["volume_ml"], ["sex", "contrast"])
    assert (table["note"] == "").all()
    assert 0.03 <= rejection_rate(table["p"]) <= 0.07
