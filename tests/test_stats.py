"""ctcohort.stats against references that do not share its code: scipy.stats.spearmanr on the raw
data, statsmodels' multipletests, pairings enumerated here, exact P values known by hand,
pingouin.partial_corr, and a coverage simulation of the confidence interval."""

import itertools
import math

import numpy as np
import pandas as pd
import pingouin
import pytest
from scipy import stats
from statsmodels.stats.multitest import multipletests

from ctcohort.stats import (
    CORRELATION_COLUMNS,
    MIN_N,
    StatisticsSettings,
    age_correlations,
    group_summary,
    partial_spearman,
    spearman_ci,
)

Z975 = 1.959963984540054  # standard normal 97.5 % quantile
MEASURES = ["volume_ml", "hu_mean"]
KEY = ["structure", "group", "measure"]
UNTESTED = [  # rows of long_table() without a test, and why
    ("rare", "other", "volume_ml", "too_few_scans"),
    ("rare", "other", "hu_mean", "too_few_scans"),
    ("sparse", "other", "volume_ml", "too_few_scans"),
    ("sparse", "other", "hu_mean", "too_few_scans"),
    ("flat", "other", "volume_ml", "constant"),
]


def long_table(seed: int = 0, n_subjects: int = 40) -> pd.DataFrame:
    """Subjects x structures with age-dependent, noisy and degenerate measures, NaNs sprinkled in.

    Ages are whole years, so they are tied as in real cohorts.
    """
    rng = np.random.default_rng(seed)
    subjects = [f"sub{i:03d}" for i in range(n_subjects)]
    age = rng.integers(20, 90, n_subjects).astype(float)
    age[[3, 17]] = np.nan  # two subjects without a usable age
    structures = {
        "liver": ("abdomen", 8.0, -0.3),  # strong trends: significant
        "spleen": ("abdomen", 0.0, 0.0),  # noise only
        "brain": ("head", -5.0, 0.05),
        "aorta": ("vessels", 0.5, 0.0),  # weak
        "rare": ("other", 1.0, 1.0),  # almost always missing: n = 2
        "sparse": ("other", 8.0, -0.3),  # strong trend, but n = 6 < MIN_N
        "flat": ("other", 0.0, 0.0),  # constant measure
    }
    rows = []
    for name, (group, volume_slope, hu_slope) in structures.items():
        volume = 1000 + volume_slope * age + rng.normal(0, 60, n_subjects)
        hu = 50 + hu_slope * age + rng.normal(0, 4, n_subjects)
        volume[rng.random(n_subjects) < 0.15] = np.nan
        hu[rng.random(n_subjects) < 0.1] = np.nan
        if name in ("rare", "sparse"):
            keep = np.zeros(n_subjects, dtype=bool)
            keep[[0, 1] if name == "rare" else [0, 1, 2, 4, 5, 6]] = True  # these ages are finite
            volume = np.where(keep, 1000 + volume_slope * age + rng.normal(0, 60, n_subjects), np.nan)
            hu = np.where(keep, 50 + hu_slope * age + rng.normal(0, 4, n_subjects), np.nan)
        if name == "flat":
            volume[:] = 123.0
            volume[5] = np.nan
        for i, subject in enumerate(subjects):
            rows.append(
                {
                    "subject": subject,
                    "age": age[i],
                    "sex": "MF"[i % 2],
                    "structure": name,
                    "group": group,
                    "volume_ml": volume[i],
                    "hu_mean": hu[i],
                }
            )
    table = pd.DataFrame(rows)
    # row order of the long table should not matter
    return table.sample(frac=1.0, random_state=seed).reset_index(drop=True)


def expected_correlations(table: pd.DataFrame, measures, min_n: int = MIN_N) -> pd.DataFrame:
    """n, rs, p by scipy.stats.spearmanr on the raw rows; corrections by statsmodels' multipletests.

    Only valid where every tested n is above the exact-enumeration range (these tables: n >= 10).
    """
    rows = []
    for (structure, group), block in table.groupby(["structure", "group"]):
        for measure in measures:
            valid = block[["age", measure]].dropna()
            n = len(valid)
            if n < min_n:
                rs, p, note = np.nan, np.nan, "too_few_scans"
            elif valid["age"].nunique() == 1 or valid[measure].nunique() == 1:
                rs, p, note = np.nan, np.nan, "constant"
            else:
                rs, p = stats.spearmanr(valid["age"], valid[measure])
                note = ""
            rows.append(
                {"structure": structure, "group": group, "measure": measure, "n": n, "rs": rs, "p": p, "note": note}
            )
    out = pd.DataFrame(rows)
    tested = out["p"].notna()
    for column, method in (("p_bonferroni", "bonferroni"), ("q_fdr", "fdr_bh")):
        out[column] = np.nan
        if tested.any():
            out.loc[tested, column] = multipletests(out.loc[tested, "p"].to_numpy(), method=method)[1]
    return out.set_index(KEY).sort_index()


def enumerated_p(x, y) -> float:
    """Two-sided P(|rs*| >= |rs|) by re-pairing y with x in every order, rs by scipy each time."""
    observed = abs(stats.spearmanr(x, y).statistic)
    y = np.asarray(y)
    hits = total = 0
    for order in itertools.permutations(range(len(y))):
        total += 1
        hits += abs(stats.spearmanr(x, y[list(order)]).statistic) >= observed - 1e-9
    return hits / total


def one_structure(age, values, **kwargs) -> pd.Series:
    table = pd.DataFrame({"subject": range(len(age)), "age": age, "structure": "x", "group": "g", "v": values})
    out = age_correlations(table, ["v"], **{"correction": "bonferroni", "alpha": 0.05, **kwargs})
    assert len(out) == 1
    return out.iloc[0]


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


def test_n_rs_p_and_note_match_scipy_on_the_raw_rows(table, expected):
    got = by_key(age_correlations(table, MEASURES))
    np.testing.assert_array_equal(got["n"].to_numpy(), expected["n"].to_numpy())
    np.testing.assert_array_equal(got["note"].to_numpy(), expected["note"].to_numpy())
    np.testing.assert_allclose(got["rs"], expected["rs"], rtol=1e-12, atol=1e-14, equal_nan=True)
    np.testing.assert_allclose(got["p"], expected["p"], rtol=1e-10, atol=0, equal_nan=True)
    assert {(*key, note) for key, note in got.loc[got["note"] != "", "note"].items()} == set(UNTESTED)
    # sanity of the fixture: ties in age, and the strong trends are really there
    assert table.drop_duplicates("subject")["age"].dropna().duplicated().any()
    assert got.loc[("liver", "abdomen", "volume_ml"), "rs"] > 0.8
    assert got.loc[("brain", "head", "volume_ml"), "rs"] < -0.8


def test_n_counts_pairs_with_finite_age_and_measure(table):
    got = by_key(age_correlations(table, MEASURES))
    for (structure, group, measure), n in got["n"].items():
        block = table[(table["structure"] == structure) & (table["group"] == group)]
        assert n == int((block["age"].notna() & block[measure].notna()).sum())
    # two subjects have no age, so no n can reach the number of subjects
    assert got["n"].max() <= table["subject"].nunique() - 2


def test_bonferroni_and_fdr_equal_statsmodels_on_independent_p_values(table, expected):
    got = by_key(age_correlations(table, MEASURES))
    assert int(expected["p"].notna().sum()) == len(got) - len(UNTESTED)
    np.testing.assert_allclose(got["p_bonferroni"], expected["p_bonferroni"], rtol=1e-10, equal_nan=True)
    np.testing.assert_allclose(got["q_fdr"], expected["q_fdr"], rtol=1e-10, equal_nan=True)
    assert (got["p_bonferroni"].dropna() <= 1.0).all()
    assert (got["q_fdr"].dropna() >= got["p"].dropna()).all()
    assert (got["q_fdr"].dropna() <= got["p_bonferroni"].dropna() + 1e-15).all()


def test_bonferroni_by_hand():
    """Two structures, P known: the multiplier is 2; a third one with 5 scans changes nothing."""
    age = np.arange(20.0, 32.0)  # 12 scans
    rows = []
    for name, values in {"a": age[::-1].copy(), "b": np.tile([1.0, 2.0], 6)}.items():
        rows += [
            {"subject": i, "age": a, "structure": name, "group": "g", "v": v}
            for i, (a, v) in enumerate(zip(age, values))
        ]
    rows += [{"subject": i, "age": age[i], "structure": "c", "group": "g", "v": float(i)} for i in range(5)]
    got = age_correlations(pd.DataFrame(rows), ["v"], "bonferroni", 0.05).set_index("structure")
    p_b = stats.spearmanr(age, np.tile([1.0, 2.0], 6)).pvalue
    assert got.at["a", "p"] == pytest.approx(2 / math.factorial(12))  # perfect order: exact P 2/n!
    assert got.at["b", "p_bonferroni"] == pytest.approx(min(1.0, 2 * p_b))
    assert got.at["a", "p_bonferroni"] == pytest.approx(4 / math.factorial(12))
    assert got.at["c", "note"] == "too_few_scans" and np.isnan(got.at["c", "p_bonferroni"])


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


def test_untested_rows_are_nan_uncounted_and_not_significant(table):
    got = by_key(age_correlations(table, MEASURES, correction="fdr_bh", alpha=1.0, partial_covariates=["sex"]))
    assert (got.loc[("rare", "other"), "n"] == 2).all()
    assert (got.loc[("sparse", "other"), "n"] == 6).all()
    assert got.loc[("flat", "other", "volume_ml"), "n"] >= MIN_N  # plenty of pairs, but a constant measure
    for structure, group, measure, note in UNTESTED:
        row = got.loc[(structure, group, measure)]
        assert row["note"] == note
        for column in ("rs", "p", "ci_low", "ci_high", "p_bonferroni", "q_fdr", "rs_partial", "p_partial"):
            assert np.isnan(row[column]), column
        assert not row["significant"]
    # alpha 1: every tested row is significant, the untested ones are not
    assert got["significant"].sum() == (got["note"] == "").sum() == got["p"].notna().sum()
    assert got.loc[got["note"] == "", "rs_partial"].notna().all()


def test_untested_rows_do_not_change_the_multiplier(table):
    """Rows without a test (rare, sparse: too few scans; flat: constant) leave every adjustment unchanged."""
    untested = ["rare", "sparse", "flat"]
    with_untested = by_key(age_correlations(table, ["volume_ml"], "fdr_bh", 0.05))
    tested_only = by_key(age_correlations(table[~table["structure"].isin(untested)], ["volume_ml"], "fdr_bh", 0.05))
    assert len(with_untested) == len(tested_only) + 3
    shared = with_untested.loc[tested_only.index]
    for column in ("p", "p_bonferroni", "q_fdr", "significant"):
        np.testing.assert_array_equal(shared[column].to_numpy(), tested_only[column].to_numpy())
    # with a single tested structure the multiplier is 1
    got = by_key(age_correlations(table[table["structure"].isin(["liver", "rare", "sparse"])], ["volume_ml"]))
    liver = got.loc[("liver", "abdomen", "volume_ml")]
    assert liver["p_bonferroni"] == liver["p"]
    assert liver["q_fdr"] == pytest.approx(liver["p"], rel=1e-12)


def test_min_n_lowered_tests_the_small_structure(table):
    got = by_key(age_correlations(table, ["volume_ml"], min_n=6))
    sparse = got.loc[("sparse", "other", "volume_ml")]
    assert sparse["n"] == 6 and sparse["note"] == ""
    valid = table.loc[table["structure"] == "sparse", ["age", "volume_ml"]].dropna()
    assert sparse["rs"] == pytest.approx(stats.spearmanr(valid["age"], valid["volume_ml"]).statistic)
    assert sparse["p"] == pytest.approx(enumerated_p(valid["age"].to_numpy(), valid["volume_ml"].to_numpy()))
    assert (got["note"] == "").sum() == (by_key(age_correlations(table, ["volume_ml"]))["note"] == "").sum() + 1


def test_constant_age_gives_nan():
    got = one_structure([50.0] * 12, np.arange(12.0))
    assert got["n"] == 12 and got["note"] == "constant"
    assert np.isnan(got["rs"]) and np.isnan(got["p"]) and not got["significant"]


def test_nothing_testable():
    table = pd.DataFrame(
        {
            "subject": range(4),
            "age": [20.0, 30.0, np.nan, 50.0],
            "structure": "x",
            "group": "g",
            "v": [np.nan, np.nan, 1.0, np.nan],
        }
    )
    for correction in ("bonferroni", "fdr_bh"):
        got = age_correlations(table, ["v"], correction, 0.05)
        assert len(got) == 1
        row = got.iloc[0]
        assert row["n"] == 0 and row["note"] == "too_few_scans"
        assert row[["rs", "p", "p_bonferroni", "q_fdr"]].isna().all()
        assert not row["significant"]


# --- small samples: minimum n and exact P --------------------------------------------------------


def test_a_tiny_cohort_is_not_significant():
    """The issue's case: 4 scans in perfect order used to give rs 1, P 0, significant under Bonferroni."""
    age, values = [30.0, 45.0, 60.0, 75.0], [1.0, 2.0, 3.0, 4.0]
    row = one_structure(age, values, alpha=1.0)
    assert row["n"] == 4 and row["note"] == "too_few_scans" and not row["significant"]
    assert row[["rs", "ci_low", "ci_high", "p", "p_bonferroni", "q_fdr"]].isna().all()
    tested = one_structure(age, values, min_n=4)
    assert tested["rs"] == 1.0
    assert tested["p"] == pytest.approx(1 / 12)  # 2 of the 24 pairings are as extreme
    assert tested["p_bonferroni"] == pytest.approx(1 / 12)
    assert not tested["significant"]
    assert np.isnan(tested["ci_low"]) and np.isnan(tested["ci_high"])  # no interval at |rs| = 1


def test_exact_p_of_one_swap_by_hand():
    # one adjacent swap: sum d^2 = 2, rs = 1 - 6*2/(6*35); as extreme: the identity, the 5 adjacent swaps
    # and their 6 mirror images, 12 of 720 pairings
    row = one_structure([30.0, 40.0, 50.0, 60.0, 70.0, 80.0], [1.0, 2.0, 4.0, 3.0, 5.0, 6.0], min_n=6)
    assert row["rs"] == pytest.approx(1 - 12 / 210)
    assert row["p"] == pytest.approx(12 / 720)
    assert row["p"] > 1.5 * stats.spearmanr([1, 2, 3, 4, 5, 6], [1, 2, 4, 3, 5, 6]).pvalue  # t says 0.0048


@pytest.mark.parametrize(
    "age, values",
    [
        ([30, 30, 40, 50, 50, 60], [1.0, 2.0, 2.0, 3.0, 5.0, 4.0]),  # ties in both
        ([30, 40, 40, 40, 50, 60], [3.0, 1.0, 2.0, 2.0, 4.0, 6.0]),  # a triple tie
        ([30, 35, 40, 45, 50, 55, 60], [1.0, 1.0, 1.0, 2.0, 2.0, 3.0, 3.0]),  # n = 7, few distinct values
        ([60, 30, 45, 45, 20, 70], [5.0, 5.0, 1.0, 9.0, 2.0, 2.0]),  # weak relation, asymmetric null
    ],
)
def test_exact_p_equals_enumerated_pairings_with_ties(age, values):
    age = np.asarray(age, dtype=float)
    row = one_structure(age, values, min_n=len(age))
    assert row["note"] == ""
    assert row["rs"] == pytest.approx(stats.spearmanr(age, values).statistic, abs=1e-12)
    assert row["p"] == pytest.approx(enumerated_p(age, values), abs=1e-12)


def test_p_is_exact_or_permuted_up_to_thirty_scans_and_t_above_but_never_zero():
    from ctcohort.rank_null import pairing_p

    rng = np.random.default_rng(4)
    age = rng.integers(20, 90, 40).astype(float)
    values = age + rng.normal(0, 15, 40)
    above = one_structure(age, values)
    assert above["note"] == "" and above["p"] == pytest.approx(stats.spearmanr(age, values).pvalue, rel=1e-12)
    # ages with ties at 12 scans: the permutation P of the centred ranks, not the t approximation
    tied = age[:12].copy()
    tied[1] = tied[0]
    small = one_structure(tied, values[:12])
    ranks = [2 * stats.rankdata(v) - 13 for v in (tied, values[:12])]
    assert small["p"] == pytest.approx(pairing_p(*ranks), rel=1e-12)
    perfect = one_structure(np.arange(10.0), np.arange(10.0) ** 2)
    assert perfect["p"] == pytest.approx(2 / math.factorial(10))  # the exact P of a perfect order; t says 0


@pytest.mark.parametrize("min_n", [2, 0, -1, 3.5, True, "10"])
def test_invalid_min_n(table, min_n):
    with pytest.raises(ValueError, match="min_n"):
        age_correlations(table, MEASURES, min_n=min_n)


# --- structure tables without groups -------------------------------------------------------------


def test_structures_without_group_survive_a_tsv_round_trip(table, tmp_path):
    """An empty group is written as an empty cell and read back as NaN; no row may get lost."""
    path = tmp_path / "measurements.tsv"
    table.assign(group="").to_csv(path, sep="\t", index=False)
    read_back = pd.read_csv(path, sep="\t")
    assert read_back["group"].isna().all()  # what the workflow's script reads
    got = age_correlations(read_back, MEASURES)
    assert len(got) == table["structure"].nunique() * len(MEASURES)
    assert (got["group"] == "").all()
    want = age_correlations(table.assign(group=""), MEASURES)
    pd.testing.assert_frame_equal(got, want)
    assert got["p"].notna().sum() == len(got) - len(UNTESTED)
    without_column = age_correlations(table.drop(columns="group"), MEASURES)
    pd.testing.assert_frame_equal(without_column, want)


def test_some_structures_without_group(table):
    mixed = table.assign(group=table["group"].where(table["structure"] != "liver"))
    got = by_key(age_correlations(mixed, MEASURES))
    assert ("liver", "", "volume_ml") in got.index
    assert len(got) == table["structure"].nunique() * len(MEASURES)


@pytest.mark.parametrize("correction", ["holm", "Bonferroni", "fdr", "", None])
def test_unknown_correction(table, correction):
    with pytest.raises(ValueError, match="correction"):
        age_correlations(table, MEASURES, correction=correction)


def test_significance_is_strictly_below_alpha(table):
    """A Bonferroni p clipped to 1 is not significant even at alpha 1."""
    got = by_key(age_correlations(table, MEASURES, correction="bonferroni", alpha=1.0))
    clipped = got["p_bonferroni"] == 1.0
    assert clipped.any()  # the noise structures reach the cap
    assert not got.loc[clipped, "significant"].any()
    assert got.loc[got["p_bonferroni"] < 1.0, "significant"].all()


# --- spearman_ci --------------------------------------------------------------------------------


def rowwise_spearman(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    rx = stats.rankdata(x, axis=1)
    ry = stats.rankdata(y, axis=1)
    rx -= rx.mean(axis=1, keepdims=True)
    ry -= ry.mean(axis=1, keepdims=True)
    return (rx * ry).sum(axis=1) / np.sqrt((rx * rx).sum(axis=1) * (ry * ry).sum(axis=1))


def test_spearman_ci_covers_the_population_rho_95_percent_of_the_time():
    """Bivariate normal samples: population Spearman rho = (6/pi) arcsin(r/2) (Pearson r)."""
    rng = np.random.default_rng(20000)
    draws = 4000
    old_style_coverage = []
    for n in (10, 30, 100):
        for r in (0.0, 0.5, 0.9):
            x = rng.normal(size=(draws, n))
            y = r * x + math.sqrt(1 - r * r) * rng.normal(size=(draws, n))
            rho = 6 / math.pi * math.asin(r / 2)
            rs = rowwise_spearman(x, y)
            intervals = np.array([spearman_ci(value, n) for value in rs])
            coverage = np.mean((intervals[:, 0] <= rho) & (rho <= intervals[:, 1]))
            # binomial SE of a coverage over 4000 draws is 0.0034; at n = 10 the interval is a little
            # conservative (0.963 over 20,000 draws)
            assert 0.93 <= coverage <= 0.975, (n, r, coverage)
            z = np.arctanh(np.clip(rs, -0.999999, 0.999999))
            pearson_se = 1 / math.sqrt(n - 3)
            old_style_coverage.append(
                np.mean((np.tanh(z - Z975 * pearson_se) <= rho) & (rho <= np.tanh(z + Z975 * pearson_se)))
            )
    # the simulation can tell: Pearson's standard error undercovers at rho 0.9
    assert max(old_style_coverage[2::3]) < 0.93


@pytest.mark.parametrize("n", [-1, 0, 1, 2, 3])
def test_spearman_ci_needs_more_than_three(n):
    low, high = spearman_ci(0.5, n)
    assert np.isnan(low) and np.isnan(high)


@pytest.mark.parametrize("rs", [np.nan, np.inf, -np.inf, 1.0, -1.0])
def test_spearman_ci_undefined(rs):
    low, high = spearman_ci(rs, 50)
    assert np.isnan(low) and np.isnan(high)


@pytest.mark.parametrize("rs, n", [(0.0, 4), (0.3, 10), (-0.7, 25), (0.95, 200), (0.999, 12)])
def test_spearman_ci_contains_rs_and_stays_inside(rs, n):
    low, high = spearman_ci(rs, n)
    assert -1 < low < rs < high < 1
    # symmetric around rs on Fisher's z scale
    assert np.arctanh(high) - np.arctanh(rs) == pytest.approx(np.arctanh(rs) - np.arctanh(low))


def test_spearman_ci_is_wider_than_pearsons_except_at_zero():
    # at rs = 0 Bonett & Wright's standard error is Fisher's 1/sqrt(n - 3): here 1/5
    low, high = spearman_ci(0.0, 28)
    assert high == pytest.approx(math.tanh(Z975 / 5)) and low == pytest.approx(-high)
    for rs in (0.3, -0.6, 0.9):
        low, high = spearman_ci(rs, 28)
        assert math.atanh(high) - math.atanh(low) > 2 * Z975 / 5 * 1.02


def test_spearman_ci_narrows_with_n_and_level():
    widths = [np.subtract(*spearman_ci(0.2, n)[::-1]) for n in (5, 20, 100, 1000)]
    assert all(a > b > 0 for a, b in zip(widths, widths[1:]))
    low95, high95 = spearman_ci(0.4, 30)
    low90, high90 = spearman_ci(0.4, 30, level=0.90)
    assert low95 < low90 < 0.4 < high90 < high95


# --- partial Spearman correlation ---------------------------------------------------------------


def pingouin_partial(frame: pd.DataFrame, covariates: list[str]) -> tuple[float, float]:
    result = pingouin.partial_corr(frame, x="age", y="v", covar=covariates, method="spearman")
    p_column = "p_val" if "p_val" in result.columns else "p-val"
    return float(result["r"].iloc[0]), float(result[p_column].iloc[0])


def test_partial_spearman_equals_pingouin():
    rng = np.random.default_rng(3)
    n = 60
    sex = rng.choice(["M", "F"], n)
    contrast = rng.integers(0, 2, n).astype(float)
    bmi = np.round(rng.normal(26, 4, n))  # tied values
    bmi[[4, 9]] = np.nan
    age = rng.integers(20, 90, n).astype(float) + 10 * (sex == "M")
    values = 0.3 * age + 20 * (sex == "M") + 5 * contrast + bmi + rng.normal(0, 8, n)
    values[[2, 30]] = np.nan
    table = pd.DataFrame(
        {
            "subject": range(n),
            "age": age,
            "sex": sex,
            "contrast": contrast,
            "bmi": bmi,
            "structure": "liver",
            "group": "organ",
            "v": values,
        }
    )
    reference = table.assign(sex_M=(table["sex"] == "M").astype(float))
    for covariates, reference_covariates in (
        (["sex"], ["sex_M"]),
        (["contrast", "bmi"], ["contrast", "bmi"]),
        (["sex", "contrast", "bmi"], ["sex_M", "contrast", "bmi"]),
    ):
        row = age_correlations(table, ["v"], partial_covariates=covariates).iloc[0]
        r, p = pingouin_partial(reference, reference_covariates)
        assert row["rs_partial"] == pytest.approx(r, abs=1e-10), covariates
        assert row["p_partial"] == pytest.approx(p, rel=1e-8), covariates


def test_a_covariate_with_one_category_adjusts_for_nothing():
    """A study of one sex: sex carries no information, and the partial rs is the plain rs (no crash)."""
    rng = np.random.default_rng(5)
    n = 40
    age = rng.integers(20, 90, n).astype(float)
    table = pd.DataFrame(
        {
            "subject": range(n),
            "age": age,
            "sex": "F",
            "structure": "liver",
            "group": "organ",
            "v": 0.2 * age + rng.normal(0, 5, n),
        }
    )
    row = age_correlations(table, ["v"], partial_covariates=["sex"]).iloc[0]
    plain = stats.spearmanr(table["age"], table["v"])
    assert row["rs_partial"] == pytest.approx(plain.statistic, abs=1e-12)
    assert row["p_partial"] == pytest.approx(plain.pvalue, rel=1e-6)


def test_partial_spearman_removes_a_confounder_and_keeps_a_real_effect():
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
    frame = pd.DataFrame({"age": age, "v": confounded, "c": confounder, "i": independent})
    assert (r, p) == pytest.approx(pingouin_partial(frame, ["c"]), rel=1e-8, abs=1e-10)
    both = partial_spearman(age, confounded, np.column_stack([confounder, independent]))
    assert both == pytest.approx(pingouin_partial(frame, ["c", "i"]), rel=1e-8, abs=1e-10)
    assert np.isnan(partial_spearman(age[:3], confounded[:3], confounder[:3, None])[0])


def test_age_correlations_adjust_for_sex_and_contrast_in_the_table():
    rng = np.random.default_rng(5)
    n = 200
    sex = rng.choice(["M", "F"], n)
    age = rng.uniform(20, 60, n) + np.where(sex == "M", 30, 0)
    table = pd.DataFrame(
        {
            "subject": [f"s{i}" for i in range(n)],
            "age": age,
            "sex": sex,
            "contrast": rng.integers(0, 2, n),
            "structure": "liver",
            "group": "organ",
            "volume_ml": np.where(sex == "M", 100.0, 0.0) + rng.normal(0, 5, n),  # sex, not age
        }
    )
    out = age_correlations(table, ["volume_ml"], partial_covariates=["sex", "contrast", "missing_column"])
    assert out.at[0, "rs"] > 0.3
    assert abs(out.at[0, "rs_partial"]) < 0.15
    plain = age_correlations(table, ["volume_ml"])
    assert plain[["rs_partial", "p_partial"]].isna().all().all()
    assert plain.at[0, "note_partial"] == "no_covariates" and plain.at[0, "primary"] == "unadjusted"
    assert out.at[0, "primary"] == "adjusted" and out.at[0, "covariates"] == "sex,contrast"
    # the headline follows the primary analysis: sex explains the correlation, so nothing is significant
    assert not out.at[0, "significant"] and plain.at[0, "significant"]


def test_group_summary_counts_by_hand_and_leaves_combined_structures_out():
    """Counts and medians of a hand-made table, written out by hand; a combined structure is not counted."""
    rows = [
        # structure, group, measure, rs, significant, note
        ("liver", "organ", "volume_ml", 0.5, True, ""),
        ("spleen", "organ", "volume_ml", -0.6, True, ""),
        ("pancreas", "organ", "volume_ml", -0.1, False, ""),
        ("gallbladder", "organ", "volume_ml", np.nan, False, "too_few_scans"),
        ("kidneys", "organ", "volume_ml", -0.7, True, ""),  # combined: left out
        ("hip_left", "bone", "volume_ml", 0.2, False, ""),
        ("liver", "organ", "hu_mean", -0.3, False, ""),
        ("mystery", np.nan, "volume_ml", 0.9, True, ""),
    ]
    correlations = pd.DataFrame(rows, columns=["structure", "group", "measure", "rs", "significant", "note"])
    summary = group_summary(correlations, combined=["kidneys"]).set_index(["group", "measure"])
    assert list(summary.index) == [
        ("organ", "volume_ml"),
        ("organ", "hu_mean"),
        ("bone", "volume_ml"),
        ("", "volume_ml"),
    ]
    organ = summary.loc[("organ", "volume_ml")]
    assert (organ["structures"], organ["tested"], organ["significant_up"], organ["significant_down"]) == (4, 3, 1, 1)
    assert organ["median_abs_rs"] == pytest.approx(0.5)  # median of 0.5, 0.6, 0.1
    assert summary.loc[("organ", "hu_mean"), "significant_down"] == 0
    assert summary.loc[("", "volume_ml"), "significant_up"] == 1


def test_statistics_settings_check_min_n_correction_and_primary_once():
    settings = StatisticsSettings(measures=["hu_mean"], partial_covariates=["sex"], min_n=3)
    assert settings.measures == ("hu_mean",) and settings.partial_covariates == ("sex",)
    for bad, message in (
        ({"min_n": 2}, "min_n must be an integer >= 3"),
        ({"min_n": 10.0}, "min_n"),
        ({"correction": "holm"}, "unknown correction"),
        ({"primary": "both"}, "unknown primary"),
    ):
        with pytest.raises(ValueError, match=message):
            StatisticsSettings(**bad)
    assert StatisticsSettings.from_config({"min_n": 12, "alpha": 0.05}) == StatisticsSettings(min_n=12, alpha=0.05)
