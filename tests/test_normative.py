"""Normative charts: percentiles against the analytic ones of a normal cohort, the quantile fits against a
linear program, the rearrangement, placement of a scan and its notes, the tables' round trip and the CLI."""

import logging
import os
import subprocess
import sys
import warnings

import numpy as np
import pandas as pd
import patsy
import pytest
from conftest import REPO
from scipy import stats
from scipy.optimize import linprog

from ctcohort import normative
from ctcohort.cli import main
from ctcohort.columns import MEASURE_COLUMNS
from ctcohort.tables import STATS_DIGITS, read_statistics, write_tsv

# the analytic cohort: volume_ml ~ Normal(A + B age + DELTA contrast, SD) per sex
A = {"M": 1500.0, "F": 1300.0}
B = {"M": -4.0, "F": -2.5}
SD = {"M": 120.0, "F": 90.0}
DELTA = 60.0
QUANTILE_CHARTS = normative.ChartSettings(method=normative.QUANTILE)  # the tests of quantile regression
LEVELS = (5, 25, 50, 75, 95)
COLUMNS = [f"p{p}" for p in LEVELS]


def analytic_cohort(n: int = 40000, seed: int = 7) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    sex = rng.choice(["M", "F"], n)
    age = rng.uniform(20, 85, n)
    contrast = rng.integers(0, 2, n).astype(float)
    mean = np.array([A[s] + B[s] * x for s, x in zip(sex, age)]) + DELTA * contrast
    sd = np.array([SD[s] for s in sex])
    return pd.DataFrame(
        {
            "subject": [f"s{i:05d}" for i in range(n)],
            "age": age,
            "sex": sex,
            "contrast": contrast,
            "structure": "liver",
            "group": "abdomen",
            "volume_ml": mean + sd * rng.standard_normal(n),
        }
    )


@pytest.fixture(scope="module")
def fitted():
    return normative.fit_charts(analytic_cohort(), ["liver"], ["volume_ml"], QUANTILE_CHARTS)


def at_age(charts: pd.DataFrame, sex: str, age: float) -> np.ndarray:
    """The chart's percentiles at ``age``, interpolated linearly between its rows."""
    chart = charts[charts["sex"] == sex]
    return np.array([np.interp(age, chart["age"], chart[c]) for c in COLUMNS])


def test_charts_match_the_analytic_percentiles(fitted):
    charts, coefficients, _ = fitted
    intervals = [f"{c}_{end}" for c in COLUMNS for end in ("low", "high")]
    assert list(charts.columns) == [
        "structure",
        "group",
        "members",
        "measure",
        "sex",
        "n",
        "age",
        *COLUMNS,
        "contrast",
        "note",
        *normative.METHOD_COLUMNS,
        *normative.CALIBRATION_COLUMNS,
        *intervals,
    ]
    named, effect = ["structure", "measure", "sex", "covariate"], ["eta_mu", "levels", "effect"]
    assert list(coefficients.columns) == [*named, *COLUMNS, *effect]
    assert (charts["note"] == "").all() and (charts["contrast"] == 0).all() and (charts["group"] == "abdomen").all()
    z = stats.norm.ppf(np.array(LEVELS) / 100)
    for sex in ("M", "F"):
        chart = charts[charts["sex"] == sex]
        # the grid: youngest to oldest scan of this sex in steps of 1 year, both ends included
        cohort = analytic_cohort()
        ages = cohort.loc[cohort["sex"] == sex, "age"]
        assert chart["age"].iloc[0] == ages.min() and chart["age"].iloc[-1] == ages.max()
        assert np.allclose(np.diff(chart["age"])[:-1], 1.0) and 0 < np.diff(chart["age"])[-1] <= 1.0
        assert (chart["n"] == len(ages)).all()
        for age in (30.0, 50.0, 70.0):
            expected = A[sex] + B[sex] * age + SD[sex] * z  # native (contrast 0) scans
            np.testing.assert_allclose(at_age(charts, sex, age), expected, atol=0.1 * SD[sex])
        shift = coefficients[(coefficients["sex"] == sex) & (coefficients["covariate"] == "contrast")]
        assert len(shift) == 1
        np.testing.assert_allclose(shift[COLUMNS].to_numpy()[0], DELTA, atol=0.1 * SD[sex])


def check_loss(residuals: np.ndarray, q: float) -> float:
    return float(np.sum(np.maximum(q * residuals, (q - 1) * residuals)))


@pytest.mark.parametrize("n", [25, 80])
def test_quantile_fits_reach_the_linear_programs_minimum(n):
    rng = np.random.default_rng(n)
    age = rng.uniform(20, 85, n)
    contrast = rng.integers(0, 2, n).astype(float)
    y = 50 + 0.4 * age + 5 * contrast + rng.standard_normal(n) * (3 + 0.1 * age)
    frame = pd.DataFrame({"y": y, "age": age, "c0": contrast})
    fits, converged = normative.quantile_fits(frame, LEVELS)
    assert converged
    design = np.asarray(patsy.dmatrix("cr(age, df=3, constraints='center') + c0", frame))
    k = design.shape[1]
    for p, fit in zip(LEVELS, fits):
        q = p / 100
        # min q 1'u + (1 - q) 1'v subject to X b + u - v = y, u, v >= 0, b free
        lp = linprog(
            np.concatenate([np.zeros(k), np.full(n, q), np.full(n, 1 - q)]),
            A_eq=np.hstack([design, np.eye(n), -np.eye(n)]),
            b_eq=y,
            bounds=[(None, None)] * k + [(0, None)] * (2 * n),
            method="highs",
        )
        assert lp.status == 0
        loss = check_loss(y - design @ np.asarray(fit.params), q)
        assert lp.fun <= loss + 1e-9 * lp.fun  # the LP is the minimum
        assert loss == pytest.approx(lp.fun, rel=1e-6)


def noisy_sample(n: int = 20, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame(
        {
            "age": rng.uniform(20, 80, n),
            "structure": "spleen",
            "group": "abdomen",
            "hu_mean": 100 + 10 * rng.standard_normal(n),
        }
    )


def test_rearranged_charts_do_not_cross_where_the_fits_do():
    sample = noisy_sample()
    settings = normative.ChartSettings(method=normative.QUANTILE, covariates=())
    charts, coefficients, _ = normative.fit_charts(sample, ["spleen"], ["hu_mean"], settings)
    assert (charts["note"] == "").all() and (charts["sex"] == "all").all() and coefficients.empty
    fits, converged = normative.quantile_fits(sample[["age"]].assign(y=sample["hu_mean"])[["y", "age"]])
    assert converged
    grid = pd.DataFrame({"age": charts["age"].to_numpy()})
    unsorted = np.column_stack([np.asarray(fit.predict(grid)) for fit in fits])
    assert (np.diff(unsorted, axis=1) < 0).any(axis=1).sum() >= 5  # the fitted curves cross at several ages
    values = charts[COLUMNS].to_numpy()
    assert (np.diff(values, axis=1) >= 0).all()
    # at every age the charted values are the fitted ones, reordered
    np.testing.assert_allclose(np.sort(values, axis=1), np.sort(unsorted, axis=1), rtol=1e-12)


def scan_table(**values) -> pd.DataFrame:
    return pd.DataFrame({"structure": list(values), "volume_ml": list(values.values())})


def placed(charts, coefficients, value, age=50.0, sex="F", structure="liver", **covariates):
    placement = normative.place_on_charts(
        charts, coefficients, scan_table(**{structure: value}), age, sex, covariates or {"contrast": 0}
    )
    assert list(placement.columns) == ["structure", "measure", "value", "age", "sex", "percentile", "z", "note"]
    return placement.iloc[0]


def test_a_scan_on_the_charts(fitted):
    charts, coefficients, _ = fitted
    row = charts[charts["sex"] == "F"].iloc[30]  # a charted age
    at_median = placed(charts, coefficients, row["p50"], age=row["age"])
    assert at_median["z"] == pytest.approx(0, abs=1e-12) and at_median["percentile"] == pytest.approx(50)
    assert at_median["note"] == "" and at_median["sex"] == "F" and at_median["age"] == row["age"]
    assert placed(charts, coefficients, row["p95"], age=row["age"])["percentile"] == pytest.approx(95)
    assert placed(charts, coefficients, row["p25"], age=row["age"])["percentile"] == pytest.approx(25)
    # a contrast scan: the curves shifted by the contrast coefficients
    shift = coefficients[coefficients["sex"] == "F"].iloc[0]
    assert placed(charts, coefficients, row["p50"] + shift["p50"], age=row["age"], contrast=1)["z"] == pytest.approx(0)
    # between the curves, at mean + 1 SD of the analytic cohort
    for sex, age, contrast in (("F", 40.0, 0), ("M", 62.5, 1), ("F", 75.0, 1)):
        value = A[sex] + B[sex] * age + DELTA * contrast + SD[sex]
        one_sd = placed(charts, coefficients, value, age=age, sex=sex, contrast=contrast)
        assert one_sd["z"] == pytest.approx(1, abs=0.1) and one_sd["note"] == ""
        assert one_sd["percentile"] == pytest.approx(100 * stats.norm.cdf(1), abs=3)


def test_a_combined_structure_is_made_from_the_scans_members():
    """Charts of a combined structure (kidneys = left + right) place a scan measured per side: its
    volume is the sum of the two sides (added here by hand), and a missing side leaves it unplaced."""
    rng = np.random.default_rng(3)
    n = 200
    age = rng.uniform(20, 80, n)
    cohort = pd.DataFrame(
        {
            "subject": [f"s{i}" for i in range(n)],
            "age": age,
            "sex": "F",
            "structure": "kidneys",
            "group": "organ",
            "volume_ml": 300 - age + rng.normal(0, 20, n),
        }
    )
    charts, coefficients, _ = normative.fit_charts(
        cohort,
        ["kidneys"],
        ["volume_ml"],
        normative.ChartSettings(method=normative.QUANTILE, covariates=[]),
        combined={"kidneys": ["kidney_left", "kidney_right"]},
    )
    assert set(charts["members"]) == {"kidney_left+kidney_right"}
    scan = pd.DataFrame(
        [
            ("kidney_left", 2, "organ", 1000, 120.0, 30.0, 30.0, 5.0, 31.0, True, ""),
            ("kidney_right", 3, "organ", 1100, 130.0, 32.0, 32.0, 5.0, 33.0, True, ""),
        ],
        columns=MEASURE_COLUMNS,
    )
    placement = normative.place_on_charts(charts, coefficients, scan, age=50, sex="F").set_index("structure")
    assert placement.at["kidneys", "value"] == 120.0 + 130.0
    assert placement.at["kidneys", "note"] == "" and np.isfinite(placement.at["kidneys", "z"])
    assert placement.at["kidney_left", "note"] == normative.NO_CHART
    one_side = scan.assign(volume_ml=[120.0, np.nan])
    placement = normative.place_on_charts(charts, coefficients, one_side, age=50, sex="F").set_index("structure")
    assert placement.at["kidneys", "note"] == normative.NO_VALUE and np.isnan(placement.at["kidneys", "z"])


def test_placement_notes(fitted):
    charts, coefficients, _ = fitted
    oldest = charts.loc[charts["sex"] == "M", "age"].max()
    outside = placed(charts, coefficients, 1200.0, age=oldest + 0.5, sex="M")
    assert outside["note"] == "age_outside_chart" and np.isnan(outside["z"]) and np.isnan(outside["percentile"])
    assert outside["value"] == 1200.0
    assert placed(charts, coefficients, 1200.0, age=oldest, sex="M")["note"] in ("", "below_chart", "above_chart")
    none = placed(charts, coefficients, 100.0, structure="spleen")
    assert none["note"] == "no_chart" and np.isnan(none["z"])
    missing = normative.place_on_charts(charts, coefficients, scan_table(liver=1200.0), 50, "F")
    assert missing["note"].tolist() == ["covariate_missing"] and missing["z"].isna().all()
    no_value = placed(charts, coefficients, np.nan)
    assert no_value["note"] == "no_value" and np.isnan(no_value["percentile"])
    low = placed(charts, coefficients, 900.0)  # F at 50: mean 1175, SD 90
    high = placed(charts, coefficients, 1500.0)
    assert low["note"] == "below_chart" and low["z"] < stats.norm.ppf(0.05)
    assert high["note"] == "above_chart" and high["z"] > stats.norm.ppf(0.95)
    assert 0 < low["percentile"] < 5 and 95 < high["percentile"] < 100
    with pytest.raises(ValueError, match="sex must be M or F"):
        normative.place_on_charts(charts, coefficients, scan_table(liver=1.0), 50, None, {"contrast": 0})
    with pytest.raises(ValueError, match="no covariate kvp"):
        normative.place_on_charts(charts, coefficients, scan_table(liver=1.0), 50, "F", {"kvp": 120})
    with pytest.raises(ValueError, match="age must be a number"):
        normative.place_on_charts(charts, coefficients, scan_table(liver=1.0), "old", "F")


def test_a_covariate_constant_in_the_chart():
    cohort = analytic_cohort(1200).assign(contrast=1.0)
    charts, coefficients, _ = normative.fit_charts(cohort, ["liver"], ["volume_ml"], QUANTILE_CHARTS)
    assert coefficients.empty and (charts["contrast"] == 1.0).all() and (charts["note"] == "").all()
    value = A["M"] + B["M"] * 50 + DELTA
    assert placed(charts, coefficients, value, sex="M", contrast=0)["note"] == "covariate_outside_chart"
    assert np.isnan(placed(charts, coefficients, value, sex="M", contrast=0)["z"])
    at_one = placed(charts, coefficients, value, sex="M", contrast=1)
    assert at_one["note"] == "" and at_one["z"] == pytest.approx(0, abs=0.15)
    # a covariate outside the model is not needed
    alone = normative.place_on_charts(charts, coefficients, scan_table(liver=value), 50, "M")
    assert alone["note"].tolist() == [""]


def test_normal_score_by_hand():
    z = stats.norm.ppf(np.array(LEVELS) / 100)
    curves = [1.0, 2.0, 3.0, 4.0, 6.0]
    assert normative.normal_score(2.5, curves, LEVELS) == (pytest.approx((z[1] + z[2]) / 2), "")
    assert normative.normal_score(5.0, curves, LEVELS) == (pytest.approx((z[3] + z[4]) / 2), "")
    # beyond the curves: along the line through the outer and the central (50th) curve
    assert normative.normal_score(8.0, curves, LEVELS) == (pytest.approx(z[4] + 2 * (z[4] - z[2]) / 3), "above_chart")
    assert normative.normal_score(0.0, curves, LEVELS) == (pytest.approx(z[0] - (z[2] - z[0]) / 2), "below_chart")
    # which is exact for a normal distribution's curves, and bounded where the outer curves nearly collapse
    normal = 50 + 10 * z
    assert normative.normal_score(50 + 10 * 3.3, normal, LEVELS)[0] == pytest.approx(3.3)
    collapsed = [80.0, 85.0, 86.9999993, 86.99999998, 87.0]  # 30 scans, aorta, women, age 18 (issue 18)
    assert normative.normal_score(88.0, collapsed, LEVELS) == (normative.Z_LIMIT, "above_chart")
    flat_end = [80.0, 85.0, 86.0, 86.99999998, 87.0]  # only the outermost segment flat: the old line's z 6e6
    assert normative.normal_score(87.1, flat_end, LEVELS)[0] == pytest.approx(z[4] + 0.1 * z[4] / 1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no division by zero
        tied = [1.0, 2.0, 2.0, 3.0, 4.0]
        assert normative.normal_score(2.0, tied, LEVELS)[0] == pytest.approx((z[1] + z[2]) / 2)
        assert normative.normal_score(2.5, tied, LEVELS)[0] == pytest.approx((z[2] + z[3]) / 2)
        low_tie = [1.0, 1.0, 2.0, 3.0, 4.0]
        assert normative.normal_score(0.0, low_tie, LEVELS) == (pytest.approx(z[0] - (z[2] - z[0])), "below_chart")
        low_flat = [2.0, 2.0, 2.0, 3.0, 4.0]  # the outer and the central curve equal: no line
        assert np.isnan(normative.normal_score(1.0, low_flat, LEVELS)[0])
        flat = [2.0] * 5
        assert normative.normal_score(2.0, flat, LEVELS) == (pytest.approx(0), "")
        z_flat, note = normative.normal_score(1.0, flat, LEVELS)
        assert np.isnan(z_flat) and note == "below_chart"


def test_charts_that_are_not_fitted(caplog, monkeypatch):
    sample = noisy_sample(40)
    sample["sex"] = ["M"] * 10 + ["F"] * 25 + [np.nan] * 5
    sample["volume_ml"] = 5.0
    with caplog.at_level(logging.WARNING, logger="ctcohort.normative"):
        charts, coefficients, _ = normative.fit_charts(
            sample, ["spleen", "kidney"], ["hu_mean", "volume_ml"], QUANTILE_CHARTS
        )
    assert "contrast" in caplog.text  # not in the table: left out, with a warning
    assert coefficients.empty and charts["contrast"].isna().all()
    keys = charts.set_index(["structure", "measure", "sex"])
    assert keys.loc[("spleen", "hu_mean", "M"), "note"] == "too_few_scans"
    assert keys.loc[("spleen", "hu_mean", "M"), "n"] == 10
    assert keys.loc[("spleen", "volume_ml", "F"), "note"] == "constant"
    assert (keys.loc[("spleen", "hu_mean", "F"), "note"] == "").all()
    assert (keys.loc[("spleen", "hu_mean", "F"), "n"] == 25).all()  # the scans without a sex are in no chart
    assert keys.loc[("kidney", "hu_mean", "F"), "n"] == 0
    assert keys.loc[("kidney", "hu_mean", "F"), "note"] == "not_in_study" and "kidney" in caplog.text
    unfitted = charts[charts["note"] != ""]
    assert len(unfitted) == 7 and unfitted[["age", *COLUMNS]].isna().all().all()
    # without a sex column: one chart over every scan
    charts, coefficients, _ = normative.fit_charts(
        sample.drop(columns="sex"),
        ["spleen"],
        ["hu_mean"],
        normative.ChartSettings(method=normative.QUANTILE, covariates=()),
    )
    assert (charts["sex"] == "all").all() and (charts["n"] == 40).all() and (charts["note"] == "").all()
    placement = normative.place_on_charts(
        charts, coefficients, pd.DataFrame({"structure": ["spleen"], "hu_mean": [100.0]}), 50, "F"
    )
    assert placement["sex"].tolist() == ["all"] and placement["note"].tolist() == [""]
    # a fit whose optimality cannot be shown (here: no duality gap is small enough) is no chart
    monkeypatch.setattr(normative, "DUALITY_GAP", -1.0)
    settings = normative.ChartSettings(method=normative.QUANTILE, by_sex=False, covariates=())
    charts, _, _ = normative.fit_charts(sample, ["spleen"], ["hu_mean"], settings)
    assert charts["note"].tolist() == ["not_converged"] and charts["age"].isna().all()


R_QUANTREG = """
data <- read.csv(commandArgs(TRUE)[1])
design <- as.matrix(data[, grepl("^x", names(data))])
for (q in c(0.05, 0.25, 0.5, 0.75, 0.95)) {
  fit <- quantreg::rq(data$y ~ design - 1, tau = q, method = "br")
  r <- data$y - design %*% coef(fit)
  cat(sprintf("%.17g %.17g\\n", q, sum(pmax(q * r, (q - 1) * r))))
}
"""


@pytest.mark.parametrize("n", [40, 300])
def test_quantile_fits_reach_r_quantregs_minimum(n, tmp_path):
    """The exact fits' check loss equals that of R's quantreg (Barrodale-Roberts simplex) on the same design,
    where the statsmodels fits they replace stopped above it (the 25th percentile of 40 scans: n q = 10)."""
    import shutil

    if (
        not shutil.which("Rscript")
        or subprocess.run(["Rscript", "-e", "library(quantreg)"], capture_output=True).returncode
    ):
        reason = "R with quantreg is not installed (Debian: r-base-core r-cran-quantreg)"
        if os.environ.get("CI"):
            pytest.fail(reason + "; CI is set, where the R checks must run")
        pytest.skip(reason)
    sample = noisy_sample(n, seed=n)
    frame = pd.DataFrame({"y": sample["hu_mean"] + 0.3 * sample["age"], "age": sample["age"]})
    fits, solved = normative.quantile_fits(frame)
    assert solved
    design = np.asarray(patsy.dmatrix("cr(age, df=3, constraints='center')", frame))
    table = pd.DataFrame(design, columns=[f"x{i}" for i in range(design.shape[1])]).assign(y=frame["y"])
    table.to_csv(tmp_path / "data.csv", index=False)
    (tmp_path / "fit.R").write_text(R_QUANTREG)
    output = subprocess.run(
        ["Rscript", str(tmp_path / "fit.R"), str(tmp_path / "data.csv")], capture_output=True, text=True, check=True
    ).stdout.split()
    r_loss = dict(zip(map(float, output[::2]), map(float, output[1::2])))
    for p, fit in zip(LEVELS, fits):
        ours = check_loss(frame["y"].to_numpy() - design @ fit.params.to_numpy(), p / 100)
        assert ours == pytest.approx(r_loss[p / 100], rel=1e-9), p


def test_bad_arguments():
    sample = noisy_sample().assign(scanner="a")
    with pytest.raises(ValueError, match="'scanner': a random site intercept needs method lms"):
        normative.ChartSettings(method=normative.QUANTILE, site="scanner")
    for bad in ((5, 5, 50), (0, 50), (50, 100), (50, 25)):
        with pytest.raises(ValueError, match="percentiles"):
            normative.ChartSettings(method=normative.QUANTILE, percentiles=bad)
    with pytest.raises(ValueError, match="min_n"):
        normative.ChartSettings(method=normative.QUANTILE, min_n=4)
    with pytest.raises(ValueError, match="spline_df"):
        normative.ChartSettings(method=normative.QUANTILE, spline_df=1)
    with pytest.raises(ValueError, match="volume_ml"):
        normative.fit_charts(sample, ["spleen"], ["volume_ml"], QUANTILE_CHARTS)


def test_tables_round_trip(fitted, tmp_path):
    charts, coefficients, _ = fitted
    sample = noisy_sample(12)  # one row not fitted: a note and NaNs
    small, _, _ = normative.fit_charts(sample.assign(group=""), ["spleen"], ["hu_mean"], QUANTILE_CHARTS)
    charts = pd.concat([charts, small], ignore_index=True)
    write_tsv(charts, tmp_path / "charts.tsv", STATS_DIGITS)
    write_tsv(coefficients, tmp_path / "covariates.tsv", STATS_DIGITS)
    read = read_statistics(tmp_path / "charts.tsv")
    assert list(read.columns) == list(charts.columns)
    assert read["note"].tolist() == charts["note"].tolist() and read["group"].tolist() == charts["group"].tolist()
    pd.testing.assert_frame_equal(read, charts, check_dtype=False, rtol=1e-5)
    pd.testing.assert_frame_equal(read_statistics(tmp_path / "covariates.tsv"), coefficients, rtol=1e-5)
    assert normative.chart_layout(read) == (tuple(map(float, LEVELS)), ["contrast"])


def chart_options(fitted, folder) -> list[str]:
    """The fitted charts and coefficients written to ``folder`` as the command reads them, and its options naming
    them."""
    charts, coefficients, _ = fitted
    write_tsv(charts, folder / "charts.tsv", STATS_DIGITS)
    write_tsv(coefficients, folder / "covariates.tsv", STATS_DIGITS)
    return ["--charts", str(folder / "charts.tsv"), "--coefficients", str(folder / "covariates.tsv")]


def test_zscore_command(fitted, tmp_path, capsys):
    chart_args = chart_options(fitted, tmp_path)
    age = 50.0
    value = A["F"] + B["F"] * age + DELTA + SD["F"]
    scan = pd.DataFrame({"structure": ["liver", "spleen"], "volume_ml": [value, 200.0], "hu_mean": [60.0, np.nan]})
    scan.to_csv(tmp_path / "scan.tsv", sep="\t", index=False, na_rep="NaN")
    common = ["zscore", *chart_args, "--measurements", str(tmp_path / "scan.tsv"), "--sex", "F"]
    out = tmp_path / "z.tsv"
    assert main([*common, "--age", "50", "--covariate", "contrast=1", "--out", str(out)]) == 0
    assert "placed 1 of 2" in capsys.readouterr().out
    placement = read_statistics(out)
    assert placement["note"].tolist() == ["", "no_chart"]
    assert placement.loc[0, "z"] == pytest.approx(1, abs=0.1) and placement.loc[0, "sex"] == "F"
    assert out.read_text().splitlines()[2].split("\t")[-3:] == ["NaN", "NaN", "no_chart"]
    assert main([*common, "--age", "fifty", "--covariate", "contrast=1", "--out", str(out)]) == 1
    assert "--age must be a number" in capsys.readouterr().err
    assert main([*common, "--age", "50", "--covariate", "contrast", "--out", str(out)]) == 1
    assert "NAME=VALUE" in capsys.readouterr().err
    common[common.index("--measurements") + 1] = str(tmp_path / "absent.tsv")
    assert main([*common, "--age", "50", "--out", str(out)]) == 1
    assert "--measurements: no such file" in capsys.readouterr().err

    # as a module, the table on standard output
    def zscore_as_module(*sex):
        arguments = [*chart_args, "--measurements", str(tmp_path / "scan.tsv"), *sex, "--age", "50"]
        command = [sys.executable, "-m", "ctcohort", "zscore", *arguments, "--covariate", "contrast=1"]
        return subprocess.run(command, capture_output=True, text=True, cwd=REPO)

    run = zscore_as_module()
    assert run.returncode == 1 and "sex must be M or F" in run.stderr  # --sex left off
    run = zscore_as_module("--sex", "F")
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines()[0].split("\t") == normative.PLACEMENT_COLUMNS and "placed 1 of 2" in run.stderr


def test_a_cohort_of_new_healthy_scans_placed_in_one_call(fitted, tmp_path, capsys):
    """2,000 new scans drawn from the analytic truth, as a cohort table (measurements.tsv's format: subject, age,
    sex, contrast as columns): one `ctcohort zscore` call places all; their z is the analytic one, about 5% lie
    beyond |z| 1.96, none beyond 6; each equals the scan placed alone."""
    charts, coefficients, _ = fitted
    chart_args = chart_options(fitted, tmp_path)
    new = analytic_cohort(2000, seed=99)
    new = new[(new["age"] >= 21) & (new["age"] <= 84)]  # inside every chart's ages
    new["subject"] = [f"0{i:04d}" for i in range(len(new))]  # ids as text: "00001" is not 1
    new.to_csv(tmp_path / "cohort.tsv", sep="\t", index=False)
    out = tmp_path / "scores.tsv"
    assert main(["zscore", *chart_args, "--measurements", str(tmp_path / "cohort.tsv"), "--out", str(out)]) == 0
    assert f"on the charts, {len(new)} scans" in capsys.readouterr().out
    scores = pd.read_csv(out, sep="\t", dtype={"subject": str}, keep_default_na=False, na_values=["NaN"])
    assert scores["subject"].tolist() == new["subject"].tolist()
    assert scores["note"].isin(["", "below_chart", "above_chart"]).all()
    truth = np.array(
        [
            (v - A[s] - B[s] * a - DELTA * c) / SD[s]
            for v, s, a, c in new[["volume_ml", "sex", "age", "contrast"]].itertuples(index=False)
        ]
    )
    # piecewise linear in normal-score space between five fitted curves: close to the truth, not equal
    assert np.abs(scores["z"] - truth).mean() < 0.05 and np.abs(scores["z"] - truth).max() < 0.3
    beyond = (scores["z"].abs() > 1.96).mean()
    assert 0.035 <= beyond <= 0.075 and scores["z"].abs().max() < 6
    first = new.iloc[0]
    alone = normative.place_on_charts(
        charts,
        coefficients,
        scan_table(liver=first["volume_ml"]),
        first["age"],
        first["sex"],
        {"contrast": first["contrast"]},
    )
    assert scores.loc[0, "z"] == pytest.approx(
        alone.loc[0, "z"], abs=1e-4
    )  # the CLI reads the charts as written, to 6 digits


def test_the_reference_is_the_selected_scans_less_what_the_qc_flags():
    measurements = pd.DataFrame(
        {
            "subject": ["a", "a", "b", "b", "c", "c"],
            "structure": ["kidney_left", "liver"] * 3,
            "healthy": [1, 1, 1, 1, 0, 0],
        }
    )
    qc = pd.DataFrame(
        {
            "subject": ["a", "a", "b", "b", "c", "c"],
            "structure": ["kidney_left", "liver"] * 3,
            "laterality": [True, False, True, False, False, False],
            "vertebra_order": False,
            "fragments": False,
            "volume_outlier": False,
            "orientation": [False, False, False, False, True, True],
            "review": ["", "", "accept", "", "", ""],
        }
    )
    keys = lambda frame: list(zip(frame["subject"], frame["structure"]))  # noqa: E731
    # a's flagged kidney is left out (and the kidneys it is a member of), b's was accepted by a reviewer, c's
    # orientation is in doubt: the whole scan
    every = normative.reference_scans(measurements, "", qc, {"kidneys": ["kidney_left", "kidney_right"]})
    assert keys(every) == [("a", "liver"), ("b", "kidney_left"), ("b", "liver")]
    with_kidneys = pd.concat([measurements, pd.DataFrame({"subject": ["a"], "structure": ["kidneys"], "healthy": [1]})])
    assert ("a", "kidneys") not in keys(normative.reference_scans(with_kidneys, "", qc, {"kidneys": ["kidney_left"]}))
    qc["orientation"] = False
    assert keys(normative.reference_scans(measurements, "healthy == 1", qc)) == [
        ("a", "liver"),
        ("b", "kidney_left"),
        ("b", "liver"),
    ]
    assert len(normative.reference_scans(measurements, "healthy == 0")) == 2
    with pytest.raises(ValueError, match="normative.reference 'helthy == 1': UndefinedVariableError"):
        normative.reference_scans(measurements, "helthy == 1")


@pytest.fixture(scope="module")
def lms_fitted():
    cohort = analytic_cohort(800, seed=21)  # about 400 scans per sex
    return cohort, normative.fit_charts(cohort, ["liver"], ["volume_ml"], normative.ChartSettings(method="lms"))


def test_lms_charts_match_the_truth_and_place_new_scans_by_the_model(lms_fitted):
    cohort, fit = lms_fitted
    charts, coefficients = fit.charts, fit.coefficients
    assert (charts["note"] == "").all() and (charts["method"] == "lms").all()
    assert set(charts["family"]) <= {"normal", "bccg"} and not charts["calibration_failed"].any()
    z = stats.norm.ppf(np.array(LEVELS) / 100)
    for sex in ("M", "F"):
        for age in (30.0, 50.0, 70.0):
            expected = A[sex] + B[sex] * age + SD[sex] * z
            np.testing.assert_allclose(at_age(charts, sex, age), expected, atol=0.35 * SD[sex])
        chart = charts[charts["sex"] == sex]
        assert ((chart["p5_low"] <= chart["p5"]) & (chart["p5"] <= chart["p5_high"])).all()  # bootstrap bounds
    shift = coefficients.set_index(["sex", "covariate"])["eta_mu"]
    assert shift[("F", "contrast")] == pytest.approx(DELTA, abs=0.35 * SD["F"]) or charts["family"].eq("bccg").any()
    # new scans: z from the fitted distribution, bounded; contrast moves mu
    new = analytic_cohort(2000, seed=5)
    new = new[(new["age"] >= 22) & (new["age"] <= 83)].assign(subject=lambda f: [f"n{i}" for i in range(len(f))])
    placed = normative.place_cohort(charts, coefficients, new)
    truth = np.array(
        [
            (v - A[s] - B[s] * a - DELTA * c) / SD[s]
            for v, s, a, c in new[["volume_ml", "sex", "age", "contrast"]].itertuples(index=False)
        ]
    )
    assert np.abs(placed["z"] - truth).mean() < 0.2  # the curves' own error at 400 scans a sex: about 0.1 SD
    beyond = (placed["z"].abs() > 1.96).mean()
    assert 0.035 <= beyond <= 0.075 and placed["z"].abs().max() < 6
    # the out-of-fold z of the charted scans (the calibration): one per scan, each from a fit without it
    assert len(fit.scores) == len(cohort) and fit.scores["z"].notna().all()
    far = normative.place_on_charts(charts, coefficients, scan_table(liver=1e6), 50, "F", {"contrast": 0})
    assert far.loc[0, "z"] == normative.Z_LIMIT and far.loc[0, "note"] == "z_clipped"


@pytest.mark.parametrize("family", ["shash", "bct"])
def test_a_four_parameter_chart_stored_as_a_table_places_scans_as_its_model(family):
    from ctcohort import centiles

    cohort = analytic_cohort(300, seed=8)
    settings = centiles.CentileSettings(families=(family,), bootstrap_resamples=0, tail_min_scans=100)
    fit = normative.fit_charts(
        cohort, ["liver"], ["volume_ml"], normative.ChartSettings(method="lms", by_sex=False, centiles=settings)
    )
    charts, coefficients = fit.charts, fit.coefficients
    assert (charts["family"] == family).all() and charts["eta_tau"].notna().all()
    chart = centiles.fit_centile_chart(
        cohort["age"], cohort["volume_ml"], cohort[["contrast"]], settings, calibrated=False
    )
    new = analytic_cohort(50, seed=9).assign(subject=lambda f: [f"n{i}" for i in range(len(f))])
    new = new[(new["age"] >= cohort["age"].min() + 1) & (new["age"] <= cohort["age"].max() - 1)]
    placed = normative.place_cohort(charts, coefficients, new)
    expected, _ = chart.place(new["volume_ml"], new["age"], new[["contrast"]])
    # the table's linear predictors are interpolated between ages a year apart
    np.testing.assert_allclose(placed["z"], expected, atol=0.01)


def test_lms_charts_refuse_what_cannot_be_trusted():
    sample = noisy_sample(40).assign(group="")
    fit = normative.fit_charts(sample, ["spleen"], ["hu_mean"], normative.ChartSettings(method="lms", min_n=60))
    assert fit.charts["note"].tolist() == ["too_few_scans"]
    placement = normative.place_on_charts(
        fit.charts, fit.coefficients, pd.DataFrame({"structure": ["spleen"], "hu_mean": [100.0]}), 50, "F"
    )
    assert placement["note"].tolist() == ["no_chart"] and placement["z"].isna().all()


def test_an_lms_chart_with_an_undefined_centile_is_refused(monkeypatch):
    """A Box-Cox shape so strong that the 5th centile leaves the distribution's support (the demo's 15 women, once:
    nu = 14) gives NaN curves: the chart is refused, never drawn with holes."""
    from ctcohort import centiles

    real = centiles.CentileChart.curves

    def with_a_hole(self, *args, **kwargs):
        table = real(self, *args, **kwargs)
        table.loc[:, "p5"] = np.nan
        return table

    monkeypatch.setattr(centiles.CentileChart, "curves", with_a_hole)
    two_families = centiles.CentileSettings(families=(centiles.NORMAL, centiles.BCCG))  # the refusal, not the choice
    fit = normative.fit_charts(
        analytic_cohort(300, seed=3),
        ["liver"],
        ["volume_ml"],
        normative.ChartSettings(method="lms", by_sex=False, centiles=two_families),
    )
    assert fit.charts["note"].tolist() == ["undefined_centiles"] and fit.charts["p50"].isna().all()


SITE_OFFSETS = {"a": -150.0, "b": -60.0, "c": 0.0, "d": 40.0, "e": 70.0, "f": 100.0}
MANUFACTURER_SHIFT = {"GE": 0.0, "SIEMENS": 80.0, "Toshiba": -200.0, "Philips": 0.0}


def site_cohort(n: int, seed: int, sites=tuple(SITE_OFFSETS), manufacturers=("GE", "GE", "SIEMENS")) -> pd.DataFrame:
    """Women of the analytic cohort on scanners with intercepts SITE_OFFSETS and manufacturers' shifts."""
    rng = np.random.default_rng(seed)
    cohort = analytic_cohort(n, seed).assign(
        sex="F", scanner=rng.choice(sites, n), manufacturer=rng.choice(manufacturers, n)
    )
    shift = cohort["scanner"].map(SITE_OFFSETS).fillna(0) + cohort["manufacturer"].map(MANUFACTURER_SHIFT)
    mean = A["F"] + B["F"] * cohort["age"] + DELTA * cohort["contrast"] + shift
    return cohort.assign(volume_ml=mean + SD["F"] * rng.standard_normal(n))


def test_text_dummies_pool_rare_levels_against_the_most_common():
    values = pd.Series(["GE"] * 12 + ["SIEMENS"] * 20 + ["Toshiba"] * 3 + ["Philips"] * 2, name="manufacturer")
    reference, dummies = normative.text_dummies(values, 10)
    assert reference == "SIEMENS" and list(dummies) == ["manufacturer=GE", "manufacturer=other"]
    column, held = dummies["manufacturer=other"]
    assert held == "Philips|Toshiba" and column.sum() == 5 and dummies["manufacturer=GE"][0].sum() == 12


def test_lms_charts_with_a_text_covariate_and_a_random_site_intercept(tmp_path):
    from ctcohort.centiles import CentileSettings

    cohort = site_cohort(600, 31)
    toshiba = cohort.index[:6]  # too few scans: pooled into other
    cohort.loc[toshiba, "volume_ml"] += MANUFACTURER_SHIFT["Toshiba"] - cohort.loc[toshiba, "manufacturer"].map(
        MANUFACTURER_SHIFT
    )
    cohort.loc[toshiba, "manufacturer"] = "Toshiba"
    settings = normative.ChartSettings(
        covariates=["contrast", "manufacturer"],
        method="lms",
        site="scanner",
        by_sex=False,
        centiles=CentileSettings(families=("normal",), bootstrap_resamples=0),
    )
    fit = normative.fit_charts(cohort, ["liver"], ["volume_ml"], settings)
    charts, coefficients = fit.charts, fit.coefficients
    assert (charts["note"] == "").all() and (charts["manufacturer"] == "GE").all()
    assert (charts["site_column"] == "scanner").all() and (charts["sites"] == 6).all()
    truth_sd = np.std(list(SITE_OFFSETS.values()), ddof=1)
    assert 0.6 * truth_sd < charts["site_sd"].iloc[0] < 1.5 * truth_sd
    rows = coefficients.set_index("covariate")
    assert rows.loc["manufacturer=SIEMENS", "eta_mu"] == pytest.approx(80, abs=30)
    assert rows.loc["manufacturer=other", "levels"] == "Toshiba"
    effects = rows[rows["effect"] == "random"]
    centred = np.array(list(SITE_OFFSETS.values())) - np.mean(list(SITE_OFFSETS.values()))
    np.testing.assert_allclose(effects["eta_mu"].to_numpy(), centred, atol=30)  # 100 scans a site, SD 90
    # placement after the tables' round trip
    write_tsv(charts, tmp_path / "charts.tsv", STATS_DIGITS)
    write_tsv(coefficients, tmp_path / "covariates.tsv", STATS_DIGITS)
    charts, coefficients = read_statistics(tmp_path / "charts.tsv"), read_statistics(tmp_path / "covariates.tsv")
    new = site_cohort(400, 32, sites=("a", "f", "new"), manufacturers=("GE", "SIEMENS", "Toshiba", "Philips"))
    new = new[(new["age"] > 21) & (new["age"] < 84)]
    placed = normative.place_cohort(charts, coefficients, new).set_index(new.index)
    philips, unseen = new["manufacturer"] == "Philips", new["scanner"] == "new"
    assert (placed.loc[philips, "note"] == "covariate_outside_chart").all() and placed.loc[philips, "z"].isna().all()
    assert (placed.loc[~philips & unseen, "note"] == "site_new").all()
    known = ~philips & ~unseen
    assert set(placed.loc[known, "note"]) <= {""} and placed.loc[known, "z"].notna().all()
    truth = (
        new["volume_ml"]
        - A["F"]
        - B["F"] * new["age"]
        - DELTA * new["contrast"]
        - new["scanner"].map(SITE_OFFSETS)
        - new["manufacturer"].map(MANUFACTURER_SHIFT)
    ) / SD["F"]
    assert np.abs(placed.loc[known, "z"] - truth[known]).mean() < 0.25
    # one scan: Toshiba (pooled into other) of scanner a; and of a new scanner: on the population curve, its
    # normal score's scale widened from sigma to sqrt(sigma^2 + tau^2 (1 + 1 / 6 sites))
    covariates = {"contrast": 0, "manufacturer": "GE", "scanner": "a"}
    one = normative.place_on_charts(
        charts, coefficients, scan_table(liver=1000.0), 50, "all", {**covariates, "manufacturer": "Toshiba"}
    )
    assert one.loc[0, "note"] == "" and np.isfinite(one.loc[0, "z"])
    new_site = normative.place_on_charts(
        charts, coefficients, scan_table(liver=1000.0), 50, "all", {**covariates, "scanner": "z"}
    )
    mu, log_sigma = (np.interp(50, charts["age"], charts[c]) for c in ("eta_mu", "eta_sigma"))
    widened = np.hypot(np.exp(log_sigma), charts["site_sd"].iloc[0] * np.sqrt(7 / 6))
    assert new_site.loc[0, "note"] == "site_new"
    assert new_site.loc[0, "z"] == pytest.approx((1000 - mu) / widened / charts["z_scale"].iloc[0], rel=1e-9)


def test_charts_fitted_in_worker_processes_are_the_same_tables_in_the_same_order():
    from ctcohort.centiles import CentileSettings

    cohort = analytic_cohort(400, seed=9)
    spleen = cohort.assign(structure="spleen", volume_ml=cohort["volume_ml"] / 10)
    cohort = pd.concat([cohort, spleen], ignore_index=True)
    panels = [("spleen", "volume_ml"), ("liver", "volume_ml"), ("kidney", "volume_ml")]
    settings = normative.ChartSettings(method="lms", centiles=CentileSettings(bootstrap_resamples=10))
    one = normative.fit_panel_charts(cohort, panels, settings, processes=1)
    three = normative.fit_panel_charts(cohort, panels, settings, processes=3)
    assert one.charts[["structure", "sex"]].drop_duplicates().values.tolist() == [
        ["spleen", "M"],
        ["spleen", "F"],
        ["liver", "M"],
        ["liver", "F"],
        ["kidney", "M"],
        ["kidney", "F"],
    ]
    assert (one.charts["note"] == "").sum() > 100 and len(one.scores) == len(cohort)
    for mine, theirs in zip(one, three):
        pd.testing.assert_frame_equal(mine, theirs)
    with pytest.raises(ValueError, match="processes must be an integer >= 1"):
        normative.fit_panel_charts(cohort, panels, processes=0)


def test_centile_scores_have_one_row_per_scan_and_charted_measure_out_of_fold_for_the_reference():
    from ctcohort.centiles import CentileSettings

    reference = analytic_cohort(300, seed=4).assign(hu_mean=50.0)
    fit = normative.fit_charts(
        reference,
        ["liver"],
        ["volume_ml"],
        normative.ChartSettings(method="lms", by_sex=False, centiles=CentileSettings(bootstrap_resamples=0)),
    )
    others = analytic_cohort(50, seed=8).assign(subject=lambda f: "new" + f["subject"], hu_mean=50.0)
    cohort = pd.concat([reference, others, reference.assign(structure="spleen")], ignore_index=True)
    scores = normative.centile_scores(fit, cohort)
    assert list(scores.columns) == normative.SCORE_TABLE_COLUMNS
    assert len(scores) == 350 and set(zip(scores["structure"], scores["measure"])) == {("liver", "volume_ml")}
    held = scores[scores["fit"] == "out_of_fold"].set_index("subject")["z"]
    np.testing.assert_array_equal(held.loc[fit.scores["subject"]].to_numpy(), fit.scores["z"].to_numpy(float))
    new = scores[scores["fit"] == "full_chart"].set_index("subject")["z"].sort_index()
    placed = normative.place_cohort(fit.charts, fit.coefficients, others).set_index("subject")
    placed = placed[placed["measure"] == "volume_ml"]["z"].sort_index()
    assert len(new) == 50 and new.notna().sum() > 40
    np.testing.assert_array_equal(new.to_numpy(), placed.to_numpy())


def test_chart_settings_from_the_shipped_config_and_the_lms_settings_they_give():
    import yaml

    from ctcohort.centiles import CentileSettings

    block = yaml.safe_load((REPO / "config" / "config.yaml").read_text())["normative"]
    settings = normative.ChartSettings.from_config({**block, "method": "lms", "min_n": 40, "percentiles": [10, 90]})
    assert settings.percentiles == (10.0, 90.0) and settings.covariates == tuple(block["covariates"])
    assert (settings.by_sex, settings.spline_df, settings.site) == (block["by_sex"], block["spline_df"], block["site"])
    lms = settings.centile_settings()
    assert (lms.percentiles, lms.min_scans, lms.age_step) == ((10.0, 90.0), 40, normative.AGE_STEP)
    assert lms.families == CentileSettings.from_config(block).families
    assert normative.ChartSettings.from_config({**block, "method": "quantile"}).centile_settings() is None
