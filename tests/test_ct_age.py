"""CT age (ctcohort.ct_age): a planted gap recovered, every prediction out of fold, the bias correction, patients."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from ctcohort.ct_age import (
    ALL,
    CtAgeSettings,
    age_bias,
    corrected_age,
    ct_age,
    feature_matrix,
    table_columns,
)
from ctcohort.patients import PatientSettings, scan_selection
from ctcohort.structures import load_structure_table

REPO = Path(__file__).resolve().parents[1]
PLANTED_GAP = 10.0


def synthetic_cohort(
    n: int = 500, seed: int = 0, accelerated_share: float = 0.2, structures: int = 104, repeats_share: float = 0.0
) -> tuple[pd.DataFrame, pd.Series]:
    """(a cohort measurement table, each scan's planted extra years) of ``n`` scans x the first ``structures``
    of total_v1: a third of the structure x measure pairs follow age (linearly or along a curve) with noise,
    sex and contrast shift them, 5% of the values are missing; ``accelerated_share`` of the patients' measures
    follow age + 10 years. ``repeats_share`` of the patients get a second scan two years later."""
    rng = np.random.default_rng(seed)
    table = load_structure_table("total_v1").head(structures)
    k = len(table)
    n_patients = int(round(n / (1 + repeats_share)))
    patient_age = rng.uniform(18, 95, n_patients)
    accelerated = rng.random(n_patients) < accelerated_share
    sex = rng.choice(["M", "F"], n_patients)
    repeated = rng.random(n_patients) < repeats_share
    patient = np.concatenate([np.arange(n_patients), np.flatnonzero(repeated)])[:n]
    age = np.concatenate([patient_age, patient_age[repeated] + 2.0])[:n]
    contrast = rng.integers(0, 2, len(patient))
    biological = age + PLANTED_GAP * accelerated[patient]
    decades = (biological[:, None] - 55.0) / 10.0
    volume_slope = np.where(rng.random(k) < 1 / 3, rng.choice([-1, 1], k) * rng.uniform(0.03, 0.08, k), 0.0)
    hu_slope = np.where(rng.random(k) < 1 / 3, rng.choice([-1, 1], k) * rng.uniform(4, 20, k), 0.0)
    hu_curve = np.where(rng.random(k) < 0.1, -rng.uniform(1, 3, k), 0.0)
    male = (sex[patient] == "M")[:, None]
    volume = (
        rng.uniform(10, 1500, k)
        * (1 + volume_slope * decades)
        * np.where(male, 1.08, 0.92)
        * rng.lognormal(0, 0.08, (len(patient), k))
    )
    hu = (
        rng.uniform(-50, 400, k)
        + hu_slope * decades
        + hu_curve * decades**2
        + 40 * contrast[:, None]
        + rng.normal(0, 12, (len(patient), k))
    )
    volume[rng.random(volume.shape) < 0.05] = np.nan
    hu[rng.random(hu.shape) < 0.05] = np.nan
    subjects = [f"s{i:05d}" for i in range(len(patient))]
    measurements = pd.DataFrame(
        {
            "subject": np.repeat(subjects, k),
            "age": np.repeat(age.round(1), k),
            "sex": np.repeat(sex[patient], k),
            "contrast": np.repeat(contrast, k),
            "patient": np.repeat([f"p{p:05d}" for p in patient], k),
            "structure": np.tile(table["name"], len(patient)),
            "label": np.tile(table["label"], len(patient)),
            "group": np.tile(table["group"], len(patient)),
            "volume_ml": volume.ravel(),
            "hu_mean": hu.ravel(),
            "exclusion_reason": "",
        }
    )
    return measurements, pd.Series(PLANTED_GAP * accelerated[patient], index=subjects, name="planted")


def selection_of(measurements: pd.DataFrame) -> pd.DataFrame:
    return scan_selection(measurements, PatientSettings("first", 1))


@pytest.fixture(scope="module")
def planted():
    measurements, planted_years = synthetic_cohort()
    return ct_age(measurements, selection_of(measurements), CtAgeSettings(groups=())), planted_years


def test_planted_gap_is_recovered(planted):
    """The done-when: +10 years planted in 20% of 500 scans comes back as a difference of mean corrected gaps of
    10 +- 3 years, with a mean absolute error below 5 years in the others."""
    result, planted_years = planted
    table = result.table.set_index("subject")
    accelerated = planted_years.reindex(table.index) > 0
    difference = (
        table.loc[accelerated, "age_gap_corrected"].mean() - table.loc[~accelerated, "age_gap_corrected"].mean()
    )
    others = table.loc[~accelerated]
    mae = (others["predicted_age"] - others["age"]).abs().mean()
    assert 0.15 < accelerated.mean() < 0.25
    assert abs(difference - PLANTED_GAP) < 3, difference
    assert mae < 5, mae
    summary = result.summary.set_index("features").loc[ALL]
    assert summary["n_scans"] == 500 and summary["r2"] > 0.8 and summary["note"] == ""
    print(
        f"recovered gap {difference:.2f} years, MAE of the others {mae:.2f}, R2 {summary['r2']:.3f}, "
        f"models {summary['models_by_fold']}"
    )


def test_every_prediction_out_of_fold(planted):
    """No fold's model trained on a scan it predicts; every scan is predicted by exactly one fold."""
    result, _ = planted
    fit = result.fits[ALL]
    fold = result.table["fold"].to_numpy()
    for model in fit.models:
        assert not np.any(fold[model.trained] == model.fold)
        assert set(np.flatnonzero(fold != model.fold)) == set(model.trained)
    assert np.isfinite(result.table["predicted_age"]).all()


def test_own_age_does_not_change_own_prediction():
    """Leakage would show: a scan's age replaced by an absurd one leaves its own prediction and corrected age
    unchanged (only the models of the other folds saw it), while its gap follows its age."""
    measurements, _ = synthetic_cohort(n=120, structures=30, seed=3)
    settings = CtAgeSettings(groups=(), min_scans=30)
    before = ct_age(measurements, selection_of(measurements), settings).table.set_index("subject")
    target = before.index[7]
    changed = measurements.assign(age=measurements["age"].where(measurements["subject"] != target, 500.0))
    after = ct_age(changed, selection_of(changed), settings).table.set_index("subject")
    fold = before.at[target, "fold"]
    same_fold = before.index[before["fold"] == fold]
    for column in ("predicted_age", "predicted_age_corrected"):
        np.testing.assert_allclose(after.loc[same_fold, column], before.loc[same_fold, column])
    assert after.at[target, "age_gap_corrected"] == pytest.approx(before.at[target, "predicted_age_corrected"] - 500)
    others = before.index[before["fold"] != fold]
    assert not np.allclose(after.loc[others, "predicted_age"], before.loc[others, "predicted_age"])


def test_bias_correction_against_polyfit(planted):
    """Each fold's line is numpy's least-squares fit of the training scans' inner out-of-fold predictions on
    age, and the held-out scans' corrected ages are (predicted - b0) / b1."""
    result, _ = planted
    table = result.table
    age = table["age"].to_numpy()
    for model in result.fits[ALL].models:
        slope, intercept = np.polyfit(age[model.trained], model.inner_predicted, 1)
        assert (model.intercept, model.slope) == pytest.approx((intercept, slope))
        assert 0.5 < slope < 1  # regression to the mean
        held_out = table["fold"] == model.fold
        np.testing.assert_allclose(
            table.loc[held_out, "predicted_age_corrected"], (table.loc[held_out, "predicted_age"] - intercept) / slope
        )
    # out of fold, the corrected ages no longer regress to the mean; the raw ones do
    raw, corrected = (np.polyfit(age, table[column], 1)[0] for column in ("predicted_age", "predicted_age_corrected"))
    assert raw < 0.97 and abs(corrected - 1) < abs(raw - 1), (raw, corrected)


def test_age_bias_and_correction():
    age = np.array([20.0, 40.0, 60.0, 80.0])
    predicted = 10 + 0.8 * age
    assert age_bias(age, predicted) == pytest.approx((10.0, 0.8))
    np.testing.assert_allclose(corrected_age(predicted, 10.0, 0.8), age)
    assert np.isnan(corrected_age(predicted, 10.0, 0.0)).all()


def test_patients_stay_together_and_only_chosen_scans_train():
    """A patient's scans share a fold; models train on the chosen scan of each patient; the other scans are
    predicted by the fold that held the patient out."""
    measurements, _ = synthetic_cohort(n=150, structures=30, seed=5, repeats_share=0.3)
    selection = selection_of(measurements)
    result = ct_age(measurements, selection, CtAgeSettings(groups=("organ",), min_scans=30))
    table = result.table.merge(selection[["subject", "chosen"]], on="subject")
    assert (table.groupby("patient")["fold"].nunique() == 1).all()
    assert (table["trained"] == table["chosen"]).all()
    assert (~table["chosen"]).sum() > 20 and np.isfinite(table["predicted_age"]).all()
    for model in result.fits[ALL].models:
        assert table["chosen"].to_numpy()[model.trained].all()
    assert np.isfinite(table["organ_age"]).all()
    assert list(result.summary["features"]) == [ALL, "organ"]
    assert (result.summary["n_scans"] == len(set(table["patient"]))).all()


def test_table_columns_and_notes():
    """Scans without an age are predicted (no gap); a scan with too few measures is not; a small cohort gets
    no numbers at all, and says why."""
    measurements, _ = synthetic_cohort(n=80, structures=20, seed=7)
    subjects = measurements["subject"].unique()
    measurements.loc[measurements["subject"] == subjects[0], "age"] = np.nan
    measurements.loc[measurements["subject"] == subjects[1], ["volume_ml", "hu_mean"]] = np.nan
    # a structure never measured and one always the same: no information, and no failure
    structures = measurements["structure"].unique()
    measurements.loc[measurements["structure"] == structures[3], ["volume_ml", "hu_mean"]] = np.nan
    measurements.loc[measurements["structure"] == structures[4], "hu_mean"] = 40.0
    combined = measurements[measurements["subject"] == subjects[2]].head(1).assign(structure="kidneys", label=np.nan)
    measurements = pd.concat([measurements, combined], ignore_index=True)
    result = ct_age(
        measurements,
        selection_of(measurements),
        CtAgeSettings(groups=("bone",), min_scans=30, models=("gradient_boosting",)),
    )
    table = result.table.set_index("subject")
    assert list(result.table.columns) == table_columns(("bone",))
    assert table.at[subjects[0], "note"] == "no_age" and np.isfinite(table.at[subjects[0], "predicted_age"])
    assert np.isnan(table.at[subjects[0], "age_gap_corrected"])
    assert table.at[subjects[1], "note"] == "too_few_measures" and np.isnan(table.at[subjects[1], "predicted_age"])
    small = ct_age(measurements, selection_of(measurements), CtAgeSettings(groups=(), min_scans=100))
    assert (small.table["note"] == "too_few_scans").all() and small.table["predicted_age"].isna().all()
    assert small.summary.at[0, "note"] == "too_few_scans"


def test_feature_matrix_leaves_combined_structures_out_and_logs_volumes():
    measurements = pd.DataFrame(
        {
            "subject": ["a", "a", "b", "b", "a"],
            "structure": ["liver", "spleen", "liver", "spleen", "organs"],
            "label": [5, 1, 5, 1, np.nan],
            "volume_ml": [np.e, 1.0, np.nan, 0.0, 9.0],
            "hu_mean": [50, 40, 51, 41, 45],
        }
    )
    features = feature_matrix(measurements, ["volume_ml", "hu_mean"], ["b", "a"])
    assert list(features.index) == ["b", "a"]
    assert set(features.columns) == {"liver:volume_ml", "spleen:volume_ml", "liver:hu_mean", "spleen:hu_mean"}
    assert features.at["a", "liver:volume_ml"] == pytest.approx(1.0)
    assert np.isnan(features.at["b", "spleen:volume_ml"]) and np.isnan(features.at["b", "liver:volume_ml"])
    never = feature_matrix(measurements.assign(hu_mean=np.nan), ["volume_ml", "hu_mean"], ["a", "b"])
    assert list(never.columns) == ["liver:volume_ml", "spleen:volume_ml"]


def test_settings_from_config_and_checks():
    assert CtAgeSettings.from_config({}) == CtAgeSettings()
    assert CtAgeSettings.from_config({"models": ["ridge"], "folds": 4}).models == ("ridge",)
    for bad in ({"models": ["forest"]}, {"folds": 1}, {"min_scans": 5}, {"min_measured": 0}, {"foldz": 3}):
        with pytest.raises(ValueError):
            CtAgeSettings.from_config(bad)


def test_shipped_config_states_the_defaults():
    """config/config.yaml's ct_age section (explicit, as the schema requires) equals CtAgeSettings' defaults."""
    section = yaml.safe_load((REPO / "config" / "config.yaml").read_text())["ct_age"]
    assert CtAgeSettings.from_config(section) == CtAgeSettings()
    assert set(section) == set(CtAgeSettings.__dataclass_fields__)


def test_figure_and_methods_sentence(planted, tmp_path):
    from ctcohort.ct_age_figure import gap_columns, plot_ct_age
    from ctcohort.methods import _ct_age_sentence

    result, _ = planted
    outputs = [tmp_path / "ct_age.png", tmp_path / "ct_age.svg"]
    plot_ct_age(result.table, result.summary, outputs)
    assert all(path.stat().st_size > 1000 for path in outputs)
    assert gap_columns(pd.DataFrame(columns=table_columns())) == [
        (ALL, "age_gap_corrected"),
        *((g, f"{g}_age_gap_corrected") for g in ("organ", "bone", "muscle", "vessel")),
    ]
    measurements, _ = synthetic_cohort(n=20, structures=5)
    small = ct_age(measurements, selection_of(measurements), CtAgeSettings(groups=()))
    plot_ct_age(small.table, small.summary, [tmp_path / "empty.svg"])  # says why, draws nothing
    sentence = _ct_age_sentence(CtAgeSettings().__dict__, result.summary)
    row = result.summary.iloc[0]
    assert "5 outer folds by patient" in sentence and "ridge regression and gradient-boosted trees" in sentence
    assert f"In 500 patients the out-of-fold mean absolute error was {row['mae']:.1f} years" in sentence
    assert "de Lange & Cole 2020" in sentence
    assert "No model was fitted" in _ct_age_sentence(CtAgeSettings().__dict__, small.summary)
