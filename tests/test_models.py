"""ctcohort.models against references that do not share its code: pingouin.partial_corr, scipy.stats.spearmanr
per sex, the difference z worked out by hand, numpy least squares with the HC3 sandwich written out here,
log-likelihoods from residual sums of squares, and synthetic cohorts with planted linear and quadratic
age effects."""

import math

import numpy as np
import pandas as pd
import pingouin
import pytest
from scipy import stats
from test_stats import long_table

from ctcohort.models import (
    BY_SEX_COLUMNS,
    PARTIAL_COLUMNS,
    REGRESSION_COLUMNS,
    by_sex_table,
    partial_table,
    regression_table,
    spearman_difference,
    statistics_table,
)
from ctcohort.stats import MIN_N, StatisticsSettings, age_correlations

Z975 = 1.959963984540054


def reference_p(exact_or_t: float, n: int, permuted: float) -> float:
    """What the tables' P must be: above 30 scans the classical P (never below 2/n!); at or below, a seeded
    permutation P, which ``permuted`` (an independent Monte Carlo of its own) approximates."""
    return max(exact_or_t, 2 / math.factorial(n)) if n > 30 else permuted


MEASURES = ["volume_ml", "hu_mean"]
KEY = ["structure", "group", "measure"]


def cohort(seed: int = 0) -> pd.DataFrame:
    """long_table with a contrast column, and one structure seen in women only (sex adjusts for nothing)."""
    table = long_table(seed)
    rng = np.random.default_rng(seed + 1)
    subjects = sorted(table["subject"].unique())
    contrast = dict(zip(subjects, rng.integers(0, 2, len(subjects))))
    table["contrast"] = table["subject"].map(contrast)
    women = table[(table["structure"] == "liver") & (table["sex"] == "F")].assign(structure="uterus")
    return pd.concat([table, women], ignore_index=True)


def adjusted_table(fit, columns: list[str]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The cohort and the table ``fit`` makes of it adjusted for sex and contrast (checked to have ``columns``),
    indexed by structure, group and measure."""
    table = cohort()
    result = fit(table, MEASURES, ["sex", "contrast"])
    assert list(result.columns) == columns
    return table, result.set_index(KEY)


def rows_and_scans(table: pd.DataFrame, result: pd.DataFrame):
    """Each row of ``result`` with the scans of its structure and group, and its measure."""
    for (structure, group), block in table.groupby(["structure", "group"]):
        for measure in MEASURES:
            yield result.loc[(structure, group, measure)], block, measure


def test_partial_correlations_equal_pingouin(monkeypatch):
    monkeypatch.setitem(pingouin.options, "round.column.CI95", None)  # pingouin shows the CI to 2 decimals
    table, result = adjusted_table(partial_table, PARTIAL_COLUMNS)
    checked = 0
    for row, block, measure in rows_and_scans(table, result):
        valid = block[["age", measure, "sex", "contrast"]].dropna().copy()
        valid["male"] = (valid["sex"] == "M").astype(float)
        covariates = [c for c in ("male", "contrast") if valid[c].nunique() > 1]
        assert row["n"] == len(valid)
        if row["note"]:
            continue
        assert row["k"] == len(covariates)
        reference = pingouin.partial_corr(data=valid, x="age", y=measure, covar=covariates, method="spearman")
        r, n = reference["r"].iloc[0], len(valid)
        assert row["rs_partial"] == pytest.approx(r, abs=1e-6)
        if n > 30:
            assert row["p"] == pytest.approx(
                max(reference["p_val"].iloc[0], 2 / math.factorial(n)), rel=1e-6, abs=1e-12
            )
        # Bonett & Wright's standard error on Fisher's z, with k covariates
        half = Z975 * math.sqrt((1 + r * r / 2) / (n - 3 - len(covariates)))
        assert row["ci_low"] == pytest.approx(math.tanh(math.atanh(r) - half), abs=1e-6)
        assert row["ci_high"] == pytest.approx(math.tanh(math.atanh(r) + half), abs=1e-6)
        checked += 1
    assert checked >= 10
    assert result.loc[("uterus", "abdomen", "volume_ml"), "k"] == 1  # contrast only: every scan is F


def test_partial_correlations_untested_rows_and_corrections():
    table = cohort()
    result = partial_table(table, MEASURES, ["sex", "contrast"], correction="fdr_bh", alpha=0.05)
    plain = age_correlations(table, MEASURES).set_index(KEY)
    # the same rows are too small or constant as in age_correlations (no covariate is missing here)
    for _, row in result.iterrows():
        assert row["note"] == plain.loc[(row["structure"], row["group"], row["measure"]), "note"]
    tested = result[result["note"] == ""]
    untested = result[result["note"] != ""]
    assert untested[["rs_partial", "ci_low", "ci_high", "p", "p_bonferroni", "q_fdr"]].isna().all().all()
    assert not untested["significant"].any()
    p = tested["p"].to_numpy()
    np.testing.assert_allclose(tested["p_bonferroni"], np.minimum(1, p * len(p)))
    # Benjamini-Hochberg by hand: q_(i) = min over j >= i of p_(j) m / j
    order = np.argsort(p)
    ranked = p[order] * len(p) / np.arange(1, len(p) + 1)
    q = np.empty_like(p)
    q[order] = np.minimum(1, np.minimum.accumulate(ranked[::-1])[::-1])
    np.testing.assert_allclose(tested["q_fdr"], q)
    assert (tested["significant"] == (tested["q_fdr"] < 0.05)).all()


def test_a_missing_covariate_value_leaves_the_scan_out():
    table = cohort()
    table.loc[table["subject"] == "sub000", "contrast"] = np.nan
    result = partial_table(table, MEASURES, ["sex", "contrast"]).set_index(KEY)
    liver = table[(table["structure"] == "liver")][["age", "volume_ml", "contrast"]].dropna()
    assert result.loc[("liver", "abdomen", "volume_ml"), "n"] == len(liver)


def monte_carlo_spearman_p(x: np.ndarray, y: np.ndarray, resamples: int = 20_000) -> float:
    """P(|rs*| >= |rs|) over random pairings: Pearson's r of scipy's midranks, permutations by argsort."""
    rx, ry = (stats.rankdata(v) - (len(v) + 1) / 2 for v in (x, y))
    orders = np.argsort(np.random.default_rng(99).random((resamples, len(x))), axis=1)
    observed = abs(rx @ ry)
    return float(((np.abs(rx[orders] @ ry) >= observed - 1e-9).sum() + 1) / (resamples + 1))


def test_by_sex_equals_scipy_per_sex():
    table = cohort()
    result = by_sex_table(table, MEASURES)
    assert list(result.columns) == BY_SEX_COLUMNS
    result = result.set_index(KEY)
    compared = 0
    for (structure, group), block in table.groupby(["structure", "group"]):
        for measure in MEASURES:
            row = result.loc[(structure, group, measure)]
            for sex in ("M", "F"):
                valid = block[block["sex"] == sex][["age", measure]].dropna()
                assert row[f"n_{sex}"] == len(valid)
                if row[f"note_{sex}"]:
                    assert np.isnan(row[f"rs_{sex}"])
                    continue
                reference = stats.spearmanr(valid["age"], valid[measure])
                rs, n = reference.statistic, len(valid)
                assert row[f"rs_{sex}"] == pytest.approx(rs, abs=1e-12)
                if n > 30:
                    assert row[f"p_{sex}"] == pytest.approx(max(reference.pvalue, 2 / math.factorial(n)), rel=1e-9)
                else:  # a Monte Carlo of its own over pairings, 20,000 resamples: within 5 standard errors
                    permuted = monte_carlo_spearman_p(valid["age"].to_numpy(), valid[measure].to_numpy())
                    assert row[f"p_{sex}"] == pytest.approx(permuted, abs=5 * math.sqrt(permuted / 20_000) + 1e-4)
                half = Z975 * math.sqrt((1 + rs * rs / 2) / (n - 3))
                assert row[f"ci_low_{sex}"] == pytest.approx(math.tanh(math.atanh(rs) - half), abs=1e-9)
                assert row[f"ci_high_{sex}"] == pytest.approx(math.tanh(math.atanh(rs) + half), abs=1e-9)
            if row["note_M"] == row["note_F"] == "":
                variance = (1 + row["rs_M"] ** 2 / 2) / (row["n_M"] - 3) + (1 + row["rs_F"] ** 2 / 2) / (row["n_F"] - 3)
                z = (math.atanh(row["rs_M"]) - math.atanh(row["rs_F"])) / math.sqrt(variance)
                assert row["z_diff"] == pytest.approx(z, abs=1e-9)
                assert row["p_diff"] == pytest.approx(math.erfc(abs(z) / math.sqrt(2)), rel=1e-9)
                compared += 1
            else:
                assert np.isnan(row["p_diff"])
    assert compared >= 5
    tested = result["p_diff"].notna()
    np.testing.assert_allclose(
        result.loc[tested, "p_diff_bonferroni"], np.minimum(1, result.loc[tested, "p_diff"] * tested.sum())
    )
    # the uterus is seen in women only: no men, no difference
    assert result.loc[("uterus", "abdomen", "volume_ml"), "n_M"] == 0
    assert result.loc[("uterus", "abdomen", "volume_ml"), "note_M"] == "too_few_scans"


def test_difference_z_by_hand():
    # rs_M 0.5 in 50 men, rs_F 0.2 in 40 women:
    # atanh 0.5 = 0.549306, atanh 0.2 = 0.202733; variances 1.125 / 47 = 0.023936 and 1.02 / 37 = 0.027568;
    # z = 0.346574 / sqrt(0.051504) = 0.346574 / 0.226945 = 1.52713; P = 2 (1 - Phi(1.52713)) = 0.12673
    z, p = spearman_difference(0.5, 50, 0.2, 40)
    assert z == pytest.approx(1.52713, abs=1e-5)
    assert p == pytest.approx(0.12673, abs=1e-5)
    assert spearman_difference(0.2, 40, 0.5, 50)[0] == pytest.approx(-z)
    assert np.isnan(spearman_difference(1.0, 50, 0.2, 40)[0])
    assert np.isnan(spearman_difference(0.5, 3, 0.2, 40)[0])


def test_no_sex_column_tests_no_difference():
    table = long_table().drop(columns="sex")
    result = by_sex_table(table, MEASURES)
    assert (result["note_M"] == "no_sex").all() and result["p_diff"].isna().all()


def hc3(design: np.ndarray, y: np.ndarray):
    """Least-squares coefficients and HC3 standard errors written out:
    (X'X)^-1 X' diag(e^2 / (1 - h)^2) X (X'X)^-1, h the diagonal of X (X'X)^-1 X'."""
    beta = np.linalg.lstsq(design, y, rcond=None)[0]
    residuals = y - design @ beta
    bread = np.linalg.inv(design.T @ design)
    leverage = np.einsum("ij,jk,ik->i", design, bread, design)
    meat = design.T @ (design * (residuals**2 / (1 - leverage) ** 2)[:, None])
    return beta, np.sqrt(np.diag(bread @ meat @ bread)), residuals


def test_regression_equals_least_squares_with_hc3_by_hand():
    table, result = adjusted_table(regression_table, REGRESSION_COLUMNS)
    checked = 0
    for row, block, measure in rows_and_scans(table, result):
        valid = block[["age", measure, "sex", "contrast"]].dropna()
        assert row["n"] == len(valid)
        if row["note"]:
            continue
        columns = [np.ones(len(valid)), valid["age"].to_numpy() / 10]
        if valid["sex"].nunique() > 1:
            columns.append((valid["sex"] == "M").to_numpy(dtype=float))
        if valid["contrast"].nunique() > 1:
            columns.append(valid["contrast"].to_numpy(dtype=float))
        beta, se, _ = hc3(np.column_stack(columns), valid[measure].to_numpy())
        assert row["coef_per_decade"] == pytest.approx(beta[1], rel=1e-8, abs=1e-10)
        assert row["ci_low"] == pytest.approx(beta[1] - Z975 * se[1], rel=1e-7, abs=1e-9)
        assert row["ci_high"] == pytest.approx(beta[1] + Z975 * se[1], rel=1e-7, abs=1e-9)
        if len(valid) > 30:
            assert row["p"] == pytest.approx(
                max(math.erfc(abs(beta[1] / se[1]) / math.sqrt(2)), 2 / math.factorial(len(valid))),
                rel=1e-6,
                abs=1e-300,
            )
        median = float(np.median(valid[measure]))
        assert row["median"] == pytest.approx(median)
        assert row["percent_per_decade"] == pytest.approx(100 * beta[1] / median, rel=1e-8)
        checked += 1
    assert checked >= 10


def log_likelihood(residuals: np.ndarray) -> float:
    """Gaussian log-likelihood at the least-squares fit: -n/2 (log(2 pi RSS / n) + 1)."""
    n = len(residuals)
    return -n / 2 * (math.log(2 * math.pi * (residuals @ residuals) / n) + 1)


def synthetic(shape: str, n: int = 300, seed: int = 7) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    age = rng.uniform(20, 90, n).round()
    sex = np.where(rng.random(n) < 0.5, "M", "F")
    contrast = rng.integers(0, 2, n)
    trend = 0.08 * (age - 55) ** 2 if shape == "quadratic" else 3.0 * age
    volume = 1000 + trend + 40 * (sex == "M") + 25 * contrast + rng.normal(0, 30, n)
    return pd.DataFrame(
        {
            "subject": [f"s{i}" for i in range(n)],
            "age": age,
            "sex": sex,
            "contrast": contrast,
            "structure": shape,
            "group": "organ",
            "volume_ml": volume,
        }
    )


def test_nonlinearity_f_test_equals_statsmodels_model_comparison():
    import patsy
    import statsmodels.api as sm

    frame = synthetic("quadratic", n=40)
    row = regression_table(frame, ["volume_ml"], ["sex", "contrast"], spline_df=3).iloc[0]
    y = frame["volume_ml"].to_numpy()
    covariates = [(frame["sex"] == "M").to_numpy(dtype=float), frame["contrast"].to_numpy(dtype=float)]
    linear = sm.OLS(y, np.column_stack([np.ones(len(y)), frame["age"], *covariates])).fit()
    basis = np.asarray(patsy.dmatrix("cr(age, df=3, constraints='center') - 1", frame))
    spline = sm.OLS(y, np.column_stack([np.ones(len(y)), basis, *covariates])).fit()
    f, p, dof = spline.compare_f_test(linear)
    assert row["f_nonlinear"] == pytest.approx(f, rel=1e-8)
    assert row["df_nonlinear"] == dof == 2
    assert row["p_nonlinear"] == pytest.approx(p, rel=1e-8, abs=1e-300)
    # and so is the one-row table's correction of it
    assert row["p_nonlinear_bonferroni"] == pytest.approx(p, rel=1e-8, abs=1e-300)


def test_the_spline_f_test_holds_its_level_for_a_straight_line_at_thirty_scans():
    """The issue's measurement: the chi-squared likelihood-ratio test rejected 8.75% at .05 for a truly
    linear trend at n = 30; the F test must stay near 5%. The designs are patsy's, the fits statsmodels'."""
    import patsy
    import statsmodels.api as sm

    from ctcohort.models import nonlinearity_f_test

    rng = np.random.default_rng(3)
    f_p, lr_p = [], []
    for _ in range(1500):
        age = rng.uniform(20, 90, 30)
        y = 2.0 * age + rng.normal(0, 10, 30)
        linear = sm.OLS(y, np.column_stack([np.ones(30), age])).fit()
        basis = np.asarray(patsy.dmatrix("cr(age, df=3, constraints='center') - 1", {"age": age}))
        spline = sm.OLS(y, np.column_stack([np.ones(30), basis])).fit()
        f_p.append(nonlinearity_f_test(linear, spline)[2])
        lr_p.append(stats.chi2.sf(2 * (spline.llf - linear.llf), 2))
    f_rate, lr_rate = np.mean(np.array(f_p) < 0.05), np.mean(np.array(lr_p) < 0.05)
    assert 0.035 <= f_rate <= 0.065, f_rate
    assert lr_rate > f_rate  # the likelihood-ratio test it replaces is anti-conservative


def test_p_nonlinear_is_corrected_over_the_fitted_rows():
    rows = [synthetic("linear", n=40, seed=seed).assign(structure=f"line{seed}") for seed in range(4)]
    table = regression_table(pd.concat(rows, ignore_index=True), ["volume_ml"], ["sex", "contrast"])
    np.testing.assert_allclose(table["p_nonlinear_bonferroni"], np.minimum(1, table["p_nonlinear"] * 4))
    assert (table["q_nonlinear_fdr"] >= table["p_nonlinear"] - 1e-15).all()


def test_small_n_slope_p_is_a_permutation_p_that_holds_its_level():
    """The Freedman-Lane permutation P of the HC3 t statistic (the slope's P at 30 scans or fewer) holds .05 at
    12 scans with skewed errors and a covariate, and is never below 1/(B + 1)."""
    from ctcohort.models import hc3_permutation_p

    rng = np.random.default_rng(11)
    permuted = []
    for _ in range(1000):
        age = rng.uniform(20, 90, 12)
        x = np.column_stack([np.ones(12), age / 10, rng.integers(0, 2, 12)])
        y = rng.lognormal(0, 0.8, 12)  # no age effect, skewed
        permuted.append(hc3_permutation_p(y, x, 1, seed=int(rng.integers(1 << 30)), resamples=499))
    assert 0.035 <= np.mean(np.array(permuted) < 0.05) <= 0.065
    assert min(permuted) >= 1 / 500


def test_planted_quadratic_is_nonlinear_with_its_vertex():
    row = regression_table(synthetic("quadratic"), ["volume_ml"], ["sex", "contrast"]).iloc[0]
    assert row["note"] == ""
    assert row["p_nonlinear"] < 1e-10
    assert row["trough_age"] == pytest.approx(55, abs=4)  # vertex of 0.08 (age - 55)^2
    assert np.isnan(row["peak_age"])  # the maximum lies at an end of the age range
    inverted = synthetic("quadratic").assign(volume_ml=lambda t: 3000 - t["volume_ml"])
    row = regression_table(inverted, ["volume_ml"], ["sex", "contrast"]).iloc[0]
    assert row["peak_age"] == pytest.approx(55, abs=4) and np.isnan(row["trough_age"])


def test_planted_linear_is_not_nonlinear():
    row = regression_table(synthetic("linear"), ["volume_ml"], ["sex", "contrast"]).iloc[0]
    assert row["p_nonlinear"] > 0.05
    assert row["coef_per_decade"] == pytest.approx(30, abs=3)  # 3 ml a year
    assert row["covariates"] == "sex,contrast"


def test_regression_rows_without_a_fit_say_why():
    table = cohort()
    result = regression_table(table, MEASURES, ["sex", "contrast"], min_n=MIN_N)
    untested = result[result["note"] != ""]
    assert set(untested["note"]) == {"too_few_scans", "constant"}
    assert untested[["coef_per_decade", "p", "p_nonlinear", "peak_age", "trough_age"]].isna().all().all()
    with pytest.raises(ValueError, match="spline_df"):
        regression_table(table, MEASURES, [], spline_df=1)


def test_a_covariate_category_of_one_scan_leaves_hc3_undefined():
    # the one contrast scan is fitted exactly (leverage 1): its HC3 weight e^2 / (1 - h)^2 is 0/0
    frame = synthetic("linear").assign(contrast=0)
    frame.loc[0, "contrast"] = 1
    row = regression_table(frame, ["volume_ml"], ["sex", "contrast"]).iloc[0]
    assert row["note"] == "leverage_one"
    assert np.isnan(row["p"]) and np.isnan(row["ci_low"]) and np.isnan(row["p_bonferroni"])
    design = np.column_stack([np.ones(len(frame)), frame["age"] / 10, frame["sex"] == "M", frame["contrast"]])
    assert row["coef_per_decade"] == pytest.approx(
        np.linalg.lstsq(design.astype(float), frame["volume_ml"], rcond=None)[0][1]
    )


def test_each_analysis_of_the_statistics_stage_takes_its_settings():
    table, measures = cohort(), ["volume_ml"]
    settings = StatisticsSettings(
        measures=measures, correction="fdr_bh", alpha=0.05, partial_covariates=["contrast"], min_n=12, spline_df=4
    )
    expected = {
        "age_correlations": age_correlations(
            table, measures, "fdr_bh", 0.05, partial_covariates=["contrast"], min_n=12, primary="adjusted"
        ),
        "partial_correlations": partial_table(table, measures, ["contrast"], "fdr_bh", 0.05, 12),
        "by_sex": by_sex_table(table, measures, 12),
        "regression": regression_table(table, measures, ["contrast"], spline_df=4, min_n=12),
    }
    for analysis, want in expected.items():
        pd.testing.assert_frame_equal(statistics_table(analysis, table, settings), want)
    with pytest.raises(ValueError, match="unknown analysis 'ages'"):
        statistics_table("ages", table, settings)
