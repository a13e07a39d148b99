"""age_correlations and fisher_ci, checked against scipy/statsmodels/numpy recomputed here."""

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats
from statsmodels.stats.multitest import multipletests

from ctcohort.stats import CORRELATION_COLUMNS, age_correlations, fisher_ci

Z975 = 1.959963984540054  # standard normal 97.5 % quantile
MEASURES = ["volume_ml", "hu_mean"]
KEY = ["structure", "group", "measure"]


def long_table(seed: int = 0, n_subjects: int = 40) -> pd.DataFrame:
    """Subjects x structures with age-dependent, noisy and degenerate measures, NaNs sprinkled in."""
    rng = np.random.default_rng(seed)
    subjects = [f"sub{i:03d}" for i in range(n_subjects)]
    age = rng.uniform(20, 90, n_subjects)
    age[[3, 17]] = np.nan  # two subjects without a usable age
    structures = {
        "liver": ("abdomen", 8.0, -0.3),  # strong trends: significant
        "spleen": ("abdomen", 0.0, 0.0),  # noise only
        "brain": ("head", -5.0, 0.05),
        "aorta": ("vessels", 0.5, 0.0),  # weak
        "rare": ("other", 1.0, 1.0),  # almost always missing: n < 3
        "flat": ("other", 0.0, 0.0),  # constant measure
    }
    rows = []
    for name, (group, volume_slope, hu_slope) in structures.items():
        volume = 1000 + volume_slope * age + rng.normal(0, 60, n_subjects)
        hu = 50 + hu_slope * age + rng.normal(0, 4, n_subjects)
        volume[rng.random(n_subjects) < 0.15] = np.nan
        hu[rng.random(n_subjects) < 0.1] = np.nan
        if name == "rare":
            keep = np.zeros(n_subjects, dtype=bool)
            keep[[0, 1]] = True  # two finite pairs only (ages 0 and 1 are finite)
            volume[~keep] = np.nan
            hu[~keep] = np.nan
        if name == "flat":
            volume[:] = 123.0
            volume[5] = np.nan
        for i, subject in enumerate(subjects):
            rows.append(
                {"subject": subject, "age": age[i], "sex": "MF"[i % 2], "structure": name,
                 "group": group, "volume_ml": volume[i], "hu_mean": hu[i]}
            )
    table = pd.DataFrame(rows)
    # row order of the long table should not matter
    return table.sample(frac=1.0, random_state=seed).reset_index(drop=True)


def expected_correlations(table: pd.DataFrame, measures) -> pd.DataFrame:
    """The reference computation, written out independently of ctcohort.stats."""
    rows = []
    for (structure, group), block in table.groupby(["structure", "group"]):
        for measure in measures:
            x = block["age"].to_numpy(float)
            y = block[measure].to_numpy(float)
            finite = np.isfinite(x) & np.isfinite(y)
            n = int(finite.sum())
            xs, ys = x[finite], y[finite]
            if n >= 3 and len(set(xs)) > 1 and len(set(ys)) > 1:
                rs, p = stats.spearmanr(xs, ys)
            else:
                rs, p = np.nan, np.nan
            if n > 3 and np.isfinite(rs):
                z, se = math.atanh(rs), 1 / math.sqrt(n - 3)
                low, high = math.tanh(z - Z975 * se), math.tanh(z + Z975 * se)
            else:
                low = high = np.nan
            rows.append((structure, group, measure, n, rs, low, high, p))
    out = pd.DataFrame(rows, columns=[*KEY, "n", "rs", "ci_low", "ci_high", "p"])
    finite_p = out["p"].notna()
    m = int(finite_p.sum())
    out["p_bonferroni"] = [min(1.0, p * m) if np.isfinite(p) else np.nan for p in out["p"]]
    out["q_fdr"] = np.nan
    if m:
        out.loc[finite_p, "q_fdr"] = multipletests(out.loc[finite_p, "p"].to_numpy(), method="fdr_bh")[1]
    return out.set_index(KEY).sort_index()


@pytest.fixture(scope="module")
def table():
    return long_table()


@pytest.fixture(scope="module")
def expected(table):
    return expected_correlations(table, MEASURES)


def by_key(result: pd.DataFrame) -> pd.DataFrame:
    return result.set_index(KEY).sort_index()


@pytest.mark.parametrize("correction", ["bonferroni", "fdr_bh"])
def test_columns_and_one_row_per_structure_and_measure(table, expected, correction):
    result = age_correlations(table, MEASURES, correction=correction, alpha=0.05)
    assert list(result.columns) == CORRELATION_COLUMNS
    n_structures = table[["structure", "group"]].drop_duplicates().shape[0]
    assert len(result) == n_structures * len(MEASURES)
    assert not result.duplicated(KEY).any()
    assert set(result.set_index(KEY).index) == set(expected.index)
    assert result["significant"].dtype == bool


def test_n_rs_and_p_match_scipy_on_finite_rows(table, expected):
    got = by_key(age_correlations(table, MEASURES))
    np.testing.assert_array_equal(got["n"].to_numpy(), expected["n"].to_numpy())
    np.testing.assert_allclose(got["rs"], expected["rs"], rtol=1e-12, atol=1e-14, equal_nan=True)
    np.testing.assert_allclose(got["p"], expected["p"], rtol=1e-10, atol=0, equal_nan=True)
    # sanity of the fixture: the strong trends are really there
    assert got.loc[("liver", "abdomen", "volume_ml"), "rs"] > 0.8
    assert got.loc[("brain", "head", "volume_ml"), "rs"] < -0.8


def test_n_counts_pairs_with_finite_age_and_measure(table):
    got = by_key(age_correlations(table, MEASURES))
    for (structure, group, measure), n in got["n"].items():
        block = table[(table["structure"] == structure) & (table["group"] == group)]
        assert n == int((block["age"].notna() & block[measure].notna()).sum())
    # two subjects have no age, so no n can reach the number of subjects
    assert got["n"].max() <= table["subject"].nunique() - 2


def test_fisher_confidence_interval(table, expected):
    got = by_key(age_correlations(table, MEASURES))
    np.testing.assert_allclose(got["ci_low"], expected["ci_low"], rtol=1e-9, equal_nan=True)
    np.testing.assert_allclose(got["ci_high"], expected["ci_high"], rtol=1e-9, equal_nan=True)
    finite = got["rs"].notna()
    assert (got.loc[finite, "ci_low"] < got.loc[finite, "rs"]).all()
    assert (got.loc[finite, "rs"] < got.loc[finite, "ci_high"]).all()
    assert got.loc[finite, ["ci_low", "ci_high"]].abs().le(1).all().all()


def test_bonferroni_and_fdr_adjustments(table, expected):
    got = by_key(age_correlations(table, MEASURES))
    m = int(got["p"].notna().sum())
    assert m == len(got) - 3  # rare x 2 measures and flat volume have no p value
    np.testing.assert_allclose(
        got["p_bonferroni"], np.minimum(1.0, got["p"] * m), rtol=1e-12, equal_nan=True
    )
    np.testing.assert_allclose(got["p_bonferroni"], expected["p_bonferroni"], rtol=1e-10, equal_nan=True)
    np.testing.assert_allclose(got["q_fdr"], expected["q_fdr"], rtol=1e-10, equal_nan=True)
    assert (got["p_bonferroni"].dropna() <= 1.0).all()
    assert (got["q_fdr"].dropna() >= got["p"].dropna()).all()
    assert (got["q_fdr"].dropna() <= got["p_bonferroni"].dropna() + 1e-15).all()


@pytest.mark.parametrize("correction", ["bonferroni", "fdr_bh"])
@pytest.mark.parametrize("alpha", [1e-4, 0.05, 0.5])
def test_significant_follows_correction_and_alpha(table, expected, correction, alpha):
    got = by_key(age_correlations(table, MEASURES, correction=correction, alpha=alpha))
    adjusted = expected["p_bonferroni"] if correction == "bonferroni" else expected["q_fdr"]
    want = (adjusted < alpha).to_numpy()  # NaN < alpha is False
    np.testing.assert_array_equal(got["significant"].to_numpy(), want)


def test_the_correction_changes_the_verdict():
    """A family of p values where BH keeps more findings than Bonferroni at the same alpha."""
    rng = np.random.default_rng(7)
    n = 30
    age = rng.uniform(20, 80, n)
    rows = []
    for k in range(10):
        # moderate trends of varying strength
        y = 0.02 * k * age + rng.normal(0, 2.0, n)
        rows += [{"subject": i, "age": age[i], "structure": f"s{k}", "group": "g", "v": y[i]} for i in range(n)]
    table = pd.DataFrame(rows)
    ref = expected_correlations(table, ["v"])
    alpha = 0.05
    bonf = age_correlations(table, ["v"], "bonferroni", alpha)
    fdr = age_correlations(table, ["v"], "fdr_bh", alpha)
    assert bonf["significant"].sum() == (ref["p_bonferroni"] < alpha).sum()
    assert fdr["significant"].sum() == (ref["q_fdr"] < alpha).sum()
    # BH is never stricter than Bonferroni
    assert (bonf["significant"].to_numpy() <= fdr["significant"].to_numpy()).all()
    assert fdr["significant"].sum() > bonf["significant"].sum()  # the family was built for this


def test_undefined_correlations_are_nan_uncounted_and_not_significant(table):
    got = by_key(age_correlations(table, MEASURES, correction="fdr_bh", alpha=1.0))
    rare = got.loc[("rare", "other")]
    assert (rare["n"] == 2).all()  # n < 3
    flat = got.loc[("flat", "other", "volume_ml")]
    assert flat["n"] > 3  # plenty of pairs, but the measure is constant
    for row in [*[r for _, r in rare.iterrows()], flat]:
        for column in ("rs", "p", "ci_low", "ci_high", "p_bonferroni", "q_fdr"):
            assert np.isnan(row[column]), column
        assert not row["significant"]
    # alpha 1: every tested structure is significant, the untested ones are not
    assert got["significant"].sum() == got["p"].notna().sum()


def test_undefined_rows_do_not_change_the_multiplier(table):
    """Structures without a p value (rare: n < 3, flat: constant volume) leave every adjustment unchanged."""
    with_untested = by_key(age_correlations(table, ["volume_ml"], "fdr_bh", 0.05))
    tested_only = by_key(
        age_correlations(table[~table["structure"].isin(["rare", "flat"])], ["volume_ml"], "fdr_bh", 0.05)
    )
    assert len(with_untested) == len(tested_only) + 2
    shared = with_untested.loc[tested_only.index]
    for column in ("p", "p_bonferroni", "q_fdr", "significant"):
        np.testing.assert_array_equal(shared[column].to_numpy(), tested_only[column].to_numpy())
    # with a single tested structure the multiplier is 1
    got = by_key(age_correlations(table[table["structure"].isin(["liver", "rare"])], ["volume_ml"]))
    liver = got.loc[("liver", "abdomen", "volume_ml")]
    assert liver["p_bonferroni"] == liver["p"]
    assert liver["q_fdr"] == pytest.approx(liver["p"], rel=1e-12)


def test_constant_age_gives_nan():
    table = pd.DataFrame(
        {"subject": range(6), "age": [50.0] * 6, "structure": "x", "group": "g",
         "v": [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]}
    )
    got = age_correlations(table, ["v"], "bonferroni", 0.05).iloc[0]
    assert got["n"] == 6
    assert np.isnan(got["rs"]) and np.isnan(got["p"]) and not got["significant"]


def test_nothing_testable():
    table = pd.DataFrame(
        {"subject": range(4), "age": [20.0, 30.0, np.nan, 50.0], "structure": "x", "group": "g",
         "v": [np.nan, np.nan, 1.0, np.nan]}
    )
    for correction in ("bonferroni", "fdr_bh"):
        got = age_correlations(table, ["v"], correction, 0.05)
        assert len(got) == 1
        row = got.iloc[0]
        assert row["n"] == 0
        assert row[["rs", "p", "p_bonferroni", "q_fdr"]].isna().all()
        assert not row["significant"]


def test_small_hand_checked_example():
    # age and measure in the same order except one swap: rs = 1 - 6*sum(d^2)/(n(n^2-1)) with sum d^2 = 2
    age = [30.0, 40.0, 50.0, 60.0, 70.0, 80.0]
    v = [1.0, 2.0, 4.0, 3.0, 5.0, 6.0]
    table = pd.DataFrame({"subject": range(6), "age": age, "structure": "x", "group": "g", "v": v})
    row = age_correlations(table, ["v"], "bonferroni", 0.05).iloc[0]
    n = 6
    rs = 1 - 6 * 2 / (n * (n * n - 1))
    assert row["n"] == n
    assert row["rs"] == pytest.approx(rs)
    # two-sided p of the t approximation scipy uses
    t = rs * math.sqrt((n - 2) / (1 - rs * rs))
    assert row["p"] == pytest.approx(2 * stats.t.sf(t, n - 2), rel=1e-9)
    assert row["p_bonferroni"] == pytest.approx(row["p"])  # one test
    assert row["ci_low"] == pytest.approx(math.tanh(math.atanh(rs) - Z975 / math.sqrt(3)))
    assert row["ci_high"] == pytest.approx(math.tanh(math.atanh(rs) + Z975 / math.sqrt(3)))


@pytest.mark.parametrize("correction", ["holm", "Bonferroni", "fdr", "", None])
def test_unknown_correction(table, correction):
    with pytest.raises(ValueError, match="correction"):
        age_correlations(table, MEASURES, correction=correction)


# --- fisher_ci --------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [-1, 0, 1, 2, 3])
def test_fisher_ci_needs_more_than_three(n):
    low, high = fisher_ci(0.5, n)
    assert np.isnan(low) and np.isnan(high)


@pytest.mark.parametrize("rs", [np.nan, np.inf, -np.inf])
def test_fisher_ci_undefined_correlation(rs):
    low, high = fisher_ci(rs, 50)
    assert np.isnan(low) and np.isnan(high)


@pytest.mark.parametrize("rs, n", [(0.0, 4), (0.3, 10), (-0.7, 25), (0.95, 200)])
def test_fisher_ci_values(rs, n):
    low, high = fisher_ci(rs, n)
    z, se = np.arctanh(rs), 1 / np.sqrt(n - 3)
    assert low == pytest.approx(np.tanh(z - 1.959964 * se), abs=1e-6)
    assert high == pytest.approx(np.tanh(z + 1.959964 * se), abs=1e-6)
    assert -1 <= low < rs < high <= 1
    # symmetric around rs on the z scale
    assert np.arctanh(high) - z == pytest.approx(z - np.arctanh(low))


def test_fisher_ci_zero_is_symmetric_and_narrows_with_n():
    low, high = fisher_ci(0.0, 20)
    assert low == pytest.approx(-high)
    widths = [np.subtract(*fisher_ci(0.2, n)[::-1]) for n in (5, 20, 100, 1000)]
    assert all(a > b > 0 for a, b in zip(widths, widths[1:]))


def test_fisher_ci_level():
    low95, high95 = fisher_ci(0.4, 30)
    low90, high90 = fisher_ci(0.4, 30, level=0.90)
    assert low95 < low90 < 0.4 < high90 < high95
    z90 = stats.norm.ppf(0.95)
    assert high90 == pytest.approx(np.tanh(np.arctanh(0.4) + z90 / np.sqrt(27)))


@pytest.mark.parametrize("rs", [1.0, -1.0])
def test_fisher_ci_perfect_correlation_is_finite(rs):
    low, high = fisher_ci(rs, 10)
    assert np.isfinite(low) and np.isfinite(high)
    assert -1 <= low <= high <= 1
    assert min(abs(low), abs(high)) > 0.99  # the interval hugs the boundary


def test_significance_is_strictly_below_alpha(table):
    """A Bonferroni p clipped to 1 is not significant even at alpha 1."""
    got = by_key(age_correlations(table, MEASURES, correction="bonferroni", alpha=1.0))
    clipped = got["p_bonferroni"] == 1.0
    assert clipped.any()  # the noise structures reach the cap
    assert not got.loc[clipped, "significant"].any()
    assert got.loc[got["p_bonferroni"] < 1.0, "significant"].all()


# --- partial Spearman correlation ---------------------------------------------------------------


def _partial_reference(x, y, z):
    """Residuals of ranks on ranks by statsmodels OLS, then Pearson: an independent path."""
    import statsmodels.api as sm

    design = sm.add_constant(np.column_stack([stats.rankdata(c) for c in np.atleast_2d(z.T)]))
    rx = sm.OLS(stats.rankdata(x), design).fit().resid
    ry = sm.OLS(stats.rankdata(y), design).fit().resid
    return stats.pearsonr(rx, ry).statistic


def test_partial_spearman_removes_a_confounder_and_keeps_a_real_effect():
    from ctcohort.stats import partial_spearman

    rng = np.random.default_rng(11)
    confounder = rng.normal(size=300)
    age = confounder + 0.3 * rng.normal(size=300)
    confounded = confounder + 0.3 * rng.normal(size=300)
    independent = rng.integers(0, 2, 300).astype(float)
    real = age + 0.5 * rng.normal(size=300)
    assert stats.spearmanr(age, confounded).statistic > 0.8
    r, p = partial_spearman(age, confounded, confounder[:, None])
    assert abs(r) < 0.2 and p > 1e-3
    r_real, p_real = partial_spearman(age, real, independent[:, None])
    assert r_real == pytest.approx(stats.spearmanr(age, real).statistic, abs=0.02) and p_real < 1e-20
    assert r == pytest.approx(_partial_reference(age, confounded, confounder[:, None]), abs=1e-10)
    both = np.column_stack([confounder, independent])
    assert partial_spearman(age, confounded, both)[0] == pytest.approx(_partial_reference(age, confounded, both),
                                                                      abs=1e-10)


def test_partial_spearman_p_uses_n_minus_2_minus_k_degrees_of_freedom():
    from ctcohort.stats import partial_spearman

    rng = np.random.default_rng(3)
    x, y, z = rng.normal(size=(3, 25))
    r, p = partial_spearman(x, y, z[:, None])
    t = r * np.sqrt(22 / (1 - r * r))
    assert p == pytest.approx(2 * stats.t.sf(abs(t), 22), rel=1e-12)
    assert np.isnan(partial_spearman(x[:3], y[:3], z[:3, None])[0])


def test_age_correlations_adjust_for_sex_and_contrast_in_the_table():
    rng = np.random.default_rng(5)
    n = 200
    sex = rng.choice(["M", "F"], n)
    age = rng.uniform(20, 60, n) + np.where(sex == "M", 30, 0)
    table = pd.DataFrame({
        "subject": [f"s{i}" for i in range(n)], "age": age, "sex": sex, "contrast": rng.integers(0, 2, n),
        "structure": "liver", "group": "organ",
        "volume_ml": np.where(sex == "M", 100.0, 0.0) + rng.normal(0, 5, n),  # sex, not age
    })
    out = age_correlations(table, ["volume_ml"], partial_covariates=["sex", "contrast", "missing_column"])
    assert out.at[0, "rs"] > 0.3
    assert abs(out.at[0, "rs_partial"]) < 0.15
    plain = age_correlations(table, ["volume_ml"])
    assert plain[["rs_partial", "p_partial"]].isna().all().all()
