"""Within-patient change from repeated scans (ctcohort.longitudinal) and the trajectory figure."""

import warnings

import numpy as np
import pandas as pd
import pytest

from ctcohort.longitudinal import (
    CONSTANT,
    LONGITUDINAL_COLUMNS,
    TOO_FEW_PATIENTS,
    fit_mixed_model,
    longitudinal_row,
    longitudinal_table,
    repeated_scans,
)


def scan_table(rng, patient, age, sex, id_digits=(5, 4)) -> pd.DataFrame:
    """One row per scan of the patients numbered in ``patient``: subject and patient ids (``id_digits`` wide),
    age, sex and a random contrast phase (0/1)."""
    subject_digits, patient_digits = id_digits
    return pd.DataFrame(
        {
            "subject": [f"s{i:0{subject_digits}d}" for i in range(len(patient))],
            "patient": [f"p{p:0{patient_digits}d}" for p in patient],
            "age": age,
            "sex": sex,
            "contrast": rng.integers(0, 2, len(patient)),
        }
    )


def cohort(
    seed=0,
    patients=400,
    within=0.0,
    between=0.0,
    sd_patient=30.0,
    sd_slope=0.0,
    sd_noise=10.0,
    repeated_fraction=1.0,
    max_scans=5,
    structures=("liver",),
    years=False,
):
    """A long measurement table: ``patients`` patients, ``repeated_fraction`` of them with 2..max_scans scans
    over up to 8 years (the others one), hu_mean = 100 + between x baseline age + within x years since the
    first scan + a patient intercept and slope + noise; sex and contrast as covariates. With ``years`` the
    table has the years column and ages rounded down to whole years (as DICOM gives them)."""
    rng = np.random.default_rng(seed)
    repeated = rng.random(patients) < repeated_fraction
    counts = np.where(repeated, rng.integers(2, max_scans + 1, patients), 1)
    patient = np.repeat(np.arange(patients), counts)
    baseline = rng.uniform(20, 85, patients)
    sex = rng.choice(["F", "M"], patients)
    time = np.concatenate([np.sort(np.r_[0.0, rng.uniform(0.2, 8, c - 1)]) for c in counts])
    intercept, slope = rng.normal(0, sd_patient, patients), rng.normal(0, sd_slope, patients)
    scans = scan_table(rng, patient, baseline[patient] + time, sex[patient])
    if years:
        scans["years"] = time
        scans["age"] = np.floor(scans["age"])
    tables = []
    for structure in structures:
        hu = (
            100
            + between * baseline[patient]
            + within * time
            + intercept[patient]
            + slope[patient] * time
            + 5.0 * (sex[patient] == "M")
            + 8.0 * scans["contrast"]
            + rng.normal(0, sd_noise, len(patient))
        )
        tables.append(scans.assign(structure=structure, group="organ", hu_mean=hu))
    return pd.concat(tables, ignore_index=True)


def row_of(table, structure="liver", measure="hu_mean"):
    return table[(table["structure"] == structure) & (table["measure"] == measure)].iloc[0]


def test_a_planted_within_patient_change_is_recovered_without_a_cross_sectional_trend():
    table = longitudinal_table(cohort(seed=1, within=5.0, sd_slope=1.0), ["hu_mean"], ["sex", "contrast"])
    assert list(table.columns) == LONGITUDINAL_COLUMNS
    row = row_of(table)
    assert row["note"] == "" and row["n_patients"] == 400
    assert abs(row["slope_within_per_year"] - 5.0) < 0.5
    assert row["ci_low"] < 5.0 < row["ci_high"] and row["p"] < 1e-10
    assert row["between_ci_low"] < 0.0 < row["between_ci_high"]
    assert abs(row["slope_between_per_year"]) < 0.3
    assert row["p_difference"] < 1e-6  # the within-patient change is not the (absent) cross-sectional one
    assert bool(row["random_slope"]) and row["random_slope_note"] == ""
    assert bool(row["significant"])


def test_a_cross_sectional_trend_without_within_patient_change_is_the_between_slope_only():
    table = longitudinal_table(cohort(seed=2, between=-2.0), ["hu_mean"], ["sex", "contrast"])
    row = row_of(table)
    assert row["ci_low"] < 0.0 < row["ci_high"] and abs(row["slope_within_per_year"]) < 0.5
    assert abs(row["slope_between_per_year"] + 2.0) < 0.3
    assert row["between_ci_low"] < -2.0 < row["between_ci_high"]
    assert row["p_difference"] < 1e-6


def demeaned_within_slope(frame: pd.DataFrame) -> tuple[float, float]:
    """Fixed-effects (patient-demeaned) OLS of y on time and contrast: (slope, its classical SE with the
    patients' means counted in the degrees of freedom)."""
    columns = ["y", "time", "contrast"]
    demeaned = frame[columns] - frame.groupby("patient")[columns].transform("mean")
    X, y = demeaned[["time", "contrast"]].to_numpy(), demeaned["y"].to_numpy()
    beta, rss = np.linalg.lstsq(X, y, rcond=None)[:2]
    dof = len(y) - frame["patient"].nunique() - X.shape[1]
    cov = rss[0] / dof * np.linalg.inv(X.T @ X)
    return float(beta[0]), float(np.sqrt(cov[0, 0]))


@pytest.fixture
def dispersed_patients():
    """Patients far apart (intercept SD 300) around little noise (SD 5), no random slopes."""
    measurements = cohort(seed=3, patients=300, within=3.0, between=1.0, sd_patient=300.0, sd_noise=5.0)
    return repeated_scans(measurements, "hu_mean", ["sex", "contrast"])


def test_the_within_slope_is_the_fixed_effects_estimate_where_patients_differ_widely(dispersed_patients):
    # The random-intercept GLS slope is a matrix-weighted mean of the within-patient (fixed-effects) and the
    # between-patient estimates; the between one weighs about sigma^2 / (sigma^2 + n sigma_u^2) = 25 / (25 +
    # 3 x 90,000), i.e. 1e-4 relative, so the two agree to far below their standard error (tolerance 1% of
    # it). With patients that differ little they would not: GLS then borrows between-patient information.
    row = longitudinal_row(dispersed_patients, min_patients=10, random_slope=False)
    within, se = demeaned_within_slope(dispersed_patients)
    assert abs(row["slope_within_per_year"] - within) < 0.01 * se
    mixed_se = (row["ci_high"] - row["ci_low"]) / (2 * 1.959964)
    assert mixed_se == pytest.approx(se, rel=0.02)
    assert row["random_slope_note"] == "off"


def test_the_within_slope_agrees_with_linearmodels_panel_ols(dispersed_patients):
    linearmodels = pytest.importorskip("linearmodels")
    frame = dispersed_patients.assign(scan=dispersed_patients.groupby("patient").cumcount())
    panel = frame.set_index(["patient", "scan"])
    fit = linearmodels.PanelOLS(panel["y"], panel[["time", "contrast"]], entity_effects=True).fit()
    row = longitudinal_row(dispersed_patients, min_patients=10, random_slope=False)
    assert abs(row["slope_within_per_year"] - fit.params["time"]) < 0.01 * fit.std_errors["time"]


@pytest.mark.parametrize("random_slope", [False, True])
def test_the_fit_is_statsmodels_mixedlm(random_slope):
    from statsmodels.regression.mixed_linear_model import MixedLM

    frame = repeated_scans(cohort(seed=4, patients=200, within=2.0, sd_slope=1.5), "hu_mean", ["sex", "contrast"])
    X = np.column_stack([np.ones(len(frame)), frame[["time", "baseline_age", "sex[M]", "contrast"]].to_numpy()])
    y, time = frame["y"].to_numpy(), frame["time"].to_numpy()
    starts = np.flatnonzero(np.r_[True, frame["patient"].to_numpy()[1:] != frame["patient"].to_numpy()[:-1]])
    fit, used, _ = fit_mixed_model(X, y, time, starts, random_slope)
    assert used == random_slope
    exog_re = np.column_stack([np.ones(len(y)), time]) if random_slope else np.ones((len(y), 1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # Powell: here statsmodels' default L-BFGS stops early (not converged, REML criterion 24 worse)
        reference = MixedLM(y, X, groups=frame["patient"].to_numpy(), exog_re=exog_re).fit(reml=True, method="powell")
    assert reference.converged
    assert fit.beta == pytest.approx(np.asarray(reference.fe_params), rel=1e-4, abs=1e-4)
    # statsmodels' SE inverts the observed information of all parameters (fixed x variance cross terms
    # included); ours is the expected one, scale (X'V^-1 X)^-1: equal at the optimum in expectation, within
    # 1% here
    assert np.sqrt(np.diag(fit.cov)) == pytest.approx(np.asarray(reference.bse_fe), rel=1e-2)
    assert fit.scale == pytest.approx(reference.scale, rel=1e-3)


def test_a_random_slope_without_variance_falls_back_to_the_random_intercept_model():
    measurements = cohort(seed=0, patients=100, within=1.0, sd_slope=0.0)
    row = row_of(longitudinal_table(measurements, ["hu_mean"], ["sex"]))
    intercept_only = row_of(longitudinal_table(measurements, ["hu_mean"], ["sex"], random_slope=False))
    assert not row["random_slope"] and row["random_slope_note"] == "singular" and row["note"] == ""
    assert row["slope_within_per_year"] == intercept_only["slope_within_per_year"]
    assert intercept_only["random_slope_note"] == "off"
    two_scans_each = row_of(longitudinal_table(cohort(seed=0, patients=100, max_scans=2), ["hu_mean"], ["sex"]))
    assert not two_scans_each["random_slope"]
    assert two_scans_each["random_slope_note"] == "few_patients_with_3_times"


def test_patients_with_a_single_scan_are_not_used():
    measurements = cohort(seed=5, patients=300, within=5.0, repeated_fraction=0.3)
    scans_of = measurements.groupby("patient")["subject"].transform("size")
    repeated = measurements[scans_of >= 2]
    row = row_of(longitudinal_table(measurements, ["hu_mean"], ["sex"]))
    assert row["n_patients"] == repeated["patient"].nunique() < 300
    assert row["n_scans"] == len(repeated)
    alone = row_of(longitudinal_table(repeated, ["hu_mean"], ["sex"]))
    assert alone["slope_within_per_year"] == pytest.approx(row["slope_within_per_year"], rel=1e-9)


def test_too_few_patients_and_a_constant_measure_are_not_tested_nor_corrected():
    many = cohort(seed=6, patients=60, within=5.0, structures=("liver", "spleen"))
    many.loc[many["structure"] == "spleen", "hu_mean"] = 40.0
    few = cohort(seed=7, patients=6, within=5.0, structures=("kidney_left",))
    measurements = pd.concat([many, few.assign(patient="k" + few["patient"])], ignore_index=True)
    table = longitudinal_table(measurements, ["hu_mean"], ["sex", "contrast"], min_patients=10)
    assert row_of(table, "kidney_left")["note"] == TOO_FEW_PATIENTS
    assert row_of(table, "kidney_left")["n_patients"] == 6
    assert row_of(table, "spleen")["note"] == CONSTANT
    assert table.loc[table["note"] != "", ["p", "p_bonferroni", "q_fdr"]].isna().all().all()
    assert not table.loc[table["note"] != "", "significant"].any()
    liver = row_of(table, "liver")
    assert liver["p_bonferroni"] == pytest.approx(liver["p"])  # one tested row: the family is that row


def test_without_a_patient_column_nothing_is_tested():
    measurements = cohort(seed=8, patients=30).drop(columns="patient")
    assert row_of(longitudinal_table(measurements, ["hu_mean"], ["sex"]))["note"] == TOO_FEW_PATIENTS


def test_time_is_the_years_column_where_the_table_has_one():
    # whole-year ages blur change within a year; years since the first study does not
    measurements = cohort(seed=9, patients=200, within=5.0, sd_noise=2.0, years=True)
    with_years = row_of(longitudinal_table(measurements, ["hu_mean"], ["sex", "contrast"]))
    from_ages = row_of(longitudinal_table(measurements.drop(columns="years"), ["hu_mean"], ["sex", "contrast"]))
    assert abs(with_years["slope_within_per_year"] - 5.0) < 0.1
    assert abs(with_years["slope_within_per_year"] - 5.0) < abs(from_ages["slope_within_per_year"] - 5.0)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="correction"):
        longitudinal_table(cohort(patients=20), ["hu_mean"], [], correction="holm")
    with pytest.raises(ValueError, match="min_patients"):
        longitudinal_table(cohort(patients=20), ["hu_mean"], [], min_patients=2)


def test_the_within_patient_p_keeps_its_level_under_no_change():
    # 1000 seeded cohorts of 30 patients with 2-4 scans, random intercepts, no change at all: the share of
    # P < .05 (random slope tried as in the workflow) is 5% +- 0.7% (binomial SE), so 3-7% is +-2.9 SE.
    rng = np.random.default_rng(10)
    rejections = []
    for _ in range(1000):
        patients = 30
        counts = rng.integers(2, 5, patients)
        patient = np.repeat(np.arange(patients), counts)
        time = np.concatenate([np.sort(np.r_[0.0, rng.uniform(0.2, 6, c - 1)]) for c in counts])
        baseline = rng.uniform(20, 85, patients)
        frame = pd.DataFrame(
            {
                "patient": patient,
                "time": time,
                "baseline_age": baseline[patient],
                "y": rng.normal(0, 20, patients)[patient] + rng.normal(0, 10, len(patient)),
            }
        )
        row = longitudinal_row(frame, min_patients=10, random_slope=True)
        assert row["note"] == ""
        rejections.append(row["p"] < 0.05)
    assert 0.03 <= np.mean(rejections) <= 0.07


# ----------------------------------------------------------------------------------- trajectory figure


def test_trajectory_figure_writes_png_and_svg_the_same_bytes_twice_and_says_when_a_panel_is_empty(
    tmp_path, monkeypatch
):
    from test_figures import assert_legible, svg_text

    from ctcohort import trajectory_figure

    figures = []
    real = trajectory_figure.save_figure
    monkeypatch.setattr(trajectory_figure, "save_figure", lambda fig, paths: (figures.append(fig), real(fig, paths)))
    measurements = cohort(seed=11, patients=40, within=5.0, repeated_fraction=0.5)
    measurements.loc[measurements["patient"].isin(["p0000", "p0001", "p0002"]), "sex"] = np.nan  # sex unknown
    panels = [
        {"structure": "liver", "measure": "hu_mean"},
        {"structure": "spleen", "measure": "hu_mean"},
        {"structure": "liver", "measure": "volume_ml"},
    ]
    outputs = []
    for run in ("a", "b"):
        png, svg = tmp_path / f"{run}.png", tmp_path / f"{run}.svg"
        trajectory_figure.plot_trajectories(measurements, panels, png, svg)
        outputs.append((png.read_bytes(), svg.read_bytes()))
    assert outputs[0] == outputs[1]
    assert outputs[0][0].startswith(b"\x89PNG")
    text = svg_text(tmp_path / "a.svg")
    assert "no patient with" in text and "no volume_ml measured" in text
    repeated = measurements[measurements.groupby("patient")["subject"].transform("size") >= 2]
    drawn = [int(n) for n in __import__("re").findall(r"n=(\d+) patients", text)]
    assert sum(drawn) == repeated["patient"].nunique()  # one line per patient with 2+ scans, counted by sex
    assert "sex unknown" in text
    lines = [c for c in figures[0].axes[0].collections]
    assert sum(len(c.get_segments()) for c in lines) == repeated["patient"].nunique()
    assert_legible(figures[0])
