"""Spearman rank correlation of each structure's measures with age, as in the paper.

rs and p are scipy.stats.spearmanr on exactly the rows counted in n (finite
age and finite measure); cut-off, absent and implausible structures are
already NaN in the measurement table and so drop out of n.
"""

import numpy as np
import pandas as pd
from scipy import stats
from statsmodels.stats.multitest import multipletests

CORRELATION_COLUMNS = [
    "structure", "group", "measure", "n", "rs", "ci_low", "ci_high", "p", "p_bonferroni", "q_fdr",
    "significant",
]
CORRECTIONS = ("bonferroni", "fdr_bh")


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


def age_correlations(
    measurements: pd.DataFrame,
    measures: list[str],
    correction: str = "bonferroni",
    alpha: float = 0.0001,
) -> pd.DataFrame:
    """One row per structure x measure (columns CORRELATION_COLUMNS).

    ``measurements``: long table with subject, age, structure, group and the measure columns.
    p_bonferroni multiplies by the number of tests with a p value in this table;
    q_fdr is Benjamini-Hochberg over the same tests. ``significant`` applies
    ``alpha`` to the chosen correction.
    """
    if correction not in CORRECTIONS:
        raise ValueError(f"unknown correction {correction!r}; choose one of {', '.join(CORRECTIONS)}")
    rows = []
    for (structure, group), block in measurements.groupby(["structure", "group"], sort=False):
        age = block["age"].to_numpy(dtype=float)
        for measure in measures:
            n, rs, p = spearman(age, block[measure].to_numpy(dtype=float))
            rows.append((structure, group, measure, n, rs, *fisher_ci(rs, n), p))
    table = pd.DataFrame(rows, columns=CORRELATION_COLUMNS[:8])
    tested = table["p"].notna()
    table["p_bonferroni"] = np.minimum(1.0, table["p"] * tested.sum())
    table["q_fdr"] = np.nan
    if tested.any():
        table.loc[tested, "q_fdr"] = multipletests(table.loc[tested, "p"], method="fdr_bh")[1]
    adjusted = table["p_bonferroni"] if correction == "bonferroni" else table["q_fdr"]
    table["significant"] = (adjusted < alpha).fillna(False).astype(bool)
    return table[CORRELATION_COLUMNS]
