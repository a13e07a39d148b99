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
from collections.abc import Mapping
from dataclasses import dataclass, field, fields

import numpy as np
import pandas as pd
from scipy import stats
from statsmodels.stats.multitest import multipletests

from ctcohort.contrast_phase import PHASE_COLUMN, SHEET_ELSE_ESTIMATED, check_contrast_source
from ctcohort.patients import PatientSettings, patient_of
from ctcohort.rank_null import PERMUTATION_MAX_N, pairing_p, smallest_p, spearman_p

# the columns that name a structure x measure, leading each table of tests
STRUCTURE_MEASURE = ["structure", "group", "family", "measure"]
CORRELATION_COLUMNS = [
    *STRUCTURE_MEASURE,
    "n",
    "n_patients",
    "rs",
    "ci_low",
    "ci_high",
    "p",
    "p_bonferroni",
    "q_fdr",
    "note",
    "n_partial",
    "covariates",
    "rs_partial",
    "ci_partial_low",
    "ci_partial_high",
    "p_partial",
    "p_partial_bonferroni",
    "q_partial_fdr",
    "note_partial",
    "primary",
    "significant",
]
# one row of the adjusted analysis (partial_rows), before its corrections
PARTIAL_ROW_COLUMNS = [
    *STRUCTURE_MEASURE,
    "n",
    "n_patients",
    "k",
    "covariates",
    "rs_partial",
    "ci_low",
    "ci_high",
    "p",
    "note",
]
CORRECTIONS = ("bonferroni", "fdr_bh")
PRIMARY = ("adjusted", "unadjusted")
# correction families: the segmentation's own structures, and the combined ones (which repeat their members)
STRUCTURES, COMBINED = "structures", "combined"
TOO_FEW_SCANS = "too_few_scans"
CONSTANT = "constant"
NO_COVARIATES = "no_covariates"
# statistics.combined's default: the paper's rows that join both sides of the body
PAPER_COMBINED = {
    "kidneys": ["kidney_left", "kidney_right"],
    "iliac_arteries": ["iliac_artery_left", "iliac_artery_right"],
    "iliopsoas": ["iliopsoas_left", "iliopsoas_right"],
    "autochthon": ["autochthon_left", "autochthon_right"],
    "gluteus_maximus": ["gluteus_maximus_left", "gluteus_maximus_right"],
    "gluteus_medius": ["gluteus_medius_left", "gluteus_medius_right"],
    "gluteus_minimus": ["gluteus_minimus_left", "gluteus_minimus_right"],
    "hips": ["hip_left", "hip_right"],
    "clavicles": ["clavicula_left", "clavicula_right"],
}
log = logging.getLogger(__name__)


def check_tests(correction: str, min_n) -> None:
    """The one check of a table's correction and its fewest scans per test (ValueError)."""
    if correction not in CORRECTIONS:
        raise ValueError(f"unknown correction {correction!r}; choose one of {', '.join(CORRECTIONS)}")
    if isinstance(min_n, bool) or not isinstance(min_n, (int, np.integer)) or min_n < 3:
        raise ValueError(f"min_n must be an integer >= 3 (Spearman's rs needs 3 scans), got {min_n!r}")


@dataclass(frozen=True)
class StatisticsSettings:
    """The cross-sectional statistics: config's ``statistics`` block key for key (documented in
    config/README.md). The field defaults are the only defaults (``ctcohort.config_defaults`` writes
    them into config/config.yaml)."""

    measures: tuple[str, ...] = ("volume_ml", "hu_mean", "hu_mean_eroded")
    scan_per_patient: str = PatientSettings.scan_per_patient
    seed: int = PatientSettings.seed
    correction: str = "bonferroni"
    alpha: float = 0.0001
    partial_covariates: tuple[str, ...] = ("sex", "contrast")
    contrast: str = SHEET_ELSE_ESTIMATED  # where the contrast covariate comes from (contrast_phase.resolve_contrast)
    phase_covariate: bool = False  # adjust for the estimated phase (a category) where partial_covariates names contrast
    primary: str = "adjusted"
    min_n: int = 10
    spline_df: int = 3
    combined: Mapping[str, list[str]] = field(default_factory=lambda: {k: list(v) for k, v in PAPER_COMBINED.items()})
    # the acquisition sensitivity analysis (ctcohort.acquisition)
    acquisition_covariates: tuple[str, ...] = ("kvp", "kernel_class")
    acquisition_min_scans: int = 10

    def __post_init__(self):
        for name in ("measures", "partial_covariates", "acquisition_covariates"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        check_tests(self.correction, self.min_n)
        check_contrast_source(self.contrast)
        if isinstance(self.acquisition_min_scans, bool) or not isinstance(self.acquisition_min_scans, int):
            raise ValueError(f"acquisition_min_scans must be an integer, got {self.acquisition_min_scans!r}")
        if self.primary not in PRIMARY:
            raise ValueError(f"unknown primary analysis {self.primary!r}; choose one of {', '.join(PRIMARY)}")

    @property
    def adjusted_for(self) -> tuple[str, ...]:
        """The covariates of the adjusted analyses: partial_covariates, with ``phase`` for ``contrast`` where
        phase_covariate says so."""
        if not self.phase_covariate:
            return self.partial_covariates
        return tuple(PHASE_COLUMN if name == "contrast" else name for name in self.partial_covariates)

    @classmethod
    def from_config(cls, section: Mapping) -> "StatisticsSettings":
        """From config's ``statistics`` block (a key it leaves out keeps its default)."""
        return cls(**{item.name: section[item.name] for item in fields(cls) if item.name in section})


DEFAULTS = StatisticsSettings()
MIN_N = DEFAULTS.min_n


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
    rx, ry = (
        ranks - design @ np.linalg.lstsq(design, ranks, rcond=None)[0]
        for ranks in (stats.rankdata(x), stats.rankdata(y))
    )
    denominator = np.sqrt((rx @ rx) * (ry @ ry))
    if denominator <= 1e-12 * n:
        return np.nan, np.nan
    r = float(np.clip(rx @ ry / denominator, -1.0, 1.0))
    if n <= PERMUTATION_MAX_N:
        return r, max(pairing_p(rx, ry), smallest_p(n))
    t = r * np.sqrt(dof / max(1e-300, 1.0 - r * r))
    return r, max(float(2 * stats.t.sf(abs(t), dof)), smallest_p(n))


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


def structure_families(measurements: pd.DataFrame) -> dict[str, str]:
    """Each structure's correction family: COMBINED for a combined structure (statistics.combined: a row
    without a label id, ``aggregate.combine_structures``), STRUCTURES for the segmentation's own. A combined
    structure repeats its members' information, so counting it in their family would count one effect
    twice; it is corrected among the combined structures instead."""
    if "label" not in measurements.columns:
        return dict.fromkeys(measurements["structure"], STRUCTURES)
    labelled = pd.to_numeric(measurements["label"], errors="coerce").notna().groupby(measurements["structure"]).any()
    return {structure: STRUCTURES if has_label else COMBINED for structure, has_label in labelled.items()}


def correct_p_values(table: pd.DataFrame, p: str, bonferroni: str, fdr: str, tested: pd.Series) -> None:
    """Columns ``bonferroni`` (P x the number of tested rows, at most 1) and ``fdr`` (Benjamini-Hochberg q)
    over the rows where ``tested``, within each correction family where the table has a ``family`` column;
    NaN elsewhere."""
    table[bonferroni] = np.nan
    table[fdr] = np.nan
    families = table["family"] if "family" in table.columns else pd.Series("", table.index)
    for family in pd.unique(families):
        rows = tested & (families == family)
        if rows.any():
            table.loc[rows, bonferroni] = np.minimum(1.0, table.loc[rows, p] * rows.sum())
            table.loc[rows, fdr] = multipletests(table.loc[rows, p], method="fdr_bh")[1]


def partial_spearman_ci(rs: float, n: int, k: int, level: float = 0.95) -> tuple[float, float]:
    """Fisher-z interval of a partial Spearman correlation with k covariates, with Bonett & Wright's
    standard error for rank correlations: atanh(r) +- z sqrt((1 + r^2 / 2) / (n - 3 - k)) (Pearson's
    1 / sqrt(n - 3 - k) covers only 92% at rs 0.8-0.9)."""
    if n - 3 - k <= 0 or not np.isfinite(rs) or abs(rs) >= 1:
        return np.nan, np.nan
    half_width = stats.norm.ppf(0.5 + level / 2) * np.sqrt((1 + rs * rs / 2) / (n - 3 - k))
    return float(np.tanh(np.arctanh(rs) - half_width)), float(np.tanh(np.arctanh(rs) + half_width))


def _used_covariates(encoded: pd.DataFrame, present: list[str]) -> tuple[pd.DataFrame, str]:
    """The encoded columns that vary (a constant covariate adjusts for nothing), and the covariates they
    come from, comma-separated (``sex[M]`` is sex)."""
    used = encoded[[c for c in encoded.columns if np.ptp(encoded[c].to_numpy()) > 0]] if len(encoded) else encoded
    names = [name for name in present if any(c == name or c.startswith(f"{name}[") for c in used.columns)]
    return used, ",".join(names)


def partial_rows(measurements: pd.DataFrame, measures: list[str], present: list[str], min_n: int) -> pd.DataFrame:
    """The adjusted analysis before its corrections (PARTIAL_ROW_COLUMNS): per structure x measure the partial
    Spearman correlation of age and the measure given the ``present`` covariates, on the complete cases
    (``partial_spearman``; CI ``partial_spearman_ci``). ``too_few_scans`` below max(min_n, k + 4)."""
    families = structure_families(measurements)
    rows = []
    for structure, group, block in structure_blocks(measurements):
        encoded = encode_covariates(block, present)
        complete = encoded.notna().all(axis=1).to_numpy() & block["age"].notna().to_numpy()
        patients = patient_of(block).to_numpy()
        for measure in measures:
            keep = complete & np.isfinite(block[measure].to_numpy(dtype=float))
            n, n_patients = int(keep.sum()), len(set(patients[keep]))
            age = block["age"].to_numpy(dtype=float)[keep]
            values = block[measure].to_numpy(dtype=float)[keep]
            used, names = _used_covariates(encoded.loc[keep], present)
            k = used.shape[1]
            r = p = np.nan
            if n < max(min_n, k + 4):
                note = TOO_FEW_SCANS
            elif np.ptp(age) == 0 or np.ptp(values) == 0:
                note = CONSTANT
            else:
                r, p = partial_spearman(age, values, used.to_numpy(dtype=float))
                note = "" if np.isfinite(r) else CONSTANT
            rows.append(
                (
                    structure,
                    group,
                    families[structure],
                    measure,
                    n,
                    n_patients,
                    k,
                    names,
                    r,
                    *partial_spearman_ci(r, n, k),
                    p,
                    note,
                )
            )
    return pd.DataFrame(rows, columns=PARTIAL_ROW_COLUMNS)


def _spearman_rows(measurements: pd.DataFrame, measures: list[str], min_n: int) -> pd.DataFrame:
    """The unadjusted analysis before its corrections: n, n_patients, rs, CI, P, note per structure x measure."""
    families = structure_families(measurements)
    rows = []
    for structure, group, block in structure_blocks(measurements):
        age = block["age"].to_numpy(dtype=float)
        patients = patient_of(block).to_numpy()
        for measure in measures:
            values = block[measure].to_numpy(dtype=float)
            n, rs, p, note = spearman(age, values, min_n)
            n_patients = len(set(patients[np.isfinite(age) & np.isfinite(values)]))
            rows.append(
                (structure, group, families[structure], measure, n, n_patients, rs, *spearman_ci(rs, n), p, note)
            )
    return pd.DataFrame(rows, columns=[*CORRELATION_COLUMNS[:10], "note"])


def _not_adjusted(table: pd.DataFrame) -> pd.DataFrame:
    """PARTIAL_ROW_COLUMNS for the rows of ``table`` where no covariate is in the table: adjusted for nothing, the
    plain analysis again, which would only repeat it; NaN with note NO_COVARIATES."""
    rows = table[[*STRUCTURE_MEASURE, "n_patients"]].assign(covariates="", note=NO_COVARIATES)
    return rows.reindex(columns=PARTIAL_ROW_COLUMNS)


def age_correlations(
    measurements: pd.DataFrame,
    measures: list[str],
    correction: str = DEFAULTS.correction,
    alpha: float = DEFAULTS.alpha,
    partial_covariates: list[str] = (),
    min_n: int = DEFAULTS.min_n,
    primary: str = DEFAULTS.primary,
) -> pd.DataFrame:
    """One row per structure x measure (columns CORRELATION_COLUMNS; see the module docstring).

    ``measurements``: long table with subject, age, structure, group and the measure columns; a
    missing or empty group (an empty TSV cell reads back as NaN) is the group "".
    Unadjusted: n, rs, ci_low/ci_high (spearman_ci), p, and p_bonferroni / q_fdr over the tested rows
    (note "") of each correction family (``structure_families``). Adjusted for the
    ``partial_covariates`` found in the table: the ``partial_rows`` columns renamed with ``_partial``
    (n_partial, covariates used, rs_partial, CI, p_partial with its own corrections, note_partial;
    NaN with note_partial NO_COVARIATES where none of the covariates is in the table).
    ``primary``: which analysis the ``significant`` flag (``alpha`` on the chosen correction), the figures,
    group summary and Methods follow: ``adjusted`` where any covariate is present, else ``unadjusted``
    (said in the column ``primary``). Untested rows are NaN and never significant.
    """
    check_tests(correction, min_n)
    if primary not in PRIMARY:
        raise ValueError(f"unknown primary analysis {primary!r}; choose one of {', '.join(PRIMARY)}")
    present = present_columns(measurements, partial_covariates, "partial correlation covariates")
    table = _spearman_rows(measurements, measures, min_n)
    correct_p_values(table, "p", "p_bonferroni", "q_fdr", table["note"] == "")
    adjusted = (partial_rows(measurements, measures, present, min_n) if present else _not_adjusted(table)).rename(
        columns={
            "n": "n_partial",
            "ci_low": "ci_partial_low",
            "ci_high": "ci_partial_high",
            "p": "p_partial",
            "note": "note_partial",
        }
    )
    correct_p_values(adjusted, "p_partial", "p_partial_bonferroni", "q_partial_fdr", adjusted["note_partial"] == "")
    table = pd.concat([table, adjusted.drop(columns=[*STRUCTURE_MEASURE, "n_patients", "k"])], axis=1)
    table["primary"] = "adjusted" if primary == "adjusted" and present else "unadjusted"
    view = primary_view(table)
    corrected = view["p_bonferroni"] if correction == "bonferroni" else view["q_fdr"]
    table["significant"] = (corrected < alpha).fillna(False).astype(bool)
    tested = view["note"] == ""
    untested = ", ".join(f"{count} {note}" for note, count in view.loc[~tested, "note"].value_counts().items())
    log.info(
        "%s analysis: %d of %d structure x measure rows tested (min_n %d); not tested: %s",
        table["primary"].iloc[0] if len(table) else primary,
        tested.sum(),
        len(table),
        min_n,
        untested or "none",
    )
    return table[CORRELATION_COLUMNS]


# the columns of the adjusted analysis that stand for the headline ones in primary_view
ADJUSTED_AS_PRIMARY = {
    "n_partial": "n",
    "rs_partial": "rs",
    "ci_partial_low": "ci_low",
    "ci_partial_high": "ci_high",
    "p_partial": "p",
    "p_partial_bonferroni": "p_bonferroni",
    "q_partial_fdr": "q_fdr",
    "note_partial": "note",
}


def primary_view(correlations: pd.DataFrame) -> pd.DataFrame:
    """``age_correlations``' table as its primary analysis: where ``primary`` is ``adjusted``, the adjusted
    columns take the places of n, rs, ci_low, ci_high, p, p_bonferroni, q_fdr and note, so that what reads
    the headline (figures, group summary, paper comparison, Methods) follows the configured analysis. A
    table without a ``primary`` column is unadjusted."""
    if "primary" not in correlations.columns or not (correlations["primary"] == "adjusted").any():
        return correlations
    adjusted = correlations["primary"] == "adjusted"
    view = correlations.copy()
    for source, target in ADJUSTED_AS_PRIMARY.items():
        if source not in view.columns:
            continue
        view[target] = view[target].astype(object).where(~adjusted, view[source]).infer_objects()
    return view


GROUP_SUMMARY_COLUMNS = [
    "group",
    "measure",
    "structures",
    "tested",
    "significant_up",
    "significant_down",
    "median_abs_rs",
]


def group_summary(correlations: pd.DataFrame, combined=()) -> pd.DataFrame:
    """Per structure group (organ, bone, muscle, vessel, then any other group; "" last) and measure, from
    ``age_correlations``' table as its primary analysis (``primary_view``): structures (rows of the table), tested
    (note ""), significant_up /
    significant_down (significant with rs > 0 / rs < 0) and median_abs_rs (median |rs| over the tested
    rows; NaN where none is tested). The structures named in ``combined`` are left out: a combined
    structure repeats its members, and counting both would count one effect twice."""
    from ctcohort.structures import GROUPS

    table = primary_view(correlations)
    table = table[~table["structure"].isin(list(combined))].copy()
    table["group"] = table["group"].astype(object).fillna("").astype(str)
    table["tested"] = table["note"].astype(object).fillna("").astype(str) == ""
    significant = table["significant"].astype(str).str.lower() == "true"
    table["up"] = significant & (table["rs"] > 0)
    table["down"] = significant & (table["rs"] < 0)
    table["abs_rs"] = table["rs"].abs().where(table["tested"])
    present = set(table["group"])
    order = [g for g in GROUPS if g in present] + sorted(present - set(GROUPS) - {""}) + ([""] if "" in present else [])
    rows = []
    for group in order:
        for measure in pd.unique(table["measure"]):
            block = table[(table["group"] == group) & (table["measure"] == measure)]
            if block.empty:
                continue
            rows.append(
                (
                    group,
                    measure,
                    len(block),
                    int(block["tested"].sum()),
                    int(block["up"].sum()),
                    int(block["down"].sum()),
                    float(block["abs_rs"].median()),
                )
            )
    return pd.DataFrame(rows, columns=GROUP_SUMMARY_COLUMNS)
