"""Spearman rank correlation of each structure's measures with age, as in the paper.

A structure x measure is tested on exactly the rows counted in n (finite age and finite measure);
cut-off, absent and implausible structures are already NaN in the measurement table and so drop
out of n. What is not tested says why in ``note``:

- ``too_few_scans``: n < min_n (default MIN_N). No rs, CI or P: a handful of scans gives rs = +-1
  by chance, and with n <= 9 not even a perfect relation (exact P 2/n!) passes the paper's
  Bonferroni P < .0001 in a table of 18 or more tests, so such a test would only raise the others'
  multiplier.
- ``constant``: age or the measure takes a single value over the n scans; rs is undefined.
- ``""``: tested.

rs is ``scipy.stats.spearmanr`` (midranks for ties). P is two-sided, P(|rs*| >= |rs|) under
random pairing, by ``ctcohort.rank_null.spearman_p``: exact up to 9 scans (every pairing, ties included)
and up to 20 without ties (the shipped exact distribution), a seeded permutation P up to 30, the t
approximation above; never below 2/n!, the exact minimum.
"""

import logging
import math

import numpy as np
import pandas as pd
from scipy import stats
from statsmodels.stats.multitest import multipletests

from ctcohort.patients import patient_of
from ctcohort.rank_null import PERMUTATION_MAX_N, pairing_p, spearman_p

CORRELATION_COLUMNS = [
    "structure", "group", "measure", "n", "n_patients", "rs", "ci_low", "ci_high", "p", "p_bonferroni", "q_fdr",
    "significant", "rs_partial", "p_partial", "note",
]
CORRECTIONS = ("bonferroni", "fdr_bh")
MIN_N = 10
TOO_FEW_SCANS = "too_few_scans"
CONSTANT = "constant"
log = logging.getLogger(__name__)


def spearman_ci(rs: float, n: int, level: float = 0.95) -> tuple[float, float]:
    """Confidence interval of a Spearman correlation (Bonett & Wright 2000).

    Fisher's z = atanh(rs) with standard error sqrt((1 + rs^2 / 2) / (n - 3)): the Pearson
    formula's 1/sqrt(n - 3) is too narrow for rs (95% intervals cover rho only 86-93% of the time
    at rho 0.8-0.95). NaN for n <= 3, and at |rs| = 1, where z is infinite and no interval of
    this family exists.
    """
    if n <= 3 or not np.isfinite(rs) or abs(rs) >= 1:
        return np.nan, np.nan
    z = np.arctanh(rs)
    half_width = stats.norm.ppf(0.5 + level / 2) * np.sqrt((1 + rs * rs / 2) / (n - 3))
    return float(np.tanh(z - half_width)), float(np.tanh(z + half_width))


def spearman(x: np.ndarray, y: np.ndarray, min_n: int = MIN_N) -> tuple[int, float, float, str]:
    """(n, rs, p, note) over the pairs where both are finite; rs and p are NaN unless note is ""."""
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    n = int(keep.sum())
    if n < max(3, min_n):
        return n, np.nan, np.nan, TOO_FEW_SCANS
    if np.ptp(x) == 0 or np.ptp(y) == 0:
        return n, np.nan, np.nan, CONSTANT
    p, _ = spearman_p(x, y)
    return n, float(stats.spearmanr(x, y).statistic), p, ""


def partial_spearman(x: np.ndarray, y: np.ndarray, covariates: np.ndarray) -> tuple[float, float]:
    """Spearman correlation of x and y adjusted for covariates (columns of a 2-D array), and its P.

    Ranks of x and y are regressed on the ranks of the covariates (with an intercept); rs_partial is
    the Pearson correlation of the residuals. Rows with any non-finite value are dropped. P: where no
    covariate varies, the plain Spearman P (``rank_null.spearman_p``, exact at small n); otherwise a
    seeded permutation P of the residuals at n <= PERMUTATION_MAX_N, and above that the t test on
    n - 2 - k degrees of freedom, never below 2/n!. NaN where undefined.
    """
    keep = np.isfinite(x) & np.isfinite(y) & np.isfinite(covariates).all(axis=1)
    x, y, covariates = x[keep], y[keep], covariates[keep]
    covariates = covariates[:, np.ptp(covariates, axis=0) > 0] if len(x) else covariates
    n, k = len(x), covariates.shape[1]
    dof = n - 2 - k
    if dof < 1 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return np.nan, np.nan
    if k == 0:
        return float(stats.spearmanr(x, y).statistic), spearman_p(x, y)[0]
    design = np.column_stack([np.ones(n), *(stats.rankdata(c) for c in covariates.T)])
    rx, ry = (ranks - design @ np.linalg.lstsq(design, ranks, rcond=None)[0]
              for ranks in (stats.rankdata(x), stats.rankdata(y)))
    denominator = np.sqrt((rx @ rx) * (ry @ ry))
    if denominator <= 1e-12 * n:
        return np.nan, np.nan
    r = float(np.clip(rx @ ry / denominator, -1.0, 1.0))
    if n <= PERMUTATION_MAX_N:
        return r, max(pairing_p(rx, ry), 2 / math.factorial(n))
    t = r * np.sqrt(dof / max(1e-300, 1.0 - r * r))
    return r, max(float(2 * stats.t.sf(abs(t), dof)), 2 / math.factorial(n))


def present_columns(table: pd.DataFrame, names, what: str = "covariates") -> list[str]:
    """The columns of ``names`` that ``table`` has, in order; the others are left out with a warning."""
    present = [c for c in names if c in table.columns]
    if len(present) < len(names):
        log.warning("%s not in the table: %s", what, sorted(set(names) - set(present)))
    return present


def is_categorical(column: pd.Series) -> bool:
    return column.dtype == object or isinstance(column.dtype, (pd.StringDtype, pd.CategoricalDtype))


def encode_covariates(block: pd.DataFrame, covariates: list[str]) -> pd.DataFrame:
    """Covariates as numeric columns: numbers as they are; a text column (sex) as one indicator per category
    except the first in sorted order (named ``column[category]``; a column with one category leaves none);
    NaN where the value is missing."""
    columns = {}
    for name in covariates:
        values = block[name]
        if is_categorical(values):
            missing = values.isna().to_numpy()
            categories = sorted(values.dropna().astype(str).unique())
            for category in categories[1:]:
                indicator = (values.astype(str) == category).to_numpy(dtype=float)
                indicator[missing] = np.nan
                columns[f"{name}[{category}]"] = indicator
        else:
            columns[name] = pd.to_numeric(values, errors="coerce").to_numpy(dtype=float)
    return pd.DataFrame(columns, index=block.index)


def structure_blocks(measurements: pd.DataFrame):
    """(structure, group, rows) in table order. A missing group is the group "": groupby drops NaN keys,
    and a structure table without groups would silently lose every row."""
    group = measurements["group"] if "group" in measurements.columns else pd.Series("", measurements.index)
    measurements = measurements.assign(group=group.astype(object).fillna("").astype(str))
    for (structure, group), block in measurements.groupby(["structure", "group"], sort=False):
        yield structure, group, block


def correct_p_values(table: pd.DataFrame, p: str, bonferroni: str, fdr: str, tested: pd.Series) -> None:
    """Columns ``bonferroni`` (P x the number of tested rows, at most 1) and ``fdr`` (Benjamini-Hochberg q)
    over the rows where ``tested``; NaN elsewhere."""
    table[bonferroni] = np.nan
    table[fdr] = np.nan
    if tested.any():
        table.loc[tested, bonferroni] = np.minimum(1.0, table.loc[tested, p] * tested.sum())
        table.loc[tested, fdr] = multipletests(table.loc[tested, p], method="fdr_bh")[1]


def write_table(table: pd.DataFrame, path) -> None:
    """A statistics table as the workflow writes them all: TSV, NaN as "NaN", 6 significant digits."""
    table.to_csv(path, sep="\t", index=False, na_rep="NaN", float_format="%.6g")


def age_correlations(
    measurements: pd.DataFrame,
    measures: list[str],
    correction: str = "bonferroni",
    alpha: float = 0.0001,
    partial_covariates: list[str] = (),
    min_n: int = MIN_N,
) -> pd.DataFrame:
    """One row per structure x measure (columns CORRELATION_COLUMNS; see the module docstring).

    ``measurements``: long table with subject, age, structure, group and the measure columns; a
    missing or empty group (an empty TSV cell reads back as NaN) is the group "".
    p_bonferroni multiplies by the number of tested rows (note ""); q_fdr is Benjamini-Hochberg
    over the same tests; untested rows are NaN and never significant. ``significant`` applies
    ``alpha`` to the chosen correction. ci_low/ci_high: spearman_ci. rs_partial / p_partial
    adjust the tested rows for the ``partial_covariates`` found in the table (uncorrected P; see
    partial_spearman).
    """
    if correction not in CORRECTIONS:
        raise ValueError(f"unknown correction {correction!r}; choose one of {', '.join(CORRECTIONS)}")
    if isinstance(min_n, bool) or not isinstance(min_n, (int, np.integer)) or min_n < 3:
        raise ValueError(f"min_n must be an integer >= 3 (Spearman's rs needs 3 scans), got {min_n!r}")
    present = present_columns(measurements, partial_covariates, "partial correlation covariates")
    rows = []
    for structure, group, block in structure_blocks(measurements):
        age = block["age"].to_numpy(dtype=float)
        covariates = encode_covariates(block, present).to_numpy(dtype=float)
        patients = patient_of(block).to_numpy()
        for measure in measures:
            values = block[measure].to_numpy(dtype=float)
            n, rs, p, note = spearman(age, values, min_n)
            n_patients = len(set(patients[np.isfinite(age) & np.isfinite(values)]))
            tested = note == "" and bool(present)
            partial = partial_spearman(age, values, covariates) if tested else (np.nan, np.nan)
            rows.append((structure, group, measure, n, n_patients, rs, *spearman_ci(rs, n), p, *partial, note))
    table = pd.DataFrame(rows, columns=[*CORRELATION_COLUMNS[:9], "rs_partial", "p_partial", "note"])
    tested = table["note"] == ""
    correct_p_values(table, "p", "p_bonferroni", "q_fdr", tested)
    adjusted = table["p_bonferroni"] if correction == "bonferroni" else table["q_fdr"]
    table["significant"] = (adjusted < alpha).fillna(False).astype(bool)
    untested = ", ".join(f"{count} {note}" for note, count in table.loc[~tested, "note"].value_counts().items())
    log.info("%d of %d structure x measure rows tested (min_n %d); not tested: %s", tested.sum(), len(table),
             min_n, untested or "none")
    return table[CORRELATION_COLUMNS]


GROUP_SUMMARY_COLUMNS = [
    "group", "measure", "structures", "tested", "significant_up", "significant_down", "median_abs_rs",
]


def group_summary(correlations: pd.DataFrame, combined=()) -> pd.DataFrame:
    """Per structure group (organ, bone, muscle, vessel, then any other group; "" last) and measure, from
    ``age_correlations``' table: structures (rows of the table), tested (note ""), significant_up /
    significant_down (significant with rs > 0 / rs < 0) and median_abs_rs (median |rs| over the tested
    rows; NaN where none is tested). The structures named in ``combined`` are left out: a combined
    structure repeats its members, and counting both would count one effect twice."""
    from ctcohort.structures import GROUPS

    table = correlations[~correlations["structure"].isin(list(combined))].copy()
    table["group"] = table["group"].astype(object).fillna("").astype(str)
    table["tested"] = table["note"].astype(object).fillna("").astype(str) == ""
    significant = table["significant"].astype(str).str.lower() == "true"
    table["up"] = significant & (table["rs"] > 0)
    table["down"] = significant & (table["rs"] < 0)
    table["abs_rs"] = table["rs"].abs().where(table["tested"])
    present = set(table["group"])
    order = [g for g in GROUPS if g in present] + sorted(present - set(GROUPS) - {""}) + (
        [""] if "" in present else [])
    rows = []
    for group in order:
        for measure in pd.unique(table["measure"]):
            block = table[(table["group"] == group) & (table["measure"] == measure)]
            if block.empty:
                continue
            rows.append((group, measure, len(block), int(block["tested"].sum()), int(block["up"].sum()),
                         int(block["down"].sum()), float(block["abs_rs"].median())))
    return pd.DataFrame(rows, columns=GROUP_SUMMARY_COLUMNS)


def read_table(path) -> pd.DataFrame:
    """A table as ``write_table`` wrote it: "NaN" is a missing number; an empty cell of a text column
    (note, group, members) stays an empty string."""
    table = pd.read_csv(path, sep="\t", keep_default_na=False, na_values=["NaN"])
    for column in ("note", "group", "members"):
        if column in table.columns:
            table[column] = table[column].astype(object).where(table[column].notna(), "").astype(str)
    return table
