"""Spearman rank correlation of each structure's measures with age, as in the paper.

rs and p are scipy.stats.spearmanr on exactly the rows counted in n (finite
age and finite measure); cut-off, absent and implausible structures are
already NaN in the measurement table and so drop out of n.
"""

import logging

import numpy as np
import pandas as pd
from scipy import stats
from statsmodels.stats.multitest import multipletests

CORRELATION_COLUMNS = [
    "structure", "group", "measure", "n", "rs", "ci_low", "ci_high", "p", "p_bonferroni", "q_fdr",
    "significant", "rs_partial", "p_partial",
]
CORRECTIONS = ("bonferroni", "fdr_bh")
log = logging.getLogger(__name__)


def fisher_ci(rs: float, n: int, level: float = 0.95) -> tuple[float, float]:
    """Confidence interval of a correlation by Fisher's z transform (standard error 1/sqrt(n-3))."""
    if n <= 3 or not np.isfinite(rs):
        return np.nan, np.nan
    z = np.arctanh(np.clip(rs, -0.999999, 0.999999))
    half_width = stats.norm.ppf(0.5 + level / 2) / np.sqrt(n - 3)
    return float(np.tanh(z - half_width)), float(np.tanh(z + half_width))


def spearman(x: np.ndarray, y: np.ndarray) -> tuple[int, float, float]:
    """(n, rs, p) over the pairs where both are finite; NaN where undefined (n < 3 or a constant)."""
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    n = int(keep.sum())
    if n < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return n, np.nan, np.nan
    result = stats.spearmanr(x, y)
    return n, float(result.statistic), float(result.pvalue)


def partial_spearman(x: np.ndarray, y: np.ndarray, covariates: np.ndarray) -> tuple[float, float]:
    """Spearman correlation of x and y adjusted for covariates (columns of a 2-D array), and its P.

    Ranks of x and y are regressed on the ranks of the covariates (with an intercept); rs_partial is
    the Pearson correlation of the residuals, tested with n - 2 - k degrees of freedom. Rows with any
    non-finite value are dropped. NaN where undefined.
    """
    keep = np.isfinite(x) & np.isfinite(y) & np.isfinite(covariates).all(axis=1)
    n, k = int(keep.sum()), covariates.shape[1]
    dof = n - 2 - k
    if dof < 1:
        return np.nan, np.nan
    design = np.column_stack([np.ones(n), *(stats.rankdata(c) for c in covariates[keep].T)])
    residuals = []
    for values in (x[keep], y[keep]):
        ranks = stats.rankdata(values)
        residuals.append(ranks - design @ np.linalg.lstsq(design, ranks, rcond=None)[0])
    rx, ry = residuals
    denominator = np.sqrt((rx @ rx) * (ry @ ry))
    if denominator <= 1e-12 * n:
        return np.nan, np.nan
    r = float(np.clip(rx @ ry / denominator, -1.0, 1.0))
    t = r * np.sqrt(dof / max(1e-300, 1.0 - r * r))
    return r, float(2 * stats.t.sf(abs(t), dof))


def covariate_matrix(block: pd.DataFrame, covariates: list[str]) -> np.ndarray:
    """Covariate columns as numbers: numeric as they are, categories (e.g. sex) as indicator columns."""
    if not covariates:
        return np.empty((len(block), 0))
    frame = pd.get_dummies(block[covariates], drop_first=True, dummy_na=False, dtype=float)
    for column in covariates:
        if block[column].dtype == object or isinstance(block[column].dtype, pd.StringDtype):
            frame.loc[block[column].isna().to_numpy(), frame.columns.str.startswith(f"{column}_")] = np.nan
    return frame.to_numpy(dtype=float)


def age_correlations(
    measurements: pd.DataFrame,
    measures: list[str],
    correction: str = "bonferroni",
    alpha: float = 0.0001,
    partial_covariates: list[str] = (),
) -> pd.DataFrame:
    """One row per structure x measure (columns CORRELATION_COLUMNS).

    ``measurements``: long table with subject, age, structure, group and the measure columns.
    p_bonferroni multiplies by the number of tests with a p value in this table;
    q_fdr is Benjamini-Hochberg over the same tests. ``significant`` applies
    ``alpha`` to the chosen correction. rs_partial / p_partial adjust for the
    ``partial_covariates`` found in the table (uncorrected P; see partial_spearman).
    """
    if correction not in CORRECTIONS:
        raise ValueError(f"unknown correction {correction!r}; choose one of {', '.join(CORRECTIONS)}")
    present = [c for c in partial_covariates if c in measurements.columns]
    if len(present) < len(partial_covariates):
        log.warning("partial correlation covariates not in the table: %s",
                    sorted(set(partial_covariates) - set(present)))
    rows = []
    for (structure, group), block in measurements.groupby(["structure", "group"], sort=False):
        age = block["age"].to_numpy(dtype=float)
        covariates = covariate_matrix(block, present)
        for measure in measures:
            values = block[measure].to_numpy(dtype=float)
            n, rs, p = spearman(age, values)
            partial = partial_spearman(age, values, covariates) if present else (np.nan, np.nan)
            rows.append((structure, group, measure, n, rs, *fisher_ci(rs, n), p, *partial))
    table = pd.DataFrame(rows, columns=[*CORRELATION_COLUMNS[:8], "rs_partial", "p_partial"])
    tested = table["p"].notna()
    table["p_bonferroni"] = np.minimum(1.0, table["p"] * tested.sum())
    table["q_fdr"] = np.nan
    if tested.any():
        table.loc[tested, "q_fdr"] = multipletests(table.loc[tested, "p"], method="fdr_bh")[1]
    adjusted = table["p_bonferroni"] if correction == "bonferroni" else table["q_fdr"]
    table["significant"] = (adjusted < alpha).fillna(False).astype(bool)
    return table[CORRELATION_COLUMNS]
