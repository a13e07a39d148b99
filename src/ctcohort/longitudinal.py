"""Within-patient change from repeated scans: a linear mixed model per structure x group x measure.

Scans: a structure x measure uses the scans with a finite age, time, measure and every covariate value
(complete cases) of the patients (``ctcohort.patients.patient_of``) that keep two or more such scans; a
patient with a single scan is not used. Time of a scan, in years since the patient's first used scan: the
table's ``years`` column (years since the patient's first study) minus the patient's smallest used
``years`` where the table has that column with any value, else the scan's age minus the patient's
youngest used age (coarse where ages are whole years). Baseline age: the patient's age at that first used
scan.

Model (REML, one fit per row, groups = patients):

    measure = b0 + b_within * time + b_between * baseline_age + covariates + u_patient + v_patient * time + e

u (random intercept) and v (random slope on time) jointly normal with an unstructured 2 x 2 covariance, e
independent normal. The random slope is fitted where it is identifiable (at least MIN_SLOPE_PATIENTS
patients with three or more distinct times); where that fit does not converge, or is singular (the random
effects' covariance, time in SD units, has an eigenvalue below SINGULAR_RATIO x its largest: no slope
variance, or intercept and slope correlated +-1), the random-intercept fit is kept. ``random_slope`` says
which model gave the row, ``random_slope_note`` why the slope is absent: ``few_patients_with_3_times``,
``singular``, ``not_converged``, ``off`` (random_slope=False); "" where fitted. Covariates as in
``ctcohort.models``: numbers as they are, a text column (sex) as indicators (``stats.encode_covariates``);
a covariate column constant over the used scans drops out.

Fitting: statsmodels' MixedLM model and REML criterion (fixed effects and residual variance profiled out;
the random-effects covariance as a Cholesky factor), computed from per-patient sums (Z'Z, Z'X, Z'y with
Z = [1, time]), with its analytic gradient, minimised by BFGS from a moment estimate of the intercept
variance (the slope fit starts from the intercept fit). cov(beta) = scale x (X' V^-1 X)^-1; P and CI from the
normal reference, as statsmodels gives them. Why not MixedLM itself: it loops over patients in Python,
about 1.3 s (random intercept) and 4.5 s (random slope) per row at 2,100 patients and 6,200 scans, i.e.
tens of minutes for a table of 340 rows; this takes about 3 ms and 15 ms (benchmarks/longitudinal_speed.py).
tests/test_longitudinal.py checks the two against each other (fixed effects to 1e-4; statsmodels' SE, from
the observed information, to 1%), and the within slope against patient-demeaned OLS.

Columns (LONGITUDINAL_COLUMNS): n_patients and n_scans used; slope_within_per_year = b_within (the
within-patient change per year), its 95% CI (ci_low, ci_high) and two-sided Wald P (p);
slope_between_per_year = b_between (the cross-sectional difference per year of baseline age) with its CI; P never
below 2^(1 - n_patients), what an exact sign-flip test of n patients permits (``wald``);
p_difference: Wald test of b_within - b_between with the fit's covariance (the within-patient change
differs from the cross-sectional one: cohort or selection effects, or a non-linear trajectory).
p_bonferroni and q_fdr (Benjamini-Hochberg) correct ``p`` over the tested rows (note "") of this table only;
``significant`` applies ``alpha`` to the chosen correction. p_difference is not corrected.

Notes (not tested; statistics NaN): ``too_few_patients``: fewer than ``min_patients`` patients with two or
more used scans, or no residual degrees of freedom left; ``constant``: the measure, the time or the
baseline age takes a single value, or the design is otherwise rank deficient; ``not_converged``: the
random-intercept fit did not converge.
"""

import logging
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import optimize, stats

from ctcohort.patients import patient_of
from ctcohort.stats import (
    CONSTANT,
    CORRECTIONS,
    correct_p_values,
    encode_covariates,
    present_columns,
    structure_blocks,
    structure_families,
)

LONGITUDINAL_COLUMNS = [
    "structure",
    "group",
    "family",
    "measure",
    "n_patients",
    "n_scans",
    "slope_within_per_year",
    "ci_low",
    "ci_high",
    "p",
    "slope_between_per_year",
    "between_ci_low",
    "between_ci_high",
    "p_difference",
    "random_slope",
    "random_slope_note",
    "p_bonferroni",
    "q_fdr",
    "significant",
    "note",
]
# the estimates of a row, NaN where it is not tested
ESTIMATE_COLUMNS = LONGITUDINAL_COLUMNS[
    LONGITUDINAL_COLUMNS.index("slope_within_per_year") : LONGITUDINAL_COLUMNS.index("random_slope")
]
MIN_PATIENTS = 10
MIN_SLOPE_PATIENTS = 10
SINGULAR_RATIO = 1e-4
TOO_FEW_PATIENTS = "too_few_patients"
NOT_CONVERGED = "not_converged"
FEW_SLOPE_PATIENTS = "few_patients_with_3_times"
SINGULAR = "singular"
SLOPE_OFF = "off"
Z_95 = stats.norm.ppf(0.975)
log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------ the data


def structure_scans(block: pd.DataFrame, covariates: list[str]) -> pd.DataFrame:
    """The scans of ``block`` (one structure) with a finite age, time and covariates, sorted by patient and
    time: columns patient, position (the row in ``block``), age, clock (years or age) and the encoded
    covariate columns. Computed once per structure; ``repeated_scans`` picks each measure's rows from it."""
    has_years = "years" in block.columns and pd.to_numeric(block["years"], errors="coerce").notna().any()
    clock = block["years" if has_years else "age"]
    scans = pd.DataFrame(
        {
            "patient": patient_of(block).to_numpy(),
            "position": np.arange(len(block)),
            "age": pd.to_numeric(block["age"], errors="coerce").to_numpy(dtype=float),
            "clock": pd.to_numeric(clock, errors="coerce").to_numpy(dtype=float),
        }
    )
    scans = pd.concat([scans, encode_covariates(block, covariates).reset_index(drop=True)], axis=1)
    scans = scans[np.isfinite(scans.drop(columns="patient").to_numpy(dtype=float)).all(axis=1)]
    return scans.sort_values(["patient", "clock"], kind="stable").reset_index(drop=True)


def patient_starts(patient: np.ndarray) -> np.ndarray:
    """The first row of each patient in rows sorted by patient."""
    return np.flatnonzero(np.r_[True, patient[1:] != patient[:-1]]) if len(patient) else np.zeros(0, dtype=int)


def repeated_scans(
    block: pd.DataFrame, measure: str, covariates: list[str], scans: pd.DataFrame | None = None
) -> pd.DataFrame:
    """The scans of ``block`` (one structure) that a measure's model uses, sorted by patient and time:
    columns patient, y, time, baseline_age and the encoded covariate columns (module docstring).
    ``scans``: ``structure_scans(block, covariates)`` where already at hand."""
    scans = structure_scans(block, covariates) if scans is None else scans
    y = pd.to_numeric(block[measure], errors="coerce").to_numpy(dtype=float)[scans["position"].to_numpy()]
    frame = scans[np.isfinite(y)].assign(y=y[np.isfinite(y)])
    counts = np.diff(np.r_[patient_starts(frame["patient"].to_numpy()), len(frame)])
    frame = frame[np.repeat(counts >= 2, counts)]
    starts = patient_starts(frame["patient"].to_numpy())
    first = np.repeat(starts, np.diff(np.r_[starts, len(frame)]))
    clock, age = frame["clock"].to_numpy(), frame["age"].to_numpy()
    frame = frame.assign(time=clock - clock[first], baseline_age=age[first]).reset_index(drop=True)
    covariate_columns = [c for c in scans.columns if c not in ("patient", "position", "age", "clock")]
    return frame[["patient", "y", "time", "baseline_age", *covariate_columns]]


def design(frame: pd.DataFrame) -> tuple[np.ndarray, list[str]]:
    """Fixed-effects design: intercept, time, baseline_age and the covariate columns that vary."""
    covariates = [
        c
        for c in frame.columns
        if c not in ("patient", "y", "time", "baseline_age") and np.ptp(frame[c].to_numpy()) > 0
    ]
    names = ["intercept", "time", "baseline_age", *covariates]
    columns = [np.ones(len(frame)), *(frame[c].to_numpy(dtype=float) for c in names[1:])]
    return np.column_stack(columns), names


def slope_identifiable(frame: pd.DataFrame, min_slope_patients: int = MIN_SLOPE_PATIENTS) -> bool:
    """Enough patients with three or more distinct times to tell a random slope from the residual."""
    distinct = frame.groupby("patient", sort=False)["time"].nunique()
    return int((distinct >= 3).sum()) >= min_slope_patients


# -------------------------------------------------------------------------------------- the mixed model


@dataclass(frozen=True)
class PatientSums:
    """Sufficient statistics of the mixed model: per patient i, G_i = Z_i'Z_i and ZW_i = Z_i'W_i with
    W = [X, y]; WW = W'W over all scans. Z = [1] or [1, time / time_scale]."""

    G: np.ndarray  # (patients, q, q)
    ZW: np.ndarray  # (patients, q, p + 1)
    WW: np.ndarray  # (p + 1, p + 1)
    n_scans: int
    p: int


def patient_sums(X: np.ndarray, y: np.ndarray, starts: np.ndarray, time: np.ndarray | None) -> PatientSums:
    """PatientSums of scans sorted by patient, ``starts`` the first row of each patient; ``time`` None for a
    random intercept only."""
    W = np.column_stack([X, y])
    Z = np.ones((len(y), 1)) if time is None else np.column_stack([np.ones(len(y)), time])
    ZW = np.add.reduceat(Z[:, :, None] * W[:, None, :], starts, axis=0)
    G = np.add.reduceat(Z[:, :, None] * Z[:, None, :], starts, axis=0)
    return PatientSums(G, ZW, gram(W), len(y), X.shape[1])


def gram(W: np.ndarray) -> np.ndarray:
    """W'W by einsum: on a loaded machine OpenBLAS threads wait on each other for longer than a
    (scans x a few columns) product takes (3x slower fits measured with another process busy)."""
    return np.einsum("na,nb->ab", W, W)


def full_rank(X: np.ndarray) -> bool:
    """Whether the columns of X are linearly independent (from the Gram matrix of the unit-length columns)."""
    norms = np.sqrt(np.diag(gram(X)))
    if np.any(norms == 0):
        return False
    correlation = gram(X / norms)
    return bool(np.linalg.eigvalsh(correlation)[0] > 1e-10)


def relative_covariance(theta: np.ndarray, q: int) -> np.ndarray:
    """D = L L' (random-effects covariance / residual variance) from L's lower-triangular entries, row by
    row: q = 1: [l00]; q = 2: [l00, l10, l11]."""
    L = np.zeros((q, q))
    L[TRIL[q]] = theta
    return L @ L.T


TRIL = {1: np.tril_indices(1), 2: np.tril_indices(2)}


def inverse_and_logdet(M: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Inverse and log-determinant of each 1 x 1 or 2 x 2 matrix of a stack (closed form: numpy.linalg's
    per-call overhead would cost more than the arithmetic)."""
    if M.shape[-1] == 1:
        return 1.0 / M, np.log(M[:, 0, 0])
    a, b, c, d = M[:, 0, 0], M[:, 0, 1], M[:, 1, 0], M[:, 1, 1]
    det = a * d - b * c
    inverse = np.stack([np.stack([d, -b], axis=-1), np.stack([-c, a], axis=-1)], axis=1) / det[:, None, None]
    return inverse, np.log(det)


@dataclass(frozen=True)
class RemlTerms:
    """The REML criterion's pieces at one D (H = I + Z D Z', block-diagonal by patient)."""

    criterion: float  # -2 REML log-likelihood up to a constant, beta and the residual variance profiled out
    beta: np.ndarray
    scale: float  # residual variance
    XHX: np.ndarray  # X' H^-1 X
    gradient: np.ndarray  # d criterion / d D (symmetric q x q)


def reml_terms(D: np.ndarray, sums: PatientSums) -> RemlTerms:
    """REML at D from the patient sums. Per patient (Woodbury and Sylvester): H_i^-1 = I - Z_i A_i Z_i' with
    A_i = (I + D G_i)^-1 D, |H_i| = |I + D G_i| >= 1, Z_i' H_i^-1 W_i = ZW_i - G_i A_i ZW_i. The gradient:
    dD enters rss as -e_i' dD e_i (e_i = Z_i' H_i^-1 residual_i), log|H| as tr(Z_i' H_i^-1 Z_i dD) and
    log|X' H^-1 X| as -tr(U_i (X' H^-1 X)^-1 U_i' dD) with U_i = Z_i' H_i^-1 X_i."""
    p = sums.p
    inverse, logdet = inverse_and_logdet(np.eye(D.shape[0]) + D @ sums.G)
    AZW = inverse @ D @ sums.ZW
    # einsum, not a BLAS product: OpenBLAS threads on a (p x 2 patients) product cost more than they save
    WHW = sums.WW - np.einsum("gra,grb->ab", sums.ZW, AZW)
    XHX, XHy, yHy = WHW[:p, :p], WHW[:p, p], WHW[p, p]
    chol = np.linalg.cholesky(XHX)
    beta = np.linalg.solve(XHX, XHy)
    dof = sums.n_scans - p
    rss = max(float(yHy - beta @ XHy), 1e-300)
    criterion = float(dof * np.log(rss / dof) + logdet.sum() + 2 * np.log(np.diag(chol)).sum())
    U = sums.ZW - sums.G @ AZW
    e = U @ np.r_[-beta, 1.0]
    UX = U[:, :, :p]
    gradient = (
        -(dof / rss) * gram(e) + (sums.G @ inverse).sum(axis=0) - np.einsum("gra,gsa->rs", UX @ np.linalg.inv(XHX), UX)
    )
    return RemlTerms(criterion, beta, rss / dof, XHX, gradient)


def reml_criterion(theta: np.ndarray, sums: PatientSums) -> tuple[float, np.ndarray]:
    """(REML criterion, its gradient) at the Cholesky entries ``theta`` of D; inf where undefined. With
    D = L L', d criterion / dL = 2 Gamma L for the symmetric gradient Gamma in D."""
    q = sums.G.shape[1]
    L = np.zeros((q, q))
    L[TRIL[q]] = theta
    try:
        with np.errstate(invalid="ignore", divide="ignore", over="ignore"):  # inf is the answer there
            terms = reml_terms(L @ L.T, sums)
    except np.linalg.LinAlgError:
        return np.inf, np.zeros_like(theta)
    if not np.isfinite(terms.criterion):
        return np.inf, np.zeros_like(theta)
    return terms.criterion, (2 * terms.gradient @ L)[TRIL[q]]


@dataclass(frozen=True)
class MixedFit:
    """A REML fit: fixed effects (intercept, time, baseline_age, covariates) and their covariance."""

    beta: np.ndarray
    cov: np.ndarray
    D: np.ndarray  # random-effects covariance / residual variance
    scale: float  # residual variance
    converged: bool


def fit_reml(sums: PatientSums, start: np.ndarray) -> MixedFit:
    """Minimise the REML criterion over the Cholesky entries of D with BFGS and the analytic gradient
    (unconstrained: D = L L' is a covariance for any L). Not L-BFGS-B: its compiled BLAS calls and numpy's
    OpenBLAS threads slow each other down, 5-8x on two loaded cores."""

    def per_scan(theta):  # O(1) gradients: BFGS's first step (the identity as Hessian) is then a sane one
        criterion, gradient = reml_criterion(theta, sums)
        return criterion / sums.n_scans, gradient / sums.n_scans

    result = optimize.minimize(per_scan, start, jac=True, method="BFGS", options={"maxiter": 200, "gtol": 1e-6})
    if not np.isfinite(result.fun):
        return MixedFit(None, None, None, np.nan, False)
    D = relative_covariance(result.x, sums.G.shape[1])
    terms = reml_terms(D, sums)
    converged = result.success or stationary(result.x, sums)
    return MixedFit(terms.beta, terms.scale * np.linalg.inv(terms.XHX), D, terms.scale, bool(converged))


def stationary(theta: np.ndarray, sums: PatientSums, step: float = 1e-4, tolerance: float = 1e-3) -> bool:
    """Whether no coordinate step of ``step`` lowers the criterion by more than ``tolerance`` (an optimiser
    that stopped for loss of precision at the optimum has converged all the same)."""
    here = reml_criterion(theta, sums)[0]
    for k in range(len(theta)):
        for delta in (-step, step):
            moved = theta.copy()
            moved[k] += delta
            if reml_criterion(moved, sums)[0] < here - tolerance:
                return False
    return True


def intercept_start(X: np.ndarray, y: np.ndarray, starts: np.ndarray) -> float:
    """Starting SD ratio of the random intercept: between- over within-patient SD of the OLS residuals."""
    residual = y - np.einsum("na,a->n", X, np.linalg.solve(gram(X), np.einsum("na,n->a", X, y)))
    counts = np.diff(np.append(starts, len(y)))
    means = np.add.reduceat(residual, starts) / counts
    within = np.sum((residual - np.repeat(means, counts)) ** 2) / max(1, len(y) - len(starts))
    between = max(np.var(means) - within / counts.mean(), 0.01 * within)
    return float(np.sqrt(between / within)) if within > 0 else 1.0


def is_singular(D: np.ndarray) -> bool:
    eigenvalues = np.linalg.eigvalsh(D)
    return bool(eigenvalues[0] <= SINGULAR_RATIO * max(eigenvalues[-1], 1e-12))


def fit_mixed_model(
    X: np.ndarray, y: np.ndarray, time: np.ndarray, starts: np.ndarray, random_slope: bool
) -> tuple[MixedFit, bool, str]:
    """(fit, random slope used, why not): the random-intercept fit, then, where ``random_slope``, the
    random-slope fit started from it (time in SD units), kept where it converged and is not singular."""
    intercept = fit_reml(patient_sums(X, y, starts, None), np.array([intercept_start(X, y, starts)]))
    if not random_slope:
        return intercept, False, ""
    time_scale = float(np.std(time))
    sums = patient_sums(X, y, starts, time / time_scale)
    l00 = max(float(np.sqrt(intercept.D[0, 0])), 0.1)
    slope = fit_reml(sums, np.array([l00, 0.0, 0.3]))
    if not slope.converged:
        return intercept, False, NOT_CONVERGED
    if is_singular(slope.D):
        return intercept, False, SINGULAR
    return slope, True, ""


# ----------------------------------------------------------------------------------------- the table


def wald(estimate: float, variance: float, n_patients: int) -> tuple[float, float, float]:
    """(ci_low, ci_high, two-sided P) of a normal Wald test, the P never below 2^(1 - n_patients): the smallest P
    an exact test of n independent patients (flipping the sign of each patient's change) can give. A Wald P of
    1e-295 from 14 patients claims more than 14 patients can show."""
    se = float(np.sqrt(variance)) if variance > 0 else np.nan
    p = max(float(2 * stats.norm.sf(abs(estimate) / se)), 2.0 ** (1 - n_patients)) if np.isfinite(se) else np.nan
    return estimate - Z_95 * se, estimate + Z_95 * se, p


def longitudinal_row(
    frame: pd.DataFrame, min_patients: int, random_slope: bool, min_slope_patients: int = MIN_SLOPE_PATIENTS
) -> dict:
    """One row's statistics (LONGITUDINAL_COLUMNS from n_patients to random_slope_note, and note)."""
    starts = patient_starts(frame["patient"].to_numpy())
    row = {
        "n_patients": len(starts),
        "n_scans": len(frame),
        **dict.fromkeys(ESTIMATE_COLUMNS, np.nan),
        "random_slope": False,
        "random_slope_note": "",
        "note": "",
    }
    if len(starts) < min_patients:
        return {**row, "note": TOO_FEW_PATIENTS}
    X, names = design(frame)
    if len(frame) <= X.shape[1] + 1:  # no residual degrees of freedom left
        return {**row, "note": TOO_FEW_PATIENTS}
    y, time = frame["y"].to_numpy(dtype=float), frame["time"].to_numpy(dtype=float)
    if np.ptp(y) == 0 or np.ptp(time) == 0 or not full_rank(X):
        return {**row, "note": CONSTANT}
    try_slope = random_slope and slope_identifiable(frame, min_slope_patients)
    fit, used_slope, why = fit_mixed_model(X, y, time, starts, try_slope)
    if not random_slope:
        why = SLOPE_OFF
    elif not try_slope:
        why = FEW_SLOPE_PATIENTS
    if not fit.converged:
        return {**row, "random_slope_note": why, "note": NOT_CONVERGED}
    within, between = fit.beta[1], fit.beta[2]
    contrast = np.zeros(len(names))
    contrast[[1, 2]] = 1, -1
    return {
        **row,
        "slope_within_per_year": within,
        **dict(zip(("ci_low", "ci_high", "p"), wald(within, fit.cov[1, 1], len(starts)))),
        "slope_between_per_year": between,
        **dict(zip(("between_ci_low", "between_ci_high"), wald(between, fit.cov[2, 2], len(starts))[:2])),
        "p_difference": wald(within - between, float(contrast @ fit.cov @ contrast), len(starts))[2],
        "random_slope": used_slope,
        "random_slope_note": why,
    }


def longitudinal_table(
    measurements: pd.DataFrame,
    measures: list[str],
    covariates: list[str],
    min_patients: int = MIN_PATIENTS,
    correction: str = "bonferroni",
    alpha: float = 1e-4,
    random_slope: bool = True,
) -> pd.DataFrame:
    """results/stats/longitudinal.tsv: one row per structure x group x measure (LONGITUDINAL_COLUMNS; module
    docstring). ``measurements``: the cohort's long table (one row per scan x structure) with subject, age,
    structure, the measures, the covariates and ``patient`` (without it every scan is its own patient and
    every row too_few_patients); optionally ``years``. ``random_slope`` False fits random intercepts only."""
    if correction not in CORRECTIONS:
        raise ValueError(f"unknown correction {correction!r}; choose one of {', '.join(CORRECTIONS)}")
    if isinstance(min_patients, bool) or not isinstance(min_patients, (int, np.integer)) or min_patients < 3:
        raise ValueError(f"min_patients must be an integer >= 3, got {min_patients!r}")
    if "patient" not in measurements.columns:
        log.warning("no patient column: every scan is its own patient, and nothing can be tested")
    present = [c for c in present_columns(measurements, covariates) if c not in ("age", "years", "patient")]
    families = structure_families(measurements)
    rows = []
    for structure, group, block in structure_blocks(measurements):
        scans = structure_scans(block, present)
        for measure in measures:
            frame = repeated_scans(block, measure, present, scans)
            rows.append(
                {
                    "structure": structure,
                    "group": group,
                    "family": families[structure],
                    "measure": measure,
                    **longitudinal_row(frame, min_patients, random_slope),
                }
            )
    table = pd.DataFrame(
        rows, columns=[c for c in LONGITUDINAL_COLUMNS if c not in ("p_bonferroni", "q_fdr", "significant")]
    )
    tested = table["note"] == ""
    correct_p_values(table, "p", "p_bonferroni", "q_fdr", tested)
    adjusted = table["p_bonferroni"] if correction == "bonferroni" else table["q_fdr"]
    table["significant"] = (adjusted < alpha).fillna(False).astype(bool)
    table["random_slope"] = table["random_slope"].astype(bool)
    untested = ", ".join(f"{count} {note}" for note, count in table.loc[~tested, "note"].value_counts().items())
    log.info(
        "longitudinal mixed models given %s: %d of %d rows tested (%d with a random slope); not tested: %s",
        present,
        tested.sum(),
        len(table),
        table["random_slope"].sum(),
        untested or "none",
    )
    return table[LONGITUDINAL_COLUMNS]
