"""The contrast covariate resolved from the sheet and the phase estimate (statistics.contrast), its per-scan record
and count in Methods, and the phase as a categorical covariate (statistics.phase_covariate). The flag on real
measurements of planted copies of the example CT: tests/test_contrast_phase.py."""

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from ctcohort import aggregate, contrast_phase, methods
from ctcohort.measure import write_measurements
from ctcohort.models import statistics_table
from ctcohort.qc import apply_plausibility
from ctcohort.stats import StatisticsSettings
from ctcohort.tables import MEASUREMENT_DIGITS, write_tsv

# subject: (the sheet's contrast, NaN blank; the estimated phase; its probability)
SCANS = {
    "a": (1, "portal_venous", 1.0),
    "b": (0, "native", 1.0),
    "c": (np.nan, "arterial_late", 1.0),  # blank: estimated 1
    "d": (np.nan, "native", 0.7),  # blank: estimated 0
    "e": (1, "native", 1.0),  # a certain contradiction
    "f": (0, "arterial_early", 0.7),  # a contradiction, but near a cut-off: not flagged
    "g": (np.nan, contrast_phase.NOT_AVAILABLE, np.nan),  # neither
    "h": (1, contrast_phase.NOT_AVAILABLE, np.nan),
}


def _sheet_and_phases(scans: dict) -> tuple[pd.DataFrame, pd.DataFrame]:
    sheet = pd.DataFrame({"subject": list(scans), "contrast": [c for c, _, _ in scans.values()]})
    phases = pd.DataFrame(
        {
            "subject": list(scans),
            "phase": [p for _, p, _ in scans.values()],
            "probability": [q for *_, q in scans.values()],
        }
    )
    return sheet, phases


@pytest.mark.parametrize(
    "source, contrast, sources",
    [
        ("sheet", [1, 0, None, None, 1, 0, None, 1], "ssnnssns"),
        ("estimated", [1, 0, 1, 0, 0, 1, None, None], "eeeeeenn"),
        ("sheet_else_estimated", [1, 0, 1, 0, 1, 0, None, 1], "sseessns"),
    ],
)
def test_each_contrast_source_gives_the_expected_covariate(source, contrast, sources):
    resolved = contrast_phase.resolve_contrast(*_sheet_and_phases(SCANS), source)
    assert resolved["contrast"].tolist() == pytest.approx([np.nan if c is None else c for c in contrast], nan_ok=True)
    words = {"s": "sheet", "e": "estimated", "n": "none"}
    assert resolved["contrast_source"].tolist() == [words[letter] for letter in sources]
    # the check does not depend on the source: only e, whose estimate is certain
    assert resolved.loc[resolved["contrast_disagrees"], "subject"].tolist() == ["e"]
    assert resolved["phase"].isna().tolist() == [False] * 6 + [True] * 2


def test_unknown_source_is_refused():
    with pytest.raises(ValueError, match="sheet_else_estimated"):
        StatisticsSettings(contrast="image")


def test_without_an_estimate_the_sheet_is_left_as_it_is():
    """The demo's case (byte-identical tables): no estimate, so no phase column, no QC record, the sheet's contrast
    column untouched, and none added; unless statistics.contrast asks for the estimate alone."""
    sheet = pd.DataFrame({"subject": ["a", "b"], "age": [50, 60], "contrast": [1, 0]})
    phases = pd.DataFrame({"subject": ["a", "b"], "phase": contrast_phase.NOT_AVAILABLE, "probability": np.nan})
    kept, record = contrast_phase.resolved_sheet(sheet, phases)
    assert record is None and kept.columns.tolist() == sheet.columns.tolist()
    assert kept["contrast"].dtype == sheet["contrast"].dtype
    no_column = sheet.drop(columns="contrast")
    assert contrast_phase.resolved_sheet(no_column, phases)[0].columns.tolist() == ["subject", "age"]
    assert contrast_phase.resolved_sheet(sheet, phases, "estimated")[0]["contrast"].isna().all()


def _cohort(n: int, blank: int, tmp_path) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """A sheet of n scans (contrast blank for the last ``blank``), their phase estimates, per-scan tables."""
    rng = np.random.default_rng(7)
    age = rng.uniform(20, 90, n)
    enhanced = rng.random(n) < 0.5
    subjects = [f"s{i:02d}" for i in range(n)]
    contrast = np.where(enhanced, 1.0, 0.0)
    contrast[n - blank :] = np.nan
    sheet = pd.DataFrame({"subject": subjects, "age": age, "sex": np.where(np.arange(n) % 2, "M", "F")})
    sheet["contrast"] = contrast
    phases = pd.DataFrame(
        {"subject": subjects, "phase": np.where(enhanced, "portal_venous", "native"), "probability": 1.0}
    )
    phases.loc[0, "phase"] = "native" if enhanced[0] else "portal_venous"  # one certain contradiction
    paths = {}
    for subject, years, plus in zip(subjects, age, enhanced):
        paths[subject] = tmp_path / f"{subject}.tsv"
        hu = 60 - 0.3 * years + 40 * plus + rng.normal(0, 3)
        row = dict(structure="liver", label=5, group="organ", n_voxels=1000, volume_ml=1500 + 5 * years, hu_mean=hu)
        write_measurements(pd.DataFrame([row | dict(complete=True, exclusion_reason="")]), paths[subject])
    return sheet, phases, paths


def test_blank_contrast_is_estimated_counted_in_the_adjusted_n_and_in_methods(tmp_path):
    """With the default source the 6 scans whose sheet is blank stay in the adjusted analysis (n 30, against 24
    from the sheet alone); qc.tsv records where each value came from, and Methods counts them."""
    sheet, phases, paths = _cohort(30, 6, tmp_path)
    n_adjusted = {}
    for source in ("sheet", "sheet_else_estimated"):
        resolved = contrast_phase.resolve_contrast(sheet, phases, source)
        measured = aggregate.cohort_measurements(contrast_phase.with_resolved_contrast(sheet, resolved), paths, set())
        settings = StatisticsSettings(contrast=source, measures=("hu_mean",), min_n=10)
        table = statistics_table("age_correlations", measured, settings)
        n_adjusted[source] = int(table["n_partial"].iloc[0])
        assert table["covariates"].iloc[0] == "sex,contrast"
    assert n_adjusted == {"sheet": 24, "sheet_else_estimated": 30}

    qc = aggregate.cohort_qc(measured, apply_plausibility(measured, None, None), {}, contrast=resolved)
    write_tsv(qc, tmp_path / "qc.tsv", MEASUREMENT_DIGITS)
    record = aggregate.read_contrast_record(tmp_path / "qc.tsv")
    assert contrast_phase.contrast_counts(record) == {"sheet": 24, "estimated": 6, "none": 0, "disagrees": 1}
    config = {"statistics": {"contrast": "sheet_else_estimated"}}
    sentence = methods._contrast_sentence(config, record)
    assert "24 from the sheet and 6 estimated" in sentence and "in 1 scan, flagged for review" in sentence
    assert "where it was blank" in sentence


def test_qc_without_an_estimate_has_no_contrast_columns(tmp_path):
    sheet, _, paths = _cohort(12, 0, tmp_path)
    measured = aggregate.cohort_measurements(sheet, paths, set())
    qc = aggregate.cohort_qc(measured, apply_plausibility(measured, None, None), {})
    write_tsv(qc, tmp_path / "qc.tsv", MEASUREMENT_DIGITS)
    assert aggregate.read_contrast_record(tmp_path / "qc.tsv") is None
    assert methods._contrast_sentence({"statistics": {}}, None) == ""


def _precision_partial(x: np.ndarray, y: np.ndarray, covariates: np.ndarray) -> float:
    """Partial correlation of x and y given the covariates from the inverse covariance matrix (-P12 / sqrt(P11
    P22)), not from residuals: the reference for the residual regression of stats.partial_spearman."""
    precision = np.linalg.inv(np.cov(np.column_stack([x, y, covariates]), rowvar=False))
    return float(-precision[0, 1] / np.sqrt(precision[0, 0] * precision[1, 1]))


def test_phase_covariate_adjusts_for_the_phase_as_a_category():
    """Older scans more often portal venous than arterial; the HU differs between the enhanced phases and not with
    age. Adjusted for the phase (three indicators) the rs equals the inverse-covariance partial correlation of the
    ranks and is near 0; adjusted for 0/1 contrast it is not."""
    rng = np.random.default_rng(3)
    n = 60
    age = rng.uniform(20, 90, n)
    phase = np.where(
        rng.random(n) < 0.3, "native", np.where(rng.random(n) < (age - 20) / 70, "portal_venous", "arterial_late")
    )
    hu = 50 + np.select([phase == "arterial_late", phase == "portal_venous"], [30.0, 90.0], 0.0) + rng.normal(0, 5, n)
    measurements = pd.DataFrame(
        {
            "subject": [f"s{i}" for i in range(n)],
            "age": age,
            "contrast": (phase != "native").astype(float),
            "phase": phase,
            "structure": "liver",
            "group": "organ",
            "label": 5,
            "hu_mean": hu,
        }
    )
    by_phase = StatisticsSettings(measures=("hu_mean",), partial_covariates=("contrast",), phase_covariate=True)
    table = statistics_table("partial_correlations", measurements, by_phase)
    assert table.at[0, "covariates"] == "phase" and table.at[0, "k"] == 2  # indicators of the categories present
    dummies = pd.get_dummies(phase, drop_first=True).to_numpy(dtype=float)
    reference = _precision_partial(stats.rankdata(age), stats.rankdata(hu), dummies)
    assert table.at[0, "rs_partial"] == pytest.approx(reference, abs=1e-12)
    by_contrast = statistics_table(
        "partial_correlations",
        measurements,
        StatisticsSettings(measures=("hu_mean",), partial_covariates=("contrast",)),
    )
    assert by_contrast.at[0, "covariates"] == "contrast"
    assert abs(table.at[0, "rs_partial"]) < 0.25 < by_contrast.at[0, "rs_partial"]
