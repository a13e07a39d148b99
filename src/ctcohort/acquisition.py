"""Acquisition (tube voltage, kernel, scanner, year, contrast phase) checked as a confounder of age.

When the protocol mix changes with age (a lower kVp for smaller, younger patients; scanners replaced over
the years a cohort spans), part of an "age effect" on attenuation is the scanner. Three tables, on one
scan per patient (the primary analysis's scans):

association (``association_table``; results/stats/acquisition.tsv)
    One row per acquisition column the table has (ACQUISITION_COLUMNS): a number (kvp, slice_thickness,
    study_year) against age by Spearman's rs (``stats.spearman``: its P, exact at small n); text (kernel_class,
    manufacturer, model, phase) by the Kruskal-Wallis H test of age across its categories (``kruskal_wallis``:
    midranks, the tie correction, chi-squared P on categories - 1 degrees of freedom). Scans with a missing
    value or age are left out of that row's n.

by decade (``decade_shares``; results/stats/acquisition_by_decade.tsv)
    The share of each value of each acquisition column among the scans of each age decade (decade 40: ages
    40 to 49) that have a value.

sensitivity (``sensitivity_table``; results/stats/sensitivity_acquisition.tsv)
    Per structure x measure: rs_primary (``stats.age_correlations``' primary analysis) and
    rs_acquisition_adjusted, the partial Spearman rs given the primary analysis's covariates plus the
    ``acquisition_covariates`` the table has (a text one as indicators, ``stats.encode_covariates``; its
    categories held by fewer than ``acquisition_min_scans`` scans pooled into ``other``, said in
    ``pooled``), on the complete cases, with P corrected as the primary table's (``correction`` over each
    family's tested rows) and judged at the same ``alpha``. conclusion_changed: both tested, and
    significance differs, or both are significant with opposite signs (the sign of
    an rs near 0 that neither calls significant is noise, not a conclusion).
"""

import logging

import numpy as np
import pandas as pd
from scipy import stats

from ctcohort.stats import (
    NO_COVARIATES,
    STRUCTURE_MEASURE,
    StatisticsSettings,
    age_correlations,
    is_categorical,
    primary_view,
    spearman,
)

ACQUISITION_COLUMNS = ("kvp", "kernel_class", "manufacturer", "model", "slice_thickness", "study_year", "phase")
ASSOCIATION_COLUMNS = ["variable", "test", "n", "categories", "statistic", "p", "note"]
DECADE_COLUMNS = ["variable", "value", "decade", "n", "share"]
SENSITIVITY_COLUMNS = [
    *STRUCTURE_MEASURE,
    "n_primary",
    "rs_primary",
    "significant_primary",
    "n_acquisition_adjusted",
    "covariates",
    "rs_acquisition_adjusted",
    "delta_rs",
    "p_acquisition_adjusted",
    "p_acquisition_adjusted_corrected",
    "significant_acquisition_adjusted",
    "conclusion_changed",
    "pooled",
    "note",
]
SPEARMAN, KRUSKAL_WALLIS = "spearman", "kruskal_wallis"
OTHER = "other"
log = logging.getLogger(__name__)


def scans_of(measurements: pd.DataFrame) -> pd.DataFrame:
    """One row per scan of a long measurement table (its covariates are the same on every structure's row)."""
    return measurements.drop_duplicates("subject").reset_index(drop=True)


def kruskal_wallis(values: np.ndarray, groups: np.ndarray) -> tuple[float, float]:
    """(H, P) of the Kruskal-Wallis test of ``values`` across ``groups``: H = 12 / (N (N + 1)) sum R_g^2 / n_g
    - 3 (N + 1) on midranks, divided by the tie correction 1 - sum(t^3 - t) / (N^3 - N); P from chi-squared on
    groups - 1 degrees of freedom. NaN with fewer than two groups or every value tied."""
    labels, codes = np.unique(groups, return_inverse=True)
    n = len(values)
    ties = np.unique(values, return_counts=True)[1]
    correction = 1.0 - (ties**3 - ties).sum() / (n**3 - n) if n > 1 else 0.0
    if len(labels) < 2 or correction <= 0:
        return np.nan, np.nan
    ranks = stats.rankdata(values)
    rank_sums, sizes = np.bincount(codes, ranks), np.bincount(codes)
    h = (12.0 / (n * (n + 1)) * (rank_sums**2 / sizes).sum() - 3.0 * (n + 1)) / correction
    return float(h), float(stats.chi2.sf(h, len(labels) - 1))


def association_row(variable: str, age: pd.Series, values: pd.Series, min_n: int) -> tuple:
    """One row of ``association_table`` (ASSOCIATION_COLUMNS)."""
    keep = age.notna() & values.notna()
    age, values = age[keep].to_numpy(float), values[keep]
    if is_categorical(values):
        labels = values.astype(str).to_numpy()
        categories = len(set(labels))
        if len(labels) < min_n:
            return variable, KRUSKAL_WALLIS, len(labels), categories, np.nan, np.nan, "too_few_scans"
        h, p = kruskal_wallis(age, labels)
        return variable, KRUSKAL_WALLIS, len(labels), categories, h, p, "" if np.isfinite(h) else "constant"
    numbers = pd.to_numeric(values, errors="coerce").to_numpy(float)
    n, rs, p, note = spearman(age, numbers, min_n)
    return variable, SPEARMAN, n, len(set(numbers[np.isfinite(numbers)])), rs, p, note


def association_table(measurements: pd.DataFrame, min_n: int) -> pd.DataFrame:
    """results/stats/acquisition.tsv (module docstring): one row per acquisition column present."""
    scans = scans_of(measurements)
    age = pd.to_numeric(scans["age"], errors="coerce")
    rows = [association_row(c, age, scans[c], min_n) for c in ACQUISITION_COLUMNS if c in scans.columns]
    return pd.DataFrame(rows, columns=ASSOCIATION_COLUMNS)


def decade_shares(measurements: pd.DataFrame) -> pd.DataFrame:
    """results/stats/acquisition_by_decade.tsv (module docstring)."""
    scans = scans_of(measurements)
    decade = (pd.to_numeric(scans["age"], errors="coerce") // 10 * 10).rename("decade")
    parts = []
    for variable in (c for c in ACQUISITION_COLUMNS if c in scans.columns):
        known = scans[variable].notna() & decade.notna()
        values = scans.loc[known, variable].map(lambda v: f"{v:g}" if isinstance(v, float) else str(v))
        counts = values.groupby([decade[known].astype(int), values.rename("value")]).size().rename("n")
        counts = counts.reset_index()
        counts["share"] = counts["n"] / counts.groupby("decade")["n"].transform("sum")
        parts.append(counts.assign(variable=variable))
    if not parts:
        return pd.DataFrame(columns=DECADE_COLUMNS)
    return pd.concat(parts, ignore_index=True)[DECADE_COLUMNS]


def pool_rare(measurements: pd.DataFrame, covariates: list[str], min_scans: int) -> tuple[pd.DataFrame, str]:
    """(measurements with each text covariate's categories of fewer than ``min_scans`` scans replaced by
    ``other``, what was pooled: "kernel_class: bone|lung" joined by "; "). Counted over scans, not rows."""
    scans = scans_of(measurements)
    pooled, notes = measurements.copy(), []
    for name in covariates:
        if not is_categorical(scans[name]):
            continue
        counts = scans[name].dropna().astype(str).value_counts()
        rare = sorted(counts.index[counts < min_scans])
        if rare:
            values = pooled[name]
            pooled[name] = values.where(~values.astype(str).isin(rare) | values.isna(), OTHER)
            notes.append(f"{name}: {'|'.join(rare)}")
            log.info("%s: categories %s (fewer than %d scans each) pooled into %r", name, rare, min_scans, OTHER)
    return pooled, "; ".join(notes)


def sensitivity_table(measurements: pd.DataFrame, settings: StatisticsSettings) -> pd.DataFrame:
    """results/stats/sensitivity_acquisition.tsv (module docstring)."""
    analysis = dict(correction=settings.correction, alpha=settings.alpha, min_n=settings.min_n)
    primary = primary_view(
        age_correlations(
            measurements,
            settings.measures,
            partial_covariates=settings.adjusted_for,
            primary=settings.primary,
            **analysis,
        )
    )
    acquisition = [c for c in settings.acquisition_covariates if c in measurements.columns]
    base = list(settings.adjusted_for) if (primary["primary"] == "adjusted").any() else []
    pooled, pooled_note = pool_rare(measurements, acquisition, settings.acquisition_min_scans)
    adjusted = primary_view(
        age_correlations(
            pooled, settings.measures, partial_covariates=[*base, *acquisition], primary="adjusted", **analysis
        )
    )
    corrected = "p_bonferroni" if settings.correction == "bonferroni" else "q_fdr"
    table = primary[STRUCTURE_MEASURE].copy()
    table["n_primary"], table["rs_primary"] = primary["n"], primary["rs"]
    table["significant_primary"] = primary["significant"]
    table["n_acquisition_adjusted"], table["covariates"] = adjusted["n"], adjusted["covariates"]
    table["rs_acquisition_adjusted"] = adjusted["rs"]
    table["p_acquisition_adjusted"] = adjusted["p"]
    table["p_acquisition_adjusted_corrected"] = adjusted[corrected]
    table["significant_acquisition_adjusted"] = adjusted["significant"]
    if not acquisition:
        table[["rs_acquisition_adjusted", "p_acquisition_adjusted", "p_acquisition_adjusted_corrected"]] = np.nan
        table["significant_acquisition_adjusted"] = False
    table["delta_rs"] = table["rs_acquisition_adjusted"] - table["rs_primary"]
    tested = (primary["note"] == "") & (adjusted["note"] == "") & bool(acquisition)
    significant = table["significant_primary"] & table["significant_acquisition_adjusted"]
    reversed_sign = significant & (np.sign(table["rs_primary"]) != np.sign(table["rs_acquisition_adjusted"]))
    changed = (table["significant_primary"] != table["significant_acquisition_adjusted"]) | reversed_sign
    table["conclusion_changed"] = tested & changed
    table["pooled"] = pooled_note
    table["note"] = adjusted["note"] if acquisition else NO_COVARIATES
    table.loc[primary["note"] != "", "note"] = primary["note"]
    log.info(
        "adjusted for %s as well: %d of %d tested rows change their conclusion",
        acquisition or "no acquisition covariate (none in the table)",
        int(table["conclusion_changed"].sum()),
        int(tested.sum()),
    )
    return table[SENSITIVITY_COLUMNS]
