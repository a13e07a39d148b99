"""Age- and sex-specific normative (centile) charts of each structure's measures, and one scan placed on them.

charts (``fit_charts``, ``fit_panel_charts``; results/stats/normative_charts.tsv)
    One chart per structure x measure x sex: sexes M and F where ``by_sex`` and the table has a sex column
    (a scan whose sex is missing or neither M nor F is in no chart), else one chart ``all`` over every scan.
    A chart is fitted on exactly the n scans with a finite age, a finite measure and every covariate present
    (complete cases). A numeric covariate (contrast 0/1, kVp) enters as itself; a text one (manufacturer,
    kernel_class) as treatment dummies against its most common level in the chart, its levels of fewer than
    MIN_LEVEL_SCANS (10) scans pooled into ``other`` (logged; ``text_dummies``). One not in the table is left
    out with a warning, and one that is constant over a chart's scans is left out of that chart's model (the
    chart then holds for that value only).

    Site (``site``, normative.site; method lms only): a column (site, scanner) whose values get a random
    intercept on the location (``ctcohort.centiles``, module docstring, site: tau by the Laplace-approximate
    restricted likelihood, as mgcv's REML). The charts are the population's curves (site effect 0); the
    charts table holds site_column, site_sd (tau, on mu's link) and sites (their number).

    Model: linear quantile regression (one fit per percentile p at q = p / 100) of the measure on a natural
    cubic regression spline of age plus the covariates, ``y ~ cr(age, df=spline_df, constraints="center") +
    covariates``: patsy's spline with spline_df + 1 knots at the quantiles of age, linear beyond the boundary
    knots; "center" only makes it identifiable beside the intercept (the uncentred basis spans the constant),
    the curves are those of ``cr(age, df=spline_df)``. Each fit minimises the check (pinball) loss
    sum(max(q r, (q - 1) r)) of the residuals r exactly, as a linear program (scipy's HiGHS): an iterative
    solver stopped at a limit left the outer percentiles up to 0.2 IQR from the optimum at the chart ends
    (tests compare the loss with R's quantreg). A fit the solver cannot solve makes the chart
    ``not_converged``.

    Non-crossing: percentile curves fitted one at a time can cross (the 25th above the 50th at some age).
    At every age the predicted values are sorted across the percentile levels (monotone rearrangement;
    Chernozhukov, Fernandez-Val & Galichon 2010, Econometrica 78:1093): the sorted values are monotone in
    the level, and at every age no farther (in any Lp norm over the levels) from the true percentiles than
    the fitted values are. The fits themselves, and the coefficients, are not changed; where no curves
    cross, sorting changes nothing.

    Columns: structure, group (from the table; a missing group is ""), members (a combined structure's
    members joined by "+", e.g. kidney_left+kidney_right; "" for a structure of its own), measure, sex
    (M, F or all), n, age,
    one column per percentile p named f"p{p:g}" (p5, p25, p50, p75, p95), then one column per configured
    covariate holding the value the curves are drawn at: 0 where the covariate varies and enters the model
    (the curves are those of a scan with the covariate 0, e.g. native), the constant value where it is
    constant over the chart's scans, NaN where it is not in the table (or the chart is not fitted); then
    note (a text covariate: its reference level). Ages: from the chart's youngest to its oldest scan in steps of
    age_step, both ends included (the
    last step may be shorter). A chart that is not fitted has one row, age and percentiles NaN, and a
    note: ``not_in_study`` (the table has no such structure), ``too_few_scans`` (n < min_n, n < the
    model's parameters + 2, or fewer distinct ages than spline_df + 2), ``constant`` (age or the measure takes one
    value) or ``not_converged``. Fitted rows:
    note "".

coefficients (results/stats/normative_covariates.tsv)
    structure, measure, sex, covariate and one column per percentile: the quantile regression coefficient
    of the covariate, i.e. the additive shift of that percentile per unit of the covariate (lms: of mu's
    linear predictor, in eta_mu, and in the percentiles for the normal family). One row per covariate that
    entered a chart's model, and per dummy of a text covariate (covariate ``name=level``; levels: the levels
    it stands for, ``a|b`` for other); effect ``fixed``. With a site: one row per site, covariate
    ``column=site``, eta_mu its predicted intercept (BLUP), effect ``random``.

placement (``place_on_charts``)
    For every structure of the scan x every charted measure in its columns: the percentile curves at the
    scan's age (linear interpolation between the chart's ages; never extrapolated in age), each shifted by
    coefficient x (covariate value - the chart's reference value) for every covariate of the chart's model,
    and sorted again (the shifts differ between percentiles and could make them cross; the charts hold the
    values already sorted at the reference, so where the fits cross there this is the rearrangement of the
    sorted curves plus the shifts, not of the raw fits at the scan's covariates). The scan's z comes
    from interpolating its value among the curves in normal-score space: the levels' z_i = Phi^-1(p_i / 100)
    are interpolated linearly against the curve values; percentile = 100 Phi(z). A value equal to a run of
    equal (tied) curve values gets the middle of their z; a value below the lowest curve (above the
    highest) is extrapolated along the line through the lowest (highest) curve and the central one (the
    level nearest the 50th), exact for a normal distribution, and noted ``below_chart`` (``above_chart``):
    such a z rests on the straight-line extension, not on fitted percentiles, and is bounded by Z_LIMIT
    (the outermost segment alone, two curves a hair apart, gave z = 1e14). Where the outer and the central
    curve have the same value at that age there is no line to extrapolate with: z NaN.

    Columns: structure, measure, value, age, sex (the chart's: M, F or all), percentile, z, note. Notes,
    in order of precedence: ``no_chart`` (no fitted chart for this structure, measure and sex),
    ``no_value`` (the measure is NaN), ``age_outside_chart`` (outside the chart's ages),
    ``covariate_missing`` (a covariate of the chart's model was not given), ``covariate_outside_chart``
    (a covariate constant over the chart's scans was given with another value, or a text covariate's level
    that the chart's scans do not have); with any of these, percentile and z are NaN. Otherwise "",
    ``below_chart`` or ``above_chart``; on a chart with a site: a scan of one of its sites is placed with
    that site's intercept, one of another site (or without a site) on the population curve with its z
    widened by the site SD, noted ``site_new``. A charted combined
    structure that the scan's table lacks is made from its members first (``with_combined_structures``).

The tables are written with ``ctcohort.tables.write_tsv`` (NaN as "NaN") and read back with
``ctcohort.tables.read_statistics``.
"""

import copy
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import pandas as pd
from scipy import stats

from ctcohort.centiles import Z_LIMIT  # one bound of z for both methods
from ctcohort.columns import MEASURE_COLUMNS, MODEL_COLUMN
from ctcohort.stats import CONSTANT, TOO_FEW_SCANS, present_columns

if TYPE_CHECKING:
    from ctcohort.centiles import CentileSettings

PERCENTILES = (5, 25, 50, 75, 95)
COVARIATES = ("contrast",)
SPLINE_DF = 3
MIN_N = 15
AGE_STEP = 1.0
# |z| beyond the outer curves is a straight line's, not a fitted percentile's; beyond this (Phi(-8) = 6e-16)
# a number says no more than "far outside the chart"
DUALITY_GAP = 1e-8  # relative: an exact quantile fit's check loss and its dual optimum agree to this
SEXES = ("M", "F")
ALL = "all"
NOT_CONVERGED = "not_converged"
UNDEFINED_CENTILES = "undefined_centiles"  # lms: an outer centile beyond the fitted (Box-Cox) distribution's support
NOT_IN_STUDY = "not_in_study"  # a structure the measurement table does not have (a typo, another structure table)
BELOW_CHART = "below_chart"
ABOVE_CHART = "above_chart"
BEYOND_CHART = (BELOW_CHART, ABOVE_CHART)  # placed, z extrapolated
AGE_OUTSIDE_CHART = "age_outside_chart"
NO_CHART = "no_chart"
NO_VALUE = "no_value"
COVARIATE_MISSING = "covariate_missing"
COVARIATE_OUTSIDE_CHART = "covariate_outside_chart"
# a text covariate's levels held by fewer scans of a chart than this are pooled into OTHER: a dummy of a handful
# of scans would be an estimate of those scans, not of their manufacturer or kernel
MIN_LEVEL_SCANS = 10
OTHER = "other"
FIXED, RANDOM = "fixed", "random"  # a coefficient row's effect: a covariate's (dummy's) shift, or a site's BLUP
LEADING_COLUMNS = ["structure", "group", "members", "measure", "sex", "n", "age"]
QUANTILE = "quantile"
LMS = "lms"
METHODS = (LMS, QUANTILE)
# after note: how the chart was made and, for lms, the model's linear predictors at each age (covariates at the
# reference) with which a scan is placed, and the chart's calibration on held-out scans
METHOD_COLUMNS = [
    "method",
    "family",
    "z_scale",
    "eta_mu",
    "eta_sigma",
    "eta_nu",
    "eta_tau",
    "site_column",
    "site_sd",
    "sites",
]
CALIBRATION_FIELDS = {
    "calibration_n": "calibration_n",
    "z_mean": "z_mean",
    "z_sd": "z_sd",
    "beyond_1_96": "beyond_1.96",
    "calibration_failed": "calibration_failed",
}
CALIBRATION_COLUMNS = list(CALIBRATION_FIELDS)
SCORE_COLUMNS = ["subject", "structure", "measure", "sex", "value", "age", "z", "fold"]
PLACEMENT_COLUMNS = ["structure", "measure", "value", "age", "sex", "percentile", "z", "note"]
SCORE_TABLE_COLUMNS = ["subject", *PLACEMENT_COLUMNS, "fit"]
_PERCENTILE_NAME = re.compile(r"^p(\d+(?:\.\d+)?)$")
log = logging.getLogger(__name__)


def percentile_column(p: float) -> str:
    """The column of percentile p: p5, p25, p2.5."""
    return f"p{p:g}"


def chart_columns(percentiles=PERCENTILES, covariates=COVARIATES) -> list[str]:
    return [*LEADING_COLUMNS, *(percentile_column(p) for p in percentiles), *covariates, "note"]


def coefficient_columns(percentiles=PERCENTILES) -> list[str]:
    return [
        "structure",
        "measure",
        "sex",
        "covariate",
        *(percentile_column(p) for p in percentiles),
        "eta_mu",
        "levels",
        "effect",
    ]


def _check_percentiles(percentiles) -> tuple[float, ...]:
    levels = tuple(float(p) for p in percentiles)
    if not levels or not all(0 < p < 100 for p in levels) or any(b <= a for a, b in zip(levels, levels[1:])):
        raise ValueError(f"percentiles must be strictly increasing and within (0, 100), got {tuple(percentiles)}")
    return levels


def _check_integer(name: str, value, least: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < least:
        raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")


def age_grid(youngest: float, oldest: float, step: float = AGE_STEP) -> np.ndarray:
    """youngest, youngest + step, ... and oldest itself (the last step may be shorter)."""
    count = int(np.floor((oldest - youngest) / step + 1e-9))
    grid = youngest + step * np.arange(count + 1)
    if oldest - grid[-1] > 1e-9 * max(1.0, abs(oldest)):
        grid = np.append(grid, oldest)
    return grid


class QuantileFit(NamedTuple):
    """One percentile's fit: coefficients by design column, and the design to predict new ages with."""

    params: pd.Series
    design_info: object  # patsy's DesignInfo of the right-hand side (the spline's knots are the data's)

    def predict(self, new: pd.DataFrame) -> np.ndarray:
        import patsy

        (design,) = patsy.build_design_matrices([self.design_info], new)
        return np.asarray(design) @ self.params.to_numpy()


def quantile_fits(
    frame: pd.DataFrame, percentiles=PERCENTILES, spline_df: int = SPLINE_DF
) -> tuple[list[QuantileFit], bool]:
    """(fits, solved): one QuantileFit per percentile of y ~ cr(age, df=spline_df, constraints="center") + the
    other columns of ``frame`` (numeric covariates with formula-safe names), each at the exact minimum of its
    check loss (``exact_quantile_fit``); solved is False where the solver failed for a percentile."""
    import patsy

    terms = "".join(f" + {c}" for c in frame.columns if c not in ("y", "age"))
    endog, exog = patsy.dmatrices(
        f"y ~ cr(age, df={spline_df}, constraints='center'){terms}", frame, return_type="dataframe"
    )
    fits, solved = [], True
    for p in percentiles:
        params = exact_quantile_fit(exog.to_numpy(), endog.to_numpy().ravel(), p / 100)
        solved &= bool(np.isfinite(params).all())
        fits.append(QuantileFit(pd.Series(params, index=exog.columns), exog.design_info))
    return fits, solved


def check_loss(residuals: np.ndarray, q: float) -> float:
    """The quantile regression's objective: sum of q r over r >= 0 and (q - 1) r over r < 0."""
    return float(np.sum(np.maximum(q * residuals, (q - 1) * residuals)))


def exact_quantile_fit(exog: np.ndarray, endog: np.ndarray, q: float) -> np.ndarray:
    """The coefficients at the least check loss, solved to the optimum (not to an iteration limit) as the dual
    linear program, which has one bounded variable per scan and one constraint per coefficient (scipy's HiGHS:
    0.3-0.7 s at 20,000 scans, where the primal took 20 s): maximise y'd subject to X'd = 0, q - 1 <= d <= q;
    the coefficients are the constraints' multipliers. The duality gap is checked (the check loss of the
    coefficients equals the dual's optimum); NaN where the solver fails. Where the minimum is not unique
    (n q an integer) the coefficients are those of one optimal vertex."""
    from scipy.optimize import linprog

    n, k = exog.shape
    solution = linprog(-endog, A_eq=exog.T, b_eq=np.zeros(k), bounds=[(q - 1, q)] * n, method="highs")
    if solution.status != 0:
        return np.full(k, np.nan)
    params = -np.asarray(solution.eqlin.marginals, dtype=float)
    optimum = -float(solution.fun)
    if not abs(check_loss(endog - exog @ params, q) - optimum) <= DUALITY_GAP * max(abs(optimum), 1e-12):
        return np.full(k, np.nan)
    return params


def reference_scans(
    measurements: pd.DataFrame,
    reference: str = "",
    qc: pd.DataFrame | None = None,
    combined: Mapping[str, Sequence[str]] | None = None,
) -> pd.DataFrame:
    """The rows of ``measurements`` (one row per subject x structure, the sheet's columns beside) that may make a
    chart: the scans that ``reference`` selects (a pandas query over the sheet's columns, e.g. "healthy == 1";
    "" for every scan), less the structures of a scan that a sanity check of ``qc`` (the cohort QC table) flags,
    unless a reviewer accepted them (and a ``combined`` structure with such a member), and a scan whose
    orientation is in doubt. Excluded values are NaN already (never charted)."""
    from ctcohort.review import SANITY_FLAGS

    selected = measurements
    if reference:
        try:
            selected = measurements.query(reference, engine="python")
        except Exception as err:  # a query names columns and operators of the user's own
            raise ValueError(f"normative.reference {reference!r}: {type(err).__name__}: {err}") from None
        log.info(
            "normative.reference %r: %d of %d scans",
            reference,
            selected["subject"].nunique(),
            measurements["subject"].nunique(),
        )
    if qc is None or qc.empty:
        return selected
    flagged = qc[
        qc[list(SANITY_FLAGS)].astype(str).apply(lambda c: c.str.lower() == "true").any(axis=1)
        & (qc["review"].fillna("").astype(str) != "accept")
    ]
    whole_scans = set(flagged.loc[flagged["orientation"].astype(str).str.lower() == "true", "subject"].astype(str))
    pairs = set(zip(flagged["subject"].astype(str), flagged["structure"].astype(str)))
    pairs |= {
        (subject, name)
        for name, members in (combined or {}).items()
        for subject, structure in list(pairs)
        if structure in members
    }
    keys = pd.Series(
        list(zip(selected["subject"].astype(str), selected["structure"].astype(str))), index=selected.index
    )
    drop = keys.isin(pairs) | selected["subject"].astype(str).isin(whole_scans)
    if drop.any():
        log.info(
            "left out of the charts: %d structure measurements of scans flagged by the QC sanity checks",
            int(drop.sum()),
        )
    return selected[~drop.to_numpy()]


def text_dummies(values: pd.Series, min_scans: int = MIN_LEVEL_SCANS) -> tuple[str, dict[str, tuple[np.ndarray, str]]]:
    """(reference level, {"name=level": (its 0/1 column, the levels it stands for joined by "|")}) of a text
    covariate ``values`` (named name): treatment dummies against the most common level (ties: the first in
    sorted order); levels of fewer than ``min_scans`` scans pooled into ``other`` (unless every level is)."""
    counts = values.value_counts()
    rare = sorted(counts.index[counts < min_scans]) if (counts >= min_scans).any() else []
    if rare:
        log.info(
            "covariate %s: levels %s (fewer than %d scans each) pooled into %r", values.name, rare, min_scans, OTHER
        )
    pooled = values.where(~values.isin(rare), OTHER)
    counts = pooled.value_counts()
    reference = min(counts.index, key=lambda level: (-counts[level], level))
    members = {level: "|".join(rare) if level == OTHER and rare else level for level in counts.index}
    return reference, {
        f"{values.name}={level}": ((pooled == level).to_numpy(float), members[level])
        for level in sorted(counts.index)
        if level != reference
    }


class NormativeFit(NamedTuple):
    """What ``fit_charts`` makes: the charts and covariate tables (module docstring), and per scan of a chart
    its out-of-fold z (method lms: SCORE_COLUMNS; the calibration's held-out placements)."""

    charts: pd.DataFrame
    coefficients: pd.DataFrame
    scores: pd.DataFrame


@dataclass(frozen=True)
class ChartSettings:
    """How the charts are fitted (config's ``normative`` block: ``from_config``); see the module docstring."""

    percentiles: tuple[float, ...] = PERCENTILES  # strictly increasing, within (0, 100)
    covariates: tuple[str, ...] = COVARIATES  # those the table has are adjusted for
    by_sex: bool = True  # charts M and F (where the table has a sex column), else one chart over every scan
    spline_df: int = SPLINE_DF  # method quantile: degrees of freedom of the natural spline in age
    min_n: int = MIN_N  # the fewest scans of a chart
    age_step: float = AGE_STEP  # years between the chart's rows
    method: str = LMS  # one of METHODS
    site: str | None = None  # a column whose values get a random intercept on the location (method lms)
    # method lms: its settings; its percentiles, age step and least scans are this object's (None: defaults)
    centiles: "CentileSettings | None" = None

    def __post_init__(self):
        object.__setattr__(self, "percentiles", _check_percentiles(self.percentiles))
        object.__setattr__(self, "covariates", tuple(self.covariates))
        _check_integer("min_n", self.min_n, 5)
        _check_integer("spline_df", self.spline_df, 2)
        if self.method not in METHODS:
            raise ValueError(f"method {self.method!r}: choose one of {', '.join(METHODS)}")
        age_step = self.age_step
        if not (isinstance(age_step, (int, float, np.number)) and np.isfinite(age_step) and age_step > 0):
            raise ValueError(f"age_step must be a positive number, got {age_step!r}")
        if self.site and self.method != LMS:
            raise ValueError(f"normative.site {self.site!r}: a random site intercept needs method {LMS}")

    @classmethod
    def from_config(cls, normative: Mapping) -> "ChartSettings":
        """From config's ``normative`` block: its keys named like the fields, and the lms method's settings."""
        from ctcohort.centiles import CentileSettings

        values = {key: value for key, value in dict(normative).items() if key in cls.__dataclass_fields__}
        return cls(**{**values, "centiles": CentileSettings.from_config(normative)})

    def centile_settings(self) -> "CentileSettings | None":
        """The lms method's settings with this object's percentiles, age step and least scans (None: quantile)."""
        from ctcohort.centiles import CentileSettings

        if self.method != LMS:
            return None
        return replace(
            self.centiles or CentileSettings(),
            percentiles=self.percentiles,
            min_scans=self.min_n,
            age_step=float(self.age_step),
        )


def fit_charts(
    measurements: pd.DataFrame,
    structures,
    measures,
    settings: ChartSettings = ChartSettings(),
    combined: Mapping[str, Sequence[str]] | None = None,
) -> NormativeFit:
    """``fit_panel_charts`` of every structure x measure: ``structures`` in this order (None: every structure of
    the table, in table order), each with ``measures`` in this order."""
    if structures is None:
        structures = list(dict.fromkeys(measurements["structure"])) if "structure" in measurements.columns else []
    return fit_panel_charts(measurements, [(s, m) for s in structures for m in measures], settings, combined)


def fit_panel_charts(
    measurements: pd.DataFrame,
    panels: Sequence[tuple[str, str]],
    settings: ChartSettings = ChartSettings(),
    combined: Mapping[str, Sequence[str]] | None = None,
    processes: int = 1,
) -> NormativeFit:
    """The charts (``chart_columns(percentiles, covariates)`` and, after note, METHOD_COLUMNS), their covariate
    coefficients (``coefficient_columns(percentiles)``) and, for method lms, each charted scan's out-of-fold z;
    see the module docstring. ``panels``: the (structure, measure) pairs to chart, in this order, each per sex; a
    structure not in the table gets one not_in_study row with n 0 (and a warning).
    ``combined``: the study's combined structures (statistics.combined); a charted one carries its members in
    ``members``, so that a new scan's own combination can be made. ``processes``: charts fitted side by side in
    this many worker processes (each chart seeded by itself, so the tables are the same whatever the number),
    each with one BLAS thread."""
    from ctcohort.parallel import map_processes

    _check_integer("processes", processes, 1)
    panels = [(structure, measure) for structure, measure in panels]
    missing = [m for m in dict.fromkeys(["structure", "age", *(m for _, m in panels)]) if m not in measurements.columns]
    if missing:
        raise ValueError(f"the measurement table has no column {', '.join(missing)}")
    present = present_columns(measurements, list(settings.covariates))
    site = (present_columns(measurements, [settings.site], "normative.site") or [None])[0] if settings.site else None
    fitter = ChartFitter(settings, present, site)
    tasks = _chart_tasks(measurements, panels, settings.by_sex, combined)
    fitted = map_processes(fitter.fitted, *zip(*tasks), processes=min(processes, len(tasks))) if tasks else []
    chart_rows, coefficient_rows, scores = ([row for one in fitted for row in one[i]] for i in range(3))
    charts = pd.DataFrame(chart_rows, columns=[*chart_columns(fitter.levels, fitter.covariates), *fitter.extra_columns])
    # text: "" where the method has none, as read_statistics reads it
    for column in ("family", "site_column"):
        charts[column] = charts[column].astype(object).where(charts[column].notna(), "")
    coefficients = pd.DataFrame(coefficient_rows, columns=coefficient_columns(fitter.levels))
    _log_fitted(charts, settings.method, present)
    scores = pd.concat(scores, ignore_index=True) if scores else pd.DataFrame(columns=SCORE_COLUMNS)
    return NormativeFit(charts, coefficients, scores)


def _chart_tasks(
    measurements: pd.DataFrame,
    panels: list[tuple[str, str]],
    by_sex: bool,
    combined: Mapping[str, Sequence[str]] | None,
) -> list[tuple[dict, pd.DataFrame, str, bool]]:
    """(key, the chart's scans, measure, whether the structure is in the table) of each panel x sex."""
    if by_sex and "sex" not in measurements.columns:
        log.warning("no sex column: one chart over every scan (sex %s)", ALL)
    sexes = SEXES if by_sex and "sex" in measurements.columns else (ALL,)
    sex = measurements["sex"].astype(object) if sexes == SEXES else pd.Series(ALL, measurements.index)
    group = measurements["group"] if "group" in measurements.columns else pd.Series("", measurements.index)
    group = group.astype(object).where(group.notna(), "").astype(str)
    unknown = list(dict.fromkeys(s for s, _ in panels if s not in set(measurements["structure"])))
    if unknown:
        log.warning("no such structure in the measurement table: %s (charts noted %s)", unknown, NOT_IN_STUDY)
    tasks = []
    for structure, measure in panels:
        in_structure = (measurements["structure"] == structure).to_numpy()
        structure_group = group[in_structure].iloc[0] if in_structure.any() else ""
        for s in sexes:
            key = {
                "structure": structure,
                "group": structure_group,
                "members": "+".join((combined or {}).get(structure, ())),
                "measure": measure,
                "sex": s,
            }
            tasks.append((key, measurements[in_structure & (sex == s).to_numpy()], measure, in_structure.any()))
    return tasks


def _log_fitted(charts: pd.DataFrame, method: str, present: list[str]) -> None:
    keys = charts.drop_duplicates(["structure", "measure", "sex"])
    notes = keys.loc[keys["note"] != "", "note"].value_counts()
    untested = ", ".join(f"{count} {note}" for note, count in notes.items())
    log.info(
        "normative charts (%s) given %s: %d of %d fitted; not fitted: %s",
        method,
        present,
        (keys["note"] == "").sum(),
        len(keys),
        untested or "none",
    )


def centile_scores(fit: NormativeFit, measurements: pd.DataFrame) -> pd.DataFrame:
    """Every scan of ``measurements`` (a cohort table, one row per subject x structure) on the charts, one row
    per scan x charted structure and measure, each scored against charts it did not help fit: a scan that made
    a chart (method lms) gets the calibration's out-of-fold z, from a fit without its fold (``fit``
    "out_of_fold"); any other scan (not in the reference, another scan of a patient, a chart of method quantile)
    is placed on the full chart ("full_chart"). The structures and measures without a chart have no rows (at
    10,000 scans they made 2.2 million no_chart rows, 98% of the table)."""
    charted = fit.charts[["structure", "measure"]].drop_duplicates().astype(str)
    joined = fit.charts["members"].dropna() if "members" in fit.charts else []
    members = {member for names in joined for member in str(names).split("+")}
    needed = measurements["structure"].astype(str).isin(set(charted["structure"]) | members)
    placed = place_cohort(fit.charts, fit.coefficients, measurements[needed.to_numpy()])
    pairs = pd.MultiIndex.from_frame(placed[["structure", "measure"]].astype(str))
    placed = placed[pairs.isin(pd.MultiIndex.from_frame(charted))].assign(fit="full_chart")
    held = fit.scores.rename(columns={"fold": "fit"})
    if held.empty:
        return placed[SCORE_TABLE_COLUMNS]
    z = pd.to_numeric(held["z"], errors="coerce")  # panels without scores leave object columns
    held = held.assign(z=z, percentile=100 * stats.norm.cdf(z), note="")
    key = ["subject", "structure", "measure"]
    index = pd.MultiIndex.from_frame(placed[key].astype(str))
    replaced = index.isin(pd.MultiIndex.from_frame(held[key].astype(str)))
    return pd.concat([placed[~replaced], held], ignore_index=True)[SCORE_TABLE_COLUMNS]


class ChartFitter:
    """Fits one chart after another into the rows of the charts, coefficients and scores tables."""

    def __init__(self, settings: ChartSettings, present: list[str], site: str | None = None):
        self.levels, self.covariates = settings.percentiles, list(settings.covariates)
        self.present, self.site = present, site
        self.spline_df, self.min_n, self.method = settings.spline_df, settings.min_n, settings.method
        self.age_step, self.centiles = float(settings.age_step), settings.centile_settings()
        self.names = [percentile_column(p) for p in self.levels]
        self.extra_columns = [
            *METHOD_COLUMNS,
            *CALIBRATION_COLUMNS,
            *(f"{name}_{end}" for name in self.names for end in ("low", "high")),
        ]
        self.chart_rows, self.coefficient_rows, self.scores = [], [], []

    def _frame(self, block: pd.DataFrame, measure: str) -> pd.DataFrame:
        """Complete cases: y, age, the present covariates (text as text) and the site; an infinite value is no
        measurement, an empty text no value."""
        frame = pd.DataFrame(
            {"y": block[measure].to_numpy(dtype=float), "age": block["age"].to_numpy(dtype=float)}, index=block.index
        )
        keep = np.isfinite(frame.to_numpy()).all(axis=1)
        for name in [*self.present, *([self.site] if self.site else [])]:
            values = block[name]
            if pd.api.types.is_numeric_dtype(values):
                frame[name] = values.to_numpy(dtype=float)
                keep &= np.isfinite(frame[name].to_numpy())
            else:
                frame[name] = values.astype(object).where(values.notna(), "").astype(str).str.strip()
                keep &= (frame[name] != "").to_numpy()
        return frame[keep]

    def _covariate_design(self, frame: pd.DataFrame) -> tuple[pd.DataFrame, dict, dict, dict]:
        """(the model's covariate columns c0, c1, ..., each one's name (a text covariate's: name=level), the
        levels it stands for ("" for a number), the reference of every configured covariate): a numeric
        covariate that varies enters as itself (reference 0), a text one as dummies (``text_dummies``); one
        constant over the chart is left out and the chart drawn at its value."""
        columns, labels, members = {}, {}, {}
        reference = dict.fromkeys(self.covariates, np.nan)
        for name in self.present if len(frame) else []:
            values = frame[name]
            if pd.api.types.is_numeric_dtype(values):
                varying = values.nunique() > 1
                reference[name] = 0.0 if varying else float(values.iloc[0])
                entered = {name: (values.to_numpy(), "")} if varying else {}
            else:
                reference[name], entered = text_dummies(values, MIN_LEVEL_SCANS)
            for label, (column, held) in entered.items():
                c = f"c{len(columns)}"
                columns[c], labels[c], members[c] = column, label, held
        return pd.DataFrame(columns, index=frame.index), labels, members, reference

    def fitted(self, key: dict, block: pd.DataFrame, measure: str, in_study: bool) -> tuple[list, list, list]:
        """The chart, coefficient and score rows of one chart, fitted by a fitter of its own (so that worker
        processes can run it) with one BLAS thread: many threads made these small fits 5-10x slower."""
        from threadpoolctl import threadpool_limits

        one = copy.copy(self)
        one.chart_rows, one.coefficient_rows, one.scores = [], [], []
        with threadpool_limits(1):
            one.fit(key, block, measure, in_study)
        return one.chart_rows, one.coefficient_rows, one.scores

    def fit(self, key: dict, block: pd.DataFrame, measure: str, in_study: bool) -> None:
        frame = self._frame(block, measure)
        n = len(frame)
        key = {**key, "n": n}
        design, labels, members, reference = self._covariate_design(frame)
        note = (
            NOT_IN_STUDY
            if not in_study
            else TOO_FEW_SCANS
            if n < self.min_n
            else CONSTANT
            if np.ptp(frame["age"]) == 0 or np.ptp(frame["y"]) == 0
            else ""
        )
        model_frame = pd.concat([frame[["y", "age"]], design], axis=1)
        if not note and self.method == QUANTILE:
            note = self._quantile(key, model_frame, labels, members, reference)
        elif not note:
            note = self._lms(key, model_frame, labels, members, reference, block, frame)
        if note:
            self._refused(key, note)

    def _coefficient_row(self, key: dict, covariate: str, shifts, eta_mu: float, levels: str, effect: str) -> None:
        self.coefficient_rows.append(
            {
                "structure": key["structure"],
                "measure": key["measure"],
                "sex": key["sex"],
                "covariate": covariate,
                **dict(zip(self.names, shifts)),
                "eta_mu": eta_mu,
                "levels": levels,
                "effect": effect,
            }
        )

    def _refused(self, key: dict, note: str, **calibration) -> None:
        """The one row of a chart that is not drawn: its note, no ages or curves."""
        self.chart_rows.append(
            {
                **key,
                "age": np.nan,
                **dict.fromkeys(self.names, np.nan),
                **dict.fromkeys(self.covariates, np.nan),
                "note": note,
                "method": self.method,
                **calibration,
            }
        )

    def _quantile(self, key, frame, labels, members, reference) -> str:
        varying = list(labels)
        if len(frame) < 1 + self.spline_df + len(varying) + 2 or frame["age"].nunique() < self.spline_df + 2:
            return TOO_FEW_SCANS
        fits, solved = quantile_fits(frame[["y", "age", *varying]], self.levels, self.spline_df)
        if not solved:
            return NOT_CONVERGED
        ages = age_grid(float(frame["age"].min()), float(frame["age"].max()), self.age_step)
        new = pd.DataFrame({"age": ages, **{c: np.zeros(len(ages)) for c in varying}})
        # monotone rearrangement: the curves' values sorted across the levels at every age
        predicted = np.sort(np.column_stack([fit.predict(new) for fit in fits]), axis=1)
        for age, values in zip(ages, predicted):
            self.chart_rows.append(
                {**key, "age": float(age), **dict(zip(self.names, values)), **reference, "note": "", "method": QUANTILE}
            )
        for column in varying:
            self._coefficient_row(
                key, labels[column], [float(fit.params[column]) for fit in fits], np.nan, members[column], FIXED
            )
        return ""

    def _lms(self, key, frame, labels, members, reference, block, raw) -> str:
        from ctcohort.centiles import FAMILIES, FAMILY_PARAMETERS, fit_centile_chart

        named = frame[list(labels)].rename(columns=labels)
        sites = raw[self.site].astype(str).to_numpy() if self.site else None
        chart = fit_centile_chart(frame["age"].to_numpy(), frame["y"].to_numpy(), named, self.centiles, sites=sites)
        calibration = {column: chart.calibration.get(field, np.nan) for column, field in CALIBRATION_FIELDS.items()}
        if chart.out_of_fold_z is not None:
            self.scores.append(
                pd.DataFrame(
                    {
                        "subject": block.loc[frame.index, "subject"].to_numpy() if "subject" in block else frame.index,
                        "structure": key["structure"],
                        "measure": key["measure"],
                        "sex": key["sex"],
                        "value": frame["y"].to_numpy(),
                        "age": frame["age"].to_numpy(),
                        "z": chart.out_of_fold_z,
                        "fold": "out_of_fold",
                    }
                )
            )
        if chart.model is None:
            self._refused(key, chart.note, **calibration)
            return ""
        model = chart.model
        curves = chart.curves(frame["age"].to_numpy(), frame["y"].to_numpy(), named, sites=sites)
        if not np.isfinite(curves[self.names].to_numpy(dtype=float)).all():
            # a Box-Cox shape so strong that an outer centile lies beyond the distribution's support (15 scans:
            # nu = 14): no chart rather than one with holes
            self._refused(key, UNDEFINED_CENTILES, **calibration)
            return ""
        # at the reference (every varying covariate 0) and the population (site effect 0)
        eta = model.predictors(curves["age"].to_numpy())
        parameters = dict(zip(FAMILY_PARAMETERS[model.family], eta))
        site = {
            "site_column": self.site or "",
            "site_sd": model.site_sd if self.site else np.nan,
            "sites": len(model.design.site_levels) if self.site else np.nan,
        }
        for i, row in curves.iterrows():
            self.chart_rows.append(
                {
                    **key,
                    **row.to_dict(),
                    **reference,
                    "note": "",
                    "method": LMS,
                    "family": model.family,
                    "z_scale": model.z_scale,
                    **{f"eta_{p}": float(v[i]) for p, v in parameters.items()},
                    **site,
                    **calibration,
                }
            )
        # a shift of mu's linear predictor is additive on the measure for normal and shash, and of log mu for the
        # positive families bccg and bct
        additive = not FAMILIES[model.family].positive
        for column, name in labels.items():
            at_reference = dict.fromkeys(labels.values(), 0.0)
            shift = float(
                model.predictors([model.age_range[0]], {**at_reference, name: 1.0})[0][0]
                - model.predictors([model.age_range[0]], at_reference)[0][0]
            )
            self._coefficient_row(
                key, name, [shift if additive else np.nan] * len(self.names), shift, members[column], FIXED
            )
        for level, effect in model.site_effects.items():
            self._coefficient_row(
                key, f"{self.site}={level}", [effect if additive else np.nan] * len(self.names), effect, level, RANDOM
            )
        return ""


def chart_layout(charts: pd.DataFrame) -> tuple[tuple[float, ...], list[str]]:
    """(percentile levels, covariate names) of a charts table: the p<number> columns after age, and the
    columns between them and note."""
    columns = list(charts.columns)
    missing = [c for c in [*LEADING_COLUMNS, "note"] if c not in columns and c != "members"]  # members: optional
    if missing:
        raise ValueError(f"not a charts table: no column {', '.join(missing)}")
    middle = columns[columns.index("age") + 1 : columns.index("note")]
    levels = []
    for name in middle:
        match = _PERCENTILE_NAME.match(str(name))
        if not match:
            break
        levels.append(float(match.group(1)))
    return _check_percentiles(levels), middle[len(levels) :]


def normal_score(value: float, curves, percentiles) -> tuple[float, str]:
    """(z, note) of ``value`` among percentile curve values at one age (module docstring, placement):
    note "" inside the curves, below_chart / above_chart where z is extrapolated."""
    v = np.sort(np.asarray(curves, dtype=float))
    z = stats.norm.ppf(np.asarray(percentiles, dtype=float) / 100)
    if not (np.isfinite(value) and np.isfinite(v).all()):
        return np.nan, ""
    if value < v[0] or value > v[-1]:
        below = value < v[0]
        end = 0 if below else len(v) - 1
        # the line from the outer curve through the central one: a nearly flat outer segment (two outer
        # curves a hair apart) would put a scan just beyond them at z = 1e6
        central = int(np.argmin(np.abs(z)))
        if v[central] == v[end]:
            return np.nan, BELOW_CHART if below else ABOVE_CHART
        slope = (z[central] - z[end]) / (v[central] - v[end])
        return float(
            np.clip(z[end] + slope * (value - v[end]), -Z_LIMIT, Z_LIMIT)
        ), BELOW_CHART if below else ABOVE_CHART
    tied = np.flatnonzero(v == value)
    if len(tied):
        return float((z[tied[0]] + z[tied[-1]]) / 2), ""
    i = int(np.searchsorted(v, value)) - 1  # v[i] < value < v[i + 1], so v[i + 1] > v[i]
    return float(z[i] + (z[i + 1] - z[i]) * (value - v[i]) / (v[i + 1] - v[i])), ""


def _chart_sex(charts: pd.DataFrame, sex) -> str:
    sexes = set(charts["sex"].astype(str))
    if sexes & set(SEXES) and sex != ALL:
        if sex not in SEXES:
            raise ValueError(f"the charts are by sex: sex must be M or F, got {sex!r}")
        return sex
    if ALL not in sexes:
        raise ValueError(f"the charts have no sex {ALL!r} chart; give sex M or F")
    return ALL


def with_combined_structures(scans: pd.DataFrame, charts: pd.DataFrame) -> pd.DataFrame:
    """``scans`` (one scan's table, or a cohort's with a subject column) plus a row per scan for each charted
    combined structure (``members`` not empty) the table lacks, made from its members' rows as the workflow
    makes them (``aggregate.combine_structures``: summed volume, voxel-weighted HU, NaN unless every member is
    measured). A combination with a member the table does not list is left out (its chart then finds no row)."""
    if "members" not in charts.columns or "structure" not in scans.columns:
        return scans
    have = set(scans["structure"])
    wanted = {
        structure: members.split("+")
        for structure, members in charts[["structure", "members"]].drop_duplicates().itertuples(index=False)
        if isinstance(members, str) and members and structure not in have
    }
    if not wanted:
        return scans
    from ctcohort.aggregate import combine_structures

    lacking = [c for c in MEASURE_COLUMNS if c not in scans.columns]
    if lacking:
        raise ValueError(
            f"the scan's table has no column {', '.join(lacking)}, needed to combine "
            f"{', '.join(wanted)} from their members (ctcohort measure's table has them)"
        )
    cohort = scans if "subject" in scans.columns else scans.assign(subject="scan")
    covariates = [c for c in cohort.columns if c not in (MODEL_COLUMN, *MEASURE_COLUMNS)]
    rows = combine_structures(cohort[[*covariates, *MEASURE_COLUMNS]], wanted)
    return pd.concat([scans, rows.reindex(columns=scans.columns)], ignore_index=True)


class ChartModel(NamedTuple):
    """A fitted chart as placement uses it: its rows (ages ascending), the percentile levels and columns,
    the covariates of the charts table, and the covariate shifts of this chart's model."""

    rows: pd.DataFrame
    levels: tuple[float, ...]
    names: list[str]
    shifts: dict  # covariate (a text covariate's dummy: name=level) -> shift per unit, one per level
    eta_shifts: dict  # covariate -> shift of mu's linear predictor per unit (method lms)
    dummy_levels: dict  # a text covariate's dummy -> the levels it stands for
    site_effects: dict  # site -> its intercept on mu's linear predictor (method lms with a site)


def _chart_models(charts: pd.DataFrame, coefficients: pd.DataFrame) -> dict[tuple, ChartModel]:
    """The fitted charts by (structure, measure, sex)."""
    levels, names = chart_layout(charts)
    columns = [percentile_column(p) for p in levels]
    if not set(columns) <= set(coefficients.columns):
        raise ValueError(f"the coefficients table has not the charts' percentile columns {', '.join(columns)}")
    shifts, eta_shifts, dummy_levels, site_effects = {}, {}, {}, {}
    for _, row in coefficients.iterrows():
        key, covariate = (row["structure"], row["measure"], str(row["sex"])), row["covariate"]
        held = row.get("levels", "")
        if row.get("effect", FIXED) == RANDOM:
            site_effects.setdefault(key, {})[str(held)] = float(row["eta_mu"])
            continue
        shifts.setdefault(key, {})[covariate] = row[columns].to_numpy(dtype=float)
        eta_shifts.setdefault(key, {})[covariate] = float(row.get("eta_mu", np.nan))
        if isinstance(held, str) and held:
            dummy_levels.setdefault(key, {})[covariate] = set(held.split("|"))
    note = charts["note"].astype(object).where(charts["note"].notna(), "").astype(str)
    fitted = charts[(note == "").to_numpy() & np.isfinite(charts["age"].to_numpy(dtype=float))]
    return {
        key: ChartModel(
            block.sort_values("age"),
            levels,
            names,
            shifts.get(key, {}),
            eta_shifts.get(key, {}),
            dummy_levels.get(key, {}),
            site_effects.get(key, {}),
        )
        for key, block in (
            (tuple(map(str, k)), b) for k, b in fitted.groupby(["structure", "measure", "sex"], sort=False)
        )
    }


def place_values(
    chart: ChartModel, values: np.ndarray, ages: np.ndarray, covariates: pd.DataFrame
) -> tuple[np.ndarray, np.ndarray]:
    """(z, note) of each value on one chart, at its age and covariates (``covariates``: one row per value, a
    column per covariate given, NaN where not given); notes as in the module docstring, placement."""
    columns = [percentile_column(p) for p in chart.levels]
    chart_ages = chart.rows["age"].to_numpy(dtype=float)
    notes = np.full(len(values), "", dtype=object)
    notes[~np.isfinite(values)] = NO_VALUE
    notes[(notes == "") & ((ages < chart_ages[0]) | (ages > chart_ages[-1]))] = AGE_OUTSIDE_CHART
    curves = np.column_stack([np.interp(ages, chart_ages, chart.rows[c].to_numpy(dtype=float)) for c in columns])
    offsets = _covariate_offsets(chart, covariates, notes)
    z = np.full(len(values), np.nan)
    if "method" in chart.rows and chart.rows["method"].iloc[0] == LMS:
        placed = notes == ""
        z[placed], notes[placed] = _lms_z(
            chart,
            values[placed],
            ages[placed],
            covariates[placed],
            {name: offset[placed] for name, offset in offsets.items()},
        )
        return z, notes
    for name, offset in offsets.items():
        curves = curves + np.outer(offset, chart.shifts[name])
    # the shifts differ between percentiles: sorted again (monotone rearrangement)
    curves = np.sort(curves, axis=1)
    for i in np.flatnonzero(notes == ""):
        z[i], notes[i] = normal_score(values[i], curves[i], chart.levels)
    return z, notes


def _given(covariates: pd.DataFrame, name: str) -> np.ndarray:
    """The scans' values of a covariate (object: numbers or text), NaN where not given."""
    return covariates[name].to_numpy(dtype=object) if name in covariates else np.full(len(covariates), np.nan, object)


def _covariate_offsets(chart: ChartModel, covariates: pd.DataFrame, notes: np.ndarray) -> dict[str, np.ndarray]:
    """Each covariate of the chart's model (a text covariate: each dummy) as the scans' value less the chart's
    reference (a dummy: 0/1); notes covariate_missing, and covariate_outside_chart for a level the chart has
    not or another value of a covariate constant over the chart (module docstring, placement)."""
    offsets = {}
    for name in chart.names:
        reference, given = chart.rows[name].iloc[0], _given(covariates, name)
        missing = pd.isna(given)
        dummies = {key: held for key, held in chart.dummy_levels.items() if key.split("=", 1)[0] == name}
        if dummies:
            text = given.astype(str)
            known = (text == str(reference)) | np.isin(text, list(set().union(*dummies.values())))
            notes[(notes == "") & missing] = COVARIATE_MISSING
            notes[(notes == "") & ~known] = COVARIATE_OUTSIDE_CHART
            offsets.update({key: np.isin(text, list(held)).astype(float) for key, held in dummies.items()})
            continue
        number = pd.to_numeric(pd.Series(given), errors="coerce").to_numpy(dtype=float)
        if name in chart.shifts:
            notes[(notes == "") & ~np.isfinite(number)] = COVARIATE_MISSING
            offsets[name] = np.nan_to_num(number - float(reference))
        elif pd.notna(reference):
            if isinstance(reference, str):
                same = given.astype(str) == reference
            else:
                same = np.isclose(number, float(reference), rtol=1e-6, atol=1e-9)
            notes[(notes == "") & ~missing & ~same] = COVARIATE_OUTSIDE_CHART
    return offsets


def _lms_z(chart: ChartModel, values: np.ndarray, ages: np.ndarray, covariates: pd.DataFrame, offsets: dict):
    """(z, note) on a chart of method lms: the family's z from its linear predictors at the scan's age (linear
    between the chart's ages, a year apart: the splines are smooth on that scale), mu's shifted by the covariates
    and the scan's site effect; a scan of a site the chart has not (or without a site): ``site_new``, widened."""
    from ctcohort.centiles import FAMILY_PARAMETERS, new_site_sd, z_by_site

    family = chart.rows["family"].iloc[0]
    chart_ages = chart.rows["age"].to_numpy(dtype=float)
    eta = [np.interp(ages, chart_ages, chart.rows[f"eta_{p}"].to_numpy(dtype=float)) for p in FAMILY_PARAMETERS[family]]
    for name, offset in offsets.items():
        eta[0] = eta[0] + chart.eta_shifts[name] * offset
    site_column = chart.rows["site_column"].iloc[0] if "site_column" in chart.rows else ""
    new, widening = np.zeros(len(values), bool), 0.0
    if isinstance(site_column, str) and site_column:
        sites = _given(covariates, site_column).astype(str)
        effect = np.array([chart.site_effects.get(site, np.nan) for site in sites], dtype=float)
        new = np.isnan(effect)
        eta[0] = eta[0] + np.nan_to_num(effect)
        widening = new_site_sd(float(chart.rows["site_sd"].iloc[0]), int(chart.rows["sites"].iloc[0]))
    return z_by_site(family, values, eta, new, widening, float(chart.rows["z_scale"].iloc[0]), Z_LIMIT)


def _site_columns(charts: pd.DataFrame) -> list[str]:
    """The columns whose values carry a random site intercept on some chart (method lms with normative.site)."""
    if "site_column" not in charts:
        return []
    return [c for c in dict.fromkeys(charts["site_column"]) if isinstance(c, str) and c]


def _given_covariates(covariates: Mapping | None, names: list[str]) -> dict:
    """{name: value} of a scan's covariates (a number, or text for a text covariate or the site); a covariate
    given as NaN is not given; unknown names: an error."""
    covariates = {str(k): v for k, v in (covariates or {}).items() if pd.notna(v)}
    unknown = sorted(set(covariates) - set(names))
    if unknown:
        raise ValueError(f"the charts have no covariate {', '.join(unknown)} (they have: {', '.join(names) or 'none'})")
    return covariates


def _charted_measures(charts: pd.DataFrame, table: pd.DataFrame) -> list[str]:
    if "structure" not in table.columns:
        raise ValueError("the scan's table has no structure column")
    measures = list(dict.fromkeys(charts["measure"]))
    if not any(m in table.columns for m in measures):
        raise ValueError(f"the scan's table has none of the charted measures {', '.join(measures)}")
    lacking = [m for m in measures if m not in table.columns]
    if lacking:
        log.warning("measures charted but not in the scan's table: %s", ", ".join(lacking))
    return [m for m in measures if m in table.columns]


def _placement_rows(
    models: dict, table: pd.DataFrame, measures: list[str], sexes: pd.Series, ages: np.ndarray, covariates: pd.DataFrame
) -> pd.DataFrame:
    """PLACEMENT_COLUMNS (and subject, where ``table`` has one) of every row of ``table`` x measure; ``sexes``,
    ``ages``, ``covariates``: each row's chart sex, age and covariates."""
    frames = []
    for measure in measures:
        values = pd.to_numeric(table[measure], errors="coerce").to_numpy(dtype=float)
        z, notes = np.full(len(table), np.nan), np.full(len(table), NO_CHART, dtype=object)
        for (structure, sex), rows in table.groupby([table["structure"], sexes], sort=False).indices.items():
            chart = models.get((structure, measure, sex))
            if chart is not None:
                z[rows], notes[rows] = place_values(chart, values[rows], ages[rows], covariates.iloc[rows])
        frame = pd.DataFrame(
            {
                "structure": table["structure"].to_numpy(),
                "measure": measure,
                "value": values,
                "age": ages,
                "sex": sexes.to_numpy(),
                "percentile": 100 * stats.norm.cdf(z),
                "z": z,
                "note": notes,
            }
        )
        if "subject" in table.columns:
            frame.insert(0, "subject", table["subject"].to_numpy())
        frames.append(frame.assign(row=np.arange(len(table))))
    # in the table's row order, each row's measures in the charts' order
    return pd.concat(frames, ignore_index=True).sort_values("row", kind="stable").drop(columns="row")


def place_on_charts(
    charts: pd.DataFrame,
    coefficients: pd.DataFrame,
    scan: pd.DataFrame,
    age: float,
    sex,
    covariates: dict | None = None,
) -> pd.DataFrame:
    """One scan on the normative charts (columns PLACEMENT_COLUMNS; module docstring, placement).

    ``scan``: one row per structure, with a structure column and measure columns (``ctcohort measure``'s
    table, or one scan's rows of measurements.tsv). ``sex``: M or F for charts by sex (``all``, or anything,
    where the charts are over every scan). ``covariates``: {name: value} of the scan, e.g. {"contrast": 1};
    a name the charts do not have is an error.
    """
    _, names = chart_layout(charts)
    if charts.empty:
        raise ValueError("the charts table has no rows")
    try:
        age = float(age)
    except (TypeError, ValueError):
        raise ValueError(f"age must be a number, got {age!r}") from None
    if not np.isfinite(age):
        raise ValueError(f"age must be a finite number, got {age!r}")
    given = _given_covariates(covariates, [*names, *_site_columns(charts)])
    chart_sex = _chart_sex(charts, sex)
    scan = with_combined_structures(scan, charts)
    measures = _charted_measures(charts, scan)
    duplicated = scan["structure"][scan["structure"].duplicated()].unique()
    if len(duplicated):
        raise ValueError(
            f"the scan's table has several rows of {', '.join(map(str, duplicated[:5]))}: one scan, "
            "one row per structure"
        )
    scan = scan.drop(columns="subject", errors="ignore").reset_index(drop=True)
    return _placement_rows(
        _chart_models(charts, coefficients),
        scan,
        measures,
        pd.Series(chart_sex, scan.index),
        np.full(len(scan), age),
        pd.DataFrame(given, index=scan.index),
    )[PLACEMENT_COLUMNS]


def place_cohort(charts: pd.DataFrame, coefficients: pd.DataFrame, measurements: pd.DataFrame) -> pd.DataFrame:
    """Every scan of a cohort table on the normative charts, in one call: ``measurements`` in the format of
    results/tables/measurements.tsv (one row per subject x structure; subject, age, sex where the charts are
    by sex, the charts' covariates as columns, the measures). Columns: subject, then PLACEMENT_COLUMNS. A scan
    without an age, or without sex M or F where the charts are by sex, is placed nowhere (``no_chart``)."""
    _, names = chart_layout(charts)
    missing = [c for c in ("subject", "structure", "age") if c not in measurements.columns]
    if missing:
        raise ValueError(f"a cohort table needs the column(s) {', '.join(missing)} (measurements.tsv has them)")
    table = with_combined_structures(measurements, charts).reset_index(drop=True)
    measures = _charted_measures(charts, table)
    by_sex = bool(set(charts["sex"].astype(str)) & set(SEXES))
    if by_sex and "sex" not in table.columns:
        raise ValueError("the charts are by sex: the cohort table needs a sex column")
    sexes = table["sex"].astype(str) if by_sex else pd.Series(ALL, table.index)
    ages = pd.to_numeric(table["age"], errors="coerce").to_numpy(dtype=float)
    covariates = table[[c for c in [*names, *_site_columns(charts)] if c in table.columns]]
    placed = _placement_rows(_chart_models(charts, coefficients), table, measures, sexes, ages, covariates)
    return placed[["subject", *PLACEMENT_COLUMNS]]
