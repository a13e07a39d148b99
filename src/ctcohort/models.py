"""Covariate-adjusted, sex-stratified and regression statistics of each structure's measures with age.

Three tables, one row per structure x group x measure, each tested on exactly the rows counted in its n.
Rows below ``min_n`` (note ``too_few_scans``) or with a constant age or measure (note ``constant``) are not
tested, as in ``ctcohort.stats.age_correlations``; their statistics are NaN and they do not count in the
corrections.

Covariates (``StatisticsSettings.adjusted_for``: ``statistics.partial_covariates``, with the estimated phase for
contrast under ``statistics.phase_covariate``): a numeric column (age-independent numbers such as contrast 0/1)
enters as it is; a text column (sex, phase) enters as indicator columns, one per category except the first in
sorted order (M/F: one column, "M"). A covariate or indicator column that is constant over a row's scans
(every scan F, every scan native) adjusts for nothing and is left out; ``k`` counts the covariate columns
used. A scan with a missing covariate value is left out of the adjusted statistics (complete cases).

partial_correlations (``partial_table``)
    Partial Spearman correlation of age and the measure given the covariates: age, the measure and every
    covariate column are ranked (midranks), and rs_partial is the Pearson correlation of the residuals of
    the age ranks and the measure ranks, each regressed on the covariate ranks with an intercept (the
    same number as the partial correlation from the inverse correlation matrix of the ranks). P: two-sided,
    as ``stats.partial_spearman`` computes it (the plain Spearman P where no covariate varies; a permutation
    P of the residuals at small n; t on n - 2 - k degrees of freedom above). 95% CI: Fisher z with Bonett &
    Wright's variance, atanh(r) +- 1.96 sqrt((1 + r^2 / 2) / (n - 3 - k)). p_bonferroni and q_fdr
    (Benjamini-Hochberg) over the tested rows of
    this table only.

by_sex (``by_sex_table``)
    Spearman rs per sex (M, F) with P as in age_correlations and Bonett & Wright's CI (``spearman_ci``), and
    a test of the difference: z = (atanh rs_M - atanh rs_F) / sqrt(se_M^2 + se_F^2) with the Bonett-Wright
    variance se^2 = (1 + rs^2 / 2) / (n - 3) of each sex, two-sided normal P (p_diff), corrected over the
    rows where both sexes are tested. A sex below min_n or constant is not tested (note_M / note_F); the
    difference needs both, and neither rs at +-1 (atanh infinite).

regression (``regression_table``)
    OLS (statsmodels formula API) of the measure on age in decades plus the covariates (numeric as they
    are; text as categories with treatment coding, the first in sorted order the reference, as patsy's
    C() codes them), heteroscedasticity-consistent HC3 standard errors: coef_per_decade with its 95% CI
    and P (normal reference, as statsmodels reports for robust covariances; at n <= PERMUTATION_MAX_N,
    where that reference is anti-conservative, P is a seeded Freedman-Lane permutation P of the HC3 t
    statistic instead, ``hc3_permutation_p``), and percent_per_decade = 100 x coef_per_decade / the median
    of the measure over the row's scans. The spline model replaces age by a natural cubic regression spline
    (patsy ``cr(age, df=spline_df, constraints="center")``: spline_df columns, spline_df + 1 knots at the
    quantiles of the distinct ages, linear beyond the boundary knots, so the linear model is nested in it);
    p_nonlinear is the F test of the spline model against the linear one (``nonlinearity_f_test``: F on
    spline_df - 1 and the spline model's residual degrees of freedom), uncorrected, with
    p_nonlinear_bonferroni and q_nonlinear_fdr over every fitted row (its own family). Where a scan has
    leverage 1 (a covariate category held by a single scan) HC3 is undefined: note ``leverage_one``, the
    coefficient and the spline test are kept, CI and P are NaN and the row is not in the corrections of P.
    peak_age and trough_age: the age where the fitted spline curve has its maximum / minimum over the
    observed ages (a grid of 1001 ages), when that lies strictly inside the range; NaN where it lies at an
    end (a monotone curve). Read them together with p_nonlinear: a linear trend plus noise can bend the
    spline.

n_patients: the distinct patients (``ctcohort.patients.patient_of``) among the rows counted in n; the
workflow passes one scan per patient, so it equals n there.
"""

import logging

import numpy as np
import pandas as pd
from scipy import stats

from ctcohort.patients import patient_of
from ctcohort.rank_null import PERMUTATION_MAX_N, PERMUTATION_RESAMPLES, permutation_orders, smallest_p
from ctcohort.stats import (
    CONSTANT,
    DEFAULTS,
    PARTIAL_ROW_COLUMNS,
    STRUCTURE_MEASURE,
    TOO_FEW_SCANS,
    StatisticsSettings,
    age_correlations,
    check_tests,
    correct_p_values,
    is_categorical,
    partial_rows,
    present_columns,
    spearman,
    spearman_ci,
    structure_blocks,
    structure_families,
)

PARTIAL_COLUMNS = [*PARTIAL_ROW_COLUMNS[:-1], "p_bonferroni", "q_fdr", "significant", "note"]
SEXES = ("M", "F")
BY_SEX_COLUMNS = [
    *STRUCTURE_MEASURE,
    *(f"{name}_{sex}" for sex in SEXES for name in ("n", "rs", "ci_low", "ci_high", "p")),
    "z_diff",
    "p_diff",
    "p_diff_bonferroni",
    "q_diff_fdr",
    "note_M",
    "note_F",
]
REGRESSION_COLUMNS = [
    *STRUCTURE_MEASURE,
    "n",
    "n_patients",
    "covariates",
    "median",
    "coef_per_decade",
    "ci_low",
    "ci_high",
    "p",
    "percent_per_decade",
    "p_bonferroni",
    "q_fdr",
    "f_nonlinear",
    "df_nonlinear",
    "p_nonlinear",
    "p_nonlinear_bonferroni",
    "q_nonlinear_fdr",
    "peak_age",
    "trough_age",
    "note",
]
LEVERAGE_ONE = "leverage_one"
GRID_POINTS = 1001
log = logging.getLogger(__name__)


def partial_table(
    measurements: pd.DataFrame,
    measures: list[str],
    covariates: list[str],
    correction: str = DEFAULTS.correction,
    alpha: float = DEFAULTS.alpha,
    min_n: int = DEFAULTS.min_n,
) -> pd.DataFrame:
    """results/stats/partial_correlations.tsv (columns PARTIAL_COLUMNS; module docstring)."""
    check_tests(correction, min_n)
    present = present_columns(measurements, covariates)
    table = partial_rows(measurements, measures, present, min_n)
    tested = table["note"] == ""
    correct_p_values(table, "p", "p_bonferroni", "q_fdr", tested)
    adjusted = table["p_bonferroni"] if correction == "bonferroni" else table["q_fdr"]
    table["significant"] = (adjusted < alpha).fillna(False).astype(bool)
    log.info("partial correlations given %s: %d of %d rows tested", present, tested.sum(), len(table))
    return table[PARTIAL_COLUMNS]


def spearman_difference(rs_a: float, n_a: int, rs_b: float, n_b: int) -> tuple[float, float]:
    """(z, two-sided P) of rs_a - rs_b on Fisher's z with Bonett & Wright's variance of each rs."""
    if min(n_a, n_b) <= 3 or not (np.isfinite(rs_a) and np.isfinite(rs_b)) or max(abs(rs_a), abs(rs_b)) >= 1:
        return np.nan, np.nan
    variance = (1 + rs_a**2 / 2) / (n_a - 3) + (1 + rs_b**2 / 2) / (n_b - 3)
    z = (np.arctanh(rs_a) - np.arctanh(rs_b)) / np.sqrt(variance)
    return float(z), float(2 * stats.norm.sf(abs(z)))


def by_sex_table(measurements: pd.DataFrame, measures: list[str], min_n: int = DEFAULTS.min_n) -> pd.DataFrame:
    """results/stats/by_sex.tsv (columns BY_SEX_COLUMNS; module docstring). Without a sex column every
    row is untested (note_M / note_F "no_sex")."""
    check_tests(DEFAULTS.correction, min_n)
    families = structure_families(measurements)
    rows = []
    for structure, group, block in structure_blocks(measurements):
        sex = block["sex"].astype(object) if "sex" in block.columns else pd.Series(np.nan, block.index)
        for measure in measures:
            row, results = [structure, group, families[structure], measure], {}
            for s in SEXES:
                part = block[(sex == s).to_numpy()]
                n, rs, p, note = spearman(part["age"].to_numpy(dtype=float), part[measure].to_numpy(dtype=float), min_n)
                if "sex" not in block.columns:
                    note = "no_sex"
                results[s] = (n, rs, note)
                row += [n, rs, *spearman_ci(rs, n), p]
            (n_m, rs_m, note_m), (n_f, rs_f, note_f) = results["M"], results["F"]
            z, p_diff = spearman_difference(rs_m, n_m, rs_f, n_f) if note_m == note_f == "" else (np.nan, np.nan)
            rows.append((*row, z, p_diff, note_m, note_f))
    table = pd.DataFrame(rows, columns=[*BY_SEX_COLUMNS[:-4], "note_M", "note_F"])
    correct_p_values(table, "p_diff", "p_diff_bonferroni", "q_diff_fdr", table["p_diff"].notna())
    log.info("by sex: %d of %d rows with both sexes tested", table["p_diff"].notna().sum(), len(table))
    return table[BY_SEX_COLUMNS]


def _curve_extrema(spline, frame: pd.DataFrame) -> tuple[float, float]:
    """(peak_age, trough_age) of the fitted spline's age curve over the observed ages; NaN at an end."""
    grid = np.linspace(frame["age"].min(), frame["age"].max(), GRID_POINTS)
    new = pd.DataFrame({c: np.repeat(frame[c].iloc[:1].to_numpy(), GRID_POINTS) for c in frame.columns})
    new["age"] = grid
    curve = np.asarray(spline.predict(new), dtype=float)
    ages = []
    for index in (int(np.argmax(curve)), int(np.argmin(curve))):
        ages.append(float(grid[index]) if 0 < index < GRID_POINTS - 1 else np.nan)
    return ages[0], ages[1]


def fit_age_models(frame: pd.DataFrame, spline_df: int = DEFAULTS.spline_df):
    """(linear, spline) statsmodels OLS results on ``frame`` (columns y, age and covariates c0, c1, ...;
    text covariates as pandas Categorical columns):
    y ~ age_decades + covariates and y ~ cr(age, df=spline_df) + covariates (classical covariance; the
    caller asks the linear one for HC3)."""
    import statsmodels.formula
    import statsmodels.formula.api as smf

    # a categorical column (pandas Categorical) is coded as C() codes it: treatment, first level the
    # reference; unwrapped, patsy takes the codes as they are instead of looking at every value
    terms = "".join(f" + {c}" for c in frame.columns if c not in ("y", "age"))
    # cr() is patsy's; statsmodels picks its formula engine from the environment (SM_FORMULA_ENGINE)
    engine = statsmodels.formula.options.formula_engine
    statsmodels.formula.options.formula_engine = "patsy"
    try:
        linear = smf.ols(f"y ~ I(age / 10){terms}", data=frame).fit()
        spline = smf.ols(f"y ~ cr(age, df={spline_df}, constraints='center'){terms}", data=frame).fit()
    finally:
        statsmodels.formula.options.formula_engine = engine
    return linear, spline


def _regression_frame(block: pd.DataFrame, measure: str, present: list[str]) -> tuple[pd.DataFrame, list[str]]:
    """(frame, categorical): y, age, patient and the covariates c0, c1, ... of the complete rows; text covariates
    as pandas Categorical columns; covariates constant over the rows left out."""
    frame = pd.DataFrame({"y": block[measure].to_numpy(dtype=float), "age": block["age"].to_numpy(dtype=float)})
    categorical = []
    for i, name in enumerate(present):
        if is_categorical(block[name]):
            values = pd.Categorical(block[name].to_numpy(dtype=object))
            categorical.append(f"c{i}")
        else:
            values = pd.to_numeric(block[name], errors="coerce").to_numpy(dtype=float)
        frame[f"c{i}"] = values
    frame["patient"] = patient_of(block).to_numpy()
    frame = frame.dropna().reset_index(drop=True)
    frame = frame[[c for c in frame.columns if c in ("y", "age", "patient") or frame[c].nunique() > 1]]
    return frame, categorical


def _regression_note(frame: pd.DataFrame, categorical: list[str], spline_df: int, min_n: int) -> str:
    n_parameters = (
        1
        + spline_df
        + sum(frame[c].nunique() - 1 if c in categorical else 1 for c in frame.columns if c.startswith("c"))
    )
    if len(frame) < min_n:
        return TOO_FEW_SCANS
    if np.ptp(frame["age"]) == 0 or np.ptp(frame["y"]) == 0:
        return CONSTANT
    if len(frame) < n_parameters + 2 or frame["age"].nunique() < spline_df + 2:
        return TOO_FEW_SCANS
    return ""


def nonlinearity_f_test(linear, spline) -> tuple[float, float, float]:
    """(F, numerator df, P) of the spline model against the nested linear one, from the classical fits:
    F = ((RSS_linear - RSS_spline) / df) / (RSS_spline / df_resid_spline). Exact under normal errors; the
    chi-squared likelihood-ratio test it replaces rejected 8.75% at .05 for a truly linear trend at n = 30."""
    dof = spline.df_model - linear.df_model
    f = max(0.0, (linear.ssr - spline.ssr) / dof) / (spline.ssr / spline.df_resid)
    return float(f), float(dof), float(stats.f.sf(f, dof, spline.df_resid))


def hc3_permutation_p(
    y: np.ndarray, exog: np.ndarray, index: int, seed: int = 0, resamples: int = PERMUTATION_RESAMPLES
) -> float:
    """Freedman-Lane permutation P of coefficient ``index`` of the OLS of y on exog, with the HC3 t statistic:
    the residuals of the model without that column are permuted, added back to its fitted values, and the
    full model refitted; P = (b + 1) / (B + 1). Valid at small n, where HC3's normal reference is not."""
    reduced = np.delete(exog, index, axis=1)
    fitted = reduced @ np.linalg.lstsq(reduced, y, rcond=None)[0]
    residual = y - fitted
    pseudo_inverse = np.linalg.pinv(exog)
    contrast = pseudo_inverse[index]
    annihilator = np.eye(len(y)) - exog @ pseudo_inverse
    weight = contrast**2 / np.clip(1 - np.diag(exog @ pseudo_inverse), 1e-12, None) ** 2

    def t_statistics(ys: np.ndarray) -> np.ndarray:  # ys: n x B
        errors = annihilator @ ys
        return (contrast @ ys) / np.sqrt(np.maximum(weight @ errors**2, 1e-300))

    observed = abs(float(t_statistics(y[:, None])[0]))
    exceed = 0
    for order in permutation_orders(len(y), resamples, seed):
        exceed += int((np.abs(t_statistics((fitted[:, None] + residual[order].T))) >= observed * (1 - 1e-9)).sum())
    return (exceed + 1) / (resamples + 1)


def _age_slope(linear, min_p: float, seed: int):
    """(coef, ci_low, ci_high, p, note) of the age term with HC3; at n <= PERMUTATION_MAX_N the P is
    Freedman-Lane's permutation P (HC3's normal reference is anti-conservative at small n)."""
    term = "I(age / 10)"
    exog = linear.model.exog
    index = linear.model.exog_names.index(term)
    coef = float(np.asarray(linear.params)[index])
    leverage = np.einsum("ij,jk,ik->i", exog, linear.normalized_cov_params, exog)
    if leverage.max() > 1 - 1e-8:
        # a scan fitted exactly (a covariate category held by one scan): its HC3 weight e^2 / (1 - h)^2 is
        # 0/0, and so is every robust standard error
        return coef, np.nan, np.nan, np.nan, LEVERAGE_ONE
    robust = linear.get_robustcov_results(cov_type="HC3", use_t=False)
    low, high = np.asarray(robust.conf_int())[index]
    p = float(np.asarray(robust.pvalues)[index])
    if len(exog) <= PERMUTATION_MAX_N:
        p = hc3_permutation_p(linear.model.endog, exog, index, seed)
    return coef, float(low), float(high), max(p, min_p), ""


def regression_row(frame: pd.DataFrame, categorical: list[str], spline_df: int, min_n: int, seed: int) -> dict:
    """The statistics of one structure x measure (REGRESSION_COLUMNS from n on)."""
    n = len(frame)
    median = float(frame["y"].median()) if n else np.nan
    row = {
        "n": n,
        "n_patients": int(frame["patient"].nunique()),
        "median": median,
        **dict.fromkeys(REGRESSION_COLUMNS[REGRESSION_COLUMNS.index("coef_per_decade") :], np.nan),
    }
    row["note"] = _regression_note(frame, categorical, spline_df, min_n)
    if row["note"]:
        return row
    linear, spline = fit_age_models(frame.drop(columns="patient"), spline_df)
    coef, low, high, p, note = _age_slope(linear, smallest_p(n), seed)
    f, dof, p_nonlinear = nonlinearity_f_test(linear, spline)
    row.update(
        coef_per_decade=coef,
        ci_low=low,
        ci_high=high,
        p=p,
        note=note,
        percent_per_decade=100 * coef / median if median != 0 else np.nan,
        f_nonlinear=f,
        df_nonlinear=dof,
        p_nonlinear=p_nonlinear,
    )
    row["peak_age"], row["trough_age"] = _curve_extrema(spline, frame.drop(columns="patient"))
    return row


def regression_table(
    measurements: pd.DataFrame,
    measures: list[str],
    covariates: list[str],
    *,  # by name: seed, spline_df and min_n are all integers, easily swapped by position
    seed: int = DEFAULTS.seed,
    spline_df: int = DEFAULTS.spline_df,
    min_n: int = DEFAULTS.min_n,
) -> pd.DataFrame:
    """results/stats/regression.tsv (columns REGRESSION_COLUMNS; module docstring)."""
    check_tests(DEFAULTS.correction, min_n)
    if isinstance(spline_df, bool) or not isinstance(spline_df, (int, np.integer)) or spline_df < 2:
        raise ValueError(f"spline_df must be an integer >= 2, got {spline_df!r}")
    present = present_columns(measurements, covariates)
    families = structure_families(measurements)
    rows = []
    for structure, group, block in structure_blocks(measurements):
        for measure in measures:
            frame, categorical = _regression_frame(block, measure, present)
            names = [present[int(c[1:])] for c in frame.columns if c.startswith("c")]
            rows.append(
                {
                    "structure": structure,
                    "group": group,
                    "family": families[structure],
                    "measure": measure,
                    "covariates": ",".join(names),
                    **regression_row(frame, categorical, spline_df, min_n, seed),
                }
            )
    table = pd.DataFrame(rows, columns=REGRESSION_COLUMNS)
    tested = table["note"] == ""
    correct_p_values(table, "p", "p_bonferroni", "q_fdr", tested)
    # the spline test is its own family: every fitted row (a leverage-one row keeps its spline test)
    correct_p_values(table, "p_nonlinear", "p_nonlinear_bonferroni", "q_nonlinear_fdr", table["p_nonlinear"].notna())
    log.info("regression on age given %s: %d of %d rows fitted", present, tested.sum(), len(table))
    return table[REGRESSION_COLUMNS]


def statistics_table(analysis: str, measurements: pd.DataFrame, settings: StatisticsSettings) -> pd.DataFrame:
    """The table of one cross-sectional analysis (the rule that writes it: age_correlations,
    partial_correlations, by_sex or regression) with the statistics stage's settings."""
    measures, covariates, min_n = settings.measures, settings.adjusted_for, settings.min_n
    correction, alpha = settings.correction, settings.alpha
    if analysis == "age_correlations":
        return age_correlations(
            measurements,
            measures,
            correction,
            alpha,
            partial_covariates=covariates,
            min_n=min_n,
            primary=settings.primary,
        )
    if analysis == "partial_correlations":
        return partial_table(measurements, measures, covariates, correction=correction, alpha=alpha, min_n=min_n)
    if analysis == "by_sex":
        return by_sex_table(measurements, measures, min_n=min_n)
    if analysis == "regression":
        return regression_table(
            measurements, measures, covariates, seed=settings.seed, spline_df=settings.spline_df, min_n=min_n
        )
    raise ValueError(f"unknown analysis {analysis!r}")
