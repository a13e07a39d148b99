"""Patients, not scans, through the real workflow: copies of the real example CT, one patient scanned six times.

Every copy's attenuation is shifted by its age (HU + age - 50), so every structure's HU is in perfect order with
age. Counted as 9 scans this is a perfect correlation on 9 subjects (exact P 2/9! = 6e-6); counted as what it is,
4 patients, the exact P is 2/4! = 1/12, and nothing may be significant.
"""

import math

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from conftest import precomputed_study, real_example_v1, run_workflow, study_folder

pytestmark = pytest.mark.slow

# patient -> ages of its scans; the repeated patient is the oldest, so its first scan keeps the order
PATIENTS = {"pA": [60, 61, 62, 63, 64, 65], "pB": [30], "pC": [40], "pD": [50]}
P_COLUMNS = {
    "age_correlations": ["p", "p_partial"],
    "partial_correlations": ["p"],
    "by_sex": ["p_M", "p_F", "p_diff"],
    "regression": ["p", "p_nonlinear"],
}


@pytest.fixture(scope="module")
def repeated_scans_study(tmp_path_factory):
    affine, hu, labels = real_example_v1()
    workdir, data = study_folder(tmp_path_factory, "patients")
    nib.save(nib.Nifti1Image(labels, affine), data / "seg.nii.gz")
    rows = []
    for patient, ages in PATIENTS.items():
        for visit, age in enumerate(ages):
            subject = f"{patient}_{visit}"
            nib.save(nib.Nifti1Image((hu + (age - 50)).astype(np.int16), affine), data / f"{subject}.nii.gz")
            rows.append(
                {
                    "subject": subject,
                    "ct": f"{subject}.nii.gz",
                    "seg": "seg.nii.gz",
                    "age": age,
                    "sex": "M",
                    "patient": patient,
                }
            )
    config = precomputed_study(data, rows)
    # the tables and the Methods that these tests read (the figures add nothing here)
    run_workflow(
        workdir, config, "results/methods.md", "results/stats/partial_correlations.tsv", "results/stats/by_sex.tsv"
    )
    return workdir / "results"


def test_every_table_counts_patients(repeated_scans_study):
    selection = pd.read_csv(repeated_scans_study / "tables" / "scan_selection.tsv", sep="\t")
    assert len(selection) == 9
    assert sorted(selection.loc[selection["chosen"], "subject"]) == ["pA_0", "pB_0", "pC_0", "pD_0"]
    assert (selection.loc[selection["patient"] == "pA", "scans_of_patient"] == 6).all()
    correlations = pd.read_csv(repeated_scans_study / "stats" / "age_correlations.tsv", sep="\t")
    hu = correlations[(correlations["measure"] == "hu_mean") & correlations["note"].isna()]
    assert len(hu) > 20
    assert (hu["n"] == 4).all() and (hu["n_patients"] == 4).all()
    assert (hu["rs"] == 1).all()
    # per-scan tables keep every scan
    measurements = pd.read_csv(repeated_scans_study / "tables" / "measurements.tsv", sep="\t")
    assert measurements["subject"].nunique() == 9


def test_four_patients_in_perfect_order_give_no_p_below_one_twelfth_and_nothing_significant(repeated_scans_study):
    smallest = 2 / math.factorial(4)
    for table, columns in P_COLUMNS.items():
        frame = pd.read_csv(repeated_scans_study / "stats" / f"{table}.tsv", sep="\t")
        for column in columns:
            values = frame[column].dropna()
            assert (values >= smallest * (1 - 1e-5)).all(), (table, column, values.min())  # 6 digits written
        if "significant" in frame.columns:
            assert not frame["significant"].any(), table
    correlations = pd.read_csv(repeated_scans_study / "stats" / "age_correlations.tsv", sep="\t")
    assert correlations["p"].min() == pytest.approx(smallest, rel=1e-5)


def test_methods_say_scans_and_patients(repeated_scans_study):
    methods = (repeated_scans_study / "methods.md").read_text()
    assert "The 9 scans came from 4 patients, 1 of them with repeated scans" in methods
    assert "one scan per patient, the earliest" in methods
    assert "4 patients entered the age analyses" in methods


# --- within-patient change -------------------------------------------------------------------------------

LIVER, SPLEEN = 5, 1  # v1 label ids
WITHIN_HU_PER_YEAR = 5  # the liver's planted change per year within a patient, with no cross-sectional trend
BETWEEN_HU_PER_YEAR = 1  # the spleen's planted difference per year of baseline age, with no change over time


@pytest.fixture(scope="module")
def repeated_scans_over_years(tmp_path_factory):
    """14 patients scanned 2-4 times over up to 3 years (copies of the real CT, cropped to the abdomen): the
    liver's HU rises 5 per year within each patient, whatever the patient's age; the spleen's HU is higher
    by 1 per year of the patient's age at the first scan and does not change over time."""
    affine, hu, labels = real_example_v1()
    hu, labels = hu[:, :, 60:112], labels[:, :, 60:112]  # the abdomen; the origin moves to slice 60
    affine = affine.copy()
    affine[:3, 3] = (affine @ [0, 0, 60, 1])[:3]
    workdir, data = study_folder(tmp_path_factory, "longitudinal")
    nib.save(nib.Nifti1Image(labels, affine), data / "seg.nii.gz")
    liver, spleen = labels == LIVER, labels == SPLEEN
    assert liver.sum() > 1000 and spleen.sum() > 1000
    rng = np.random.default_rng(16)
    rows = []
    for patient in range(14):
        baseline_age = float(rng.integers(30, 80))
        offset = rng.integers(-20, 21, 2)  # the patient's own level of each organ
        times = np.sort(rng.choice([0, 1, 2, 3], rng.integers(2, 5), replace=False))
        for visit, years in enumerate((times - times[0]).astype(float)):  # since the patient's first scan
            copy = hu.copy()
            copy[liver] += int(offset[0] + WITHIN_HU_PER_YEAR * years + rng.integers(-1, 2))
            copy[spleen] += int(offset[1] + round(BETWEEN_HU_PER_YEAR * (baseline_age - 50)) + rng.integers(-1, 2))
            subject = f"p{patient:02d}_{visit}"
            nib.save(nib.Nifti1Image(copy, affine), data / f"{subject}.nii.gz")
            rows.append(
                {
                    "subject": subject,
                    "ct": f"{subject}.nii.gz",
                    "seg": "seg.nii.gz",
                    "age": baseline_age + years,
                    "sex": "MF"[patient % 2],
                    "patient": f"p{patient:02d}",
                    "years": years,
                }
            )
    sheet = pd.DataFrame(rows)
    sheet.to_csv(data / "cohort.tsv", sep="\t", index=False)
    config = {
        "cohort": str(data / "cohort.tsv"),
        "segmentation": {"method": "precomputed"},
        "normative": {"panels": []},
        "figures": {"scatter": [{"structure": "liver", "measure": "hu_mean"}]},
    }
    # the within-patient table and its figure, which these tests read
    run_workflow(workdir, config, "results/stats/longitudinal.tsv", "results/figures/trajectories.png")
    table = pd.read_csv(workdir / "results" / "stats" / "longitudinal.tsv", sep="\t")
    return workdir / "results", table.set_index(["structure", "measure"])


def test_a_planted_within_patient_change_is_recovered(repeated_scans_over_years):
    _, table = repeated_scans_over_years
    liver = table.loc[("liver", "hu_mean")]
    assert liver["n_patients"] == 14 and liver["note"] != liver["note"]  # NaN: tested
    assert liver["slope_within_per_year"] == pytest.approx(WITHIN_HU_PER_YEAR, abs=0.5)
    assert liver["between_ci_low"] < 0 < liver["between_ci_high"]  # no cross-sectional trend planted
    # a change this clear is as significant as 14 patients can show: an exact sign-flip test's 2^(1 - 14)
    assert liver["p"] == pytest.approx(2.0**-13, rel=1e-5) and liver["p_difference"] == pytest.approx(
        2.0**-13, rel=1e-5
    )


def test_a_cross_sectional_trend_is_not_a_within_patient_change(repeated_scans_over_years):
    _, table = repeated_scans_over_years
    spleen = table.loc[("spleen", "hu_mean")]
    assert abs(spleen["slope_within_per_year"]) < 0.5
    assert spleen["ci_low"] < 0 < spleen["ci_high"]
    assert spleen["slope_between_per_year"] == pytest.approx(BETWEEN_HU_PER_YEAR, abs=0.2)


def test_the_trajectories_figure_is_drawn(repeated_scans_over_years):
    results, _ = repeated_scans_over_years
    assert (results / "figures" / "trajectories.png").stat().st_size > 5000
