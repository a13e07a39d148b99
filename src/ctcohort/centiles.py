"""Centile charts as distribution models of location, scale and shape in age (GAMLSS-type), calibrated on
held-out scans; a chart that cannot be trusted is refused with a note, never drawn.

model (``fit_model``)
    One chart is one structure x measure (per sex, or with sex as a numeric covariate) fitted on complete
    cases. The measure y follows a family whose parameters are linear predictors in age:

    ``normal``  y ~ N(mu, sigma): mu = eta_mu (identity), sigma = exp(eta_sigma).
    ``bccg``    Box-Cox Cole-Green, the LMS method (Cole & Green 1992, Stat Med 11:1305), for positive y only:
                z = ((y / mu)^nu - 1) / (nu sigma) (log(y / mu) / sigma at nu = 0) is standard normal;
                mu = exp(eta_mu) (the median), sigma = exp(eta_sigma) (about the coefficient of variation),
                nu = eta_nu (skewness: nu = 1 normal, nu = 0 log-normal). The density is that of the untruncated
                z (as VGAM's lms.bcn and the LMS literature), whose mass below y = 0 is negligible where charts
                are of use.
    ``shash``   sinh-arcsinh (Jones & Pewsey 2009, Biometrika 96:761), for any y (HU), in the parametrisation
                of R mgcv's ``shash``: z = sinh(delta asinh((y - mu) / (sigma delta)) - epsilon) is standard
                normal; mu = eta_mu, sigma = exp(eta_sigma), epsilon = eta_nu (skewness, 0 symmetric),
                delta = exp(eta_tau) (tail weight: < 1 heavier, > 1 lighter than normal tails). epsilon = 0
                and delta = 1 is the normal; every z and every centile is defined.
    ``bct``     Box-Cox t (Rigby & Stasinopoulos 2006, Stat Model 6:209), for positive y (volumes with
                outlying scans): the bccg's z above follows Student's t with tau = exp(eta_tau) degrees of
                freedom instead of the normal. As for bccg, the density is the untruncated one (gamlss.dist's
                BCTuntr; its BCT divides by F_t(1 / (sigma |nu|)), the mass inside y > 0); placing and centiles
                use F_t, z = Phi^-1(F_t(z_bc)). tau is capped at 10^6 (there the t is the normal to the
                likelihood's digits; gamlss switches to BCCG there too), which stops the fit's slow drift on
                data without heavy tails. An outer centile whose t quantile lies beyond the Box-Cox support has no
                value (as bccg's: such a chart is refused as undefined_centiles by normative).

    Each eta is an intercept plus an unpenalised natural cubic spline of age with ``df`` columns (df = 0: the
    parameter is constant in age; df = 1: linear; df >= 2: df - 1 interior knots at quantiles of age, the
    boundary knots at the youngest and oldest scan; the same space as R's ``splines::ns``), plus, for mu
    only, the numeric covariates (contrast 0/1, sex 0/1, a text column's dummies; a covariate constant over the
    chart is left out) and a random site intercept where asked (below). Fitted by maximum likelihood (scipy's
    L-BFGS-B with analytic gradients) on an orthonormalised design, starting from least squares (normal; shash
    with epsilon 0 and delta 1) or a log-normal fit (bccg; bct with 10 degrees of freedom, gamlss's start).

selection (``select_model``)
    Per family, forward stepwise over (df_mu, df_sigma[, df_nu[, df_tau]]) from (1, 1[, 0[, 0]]), mu and sigma
    linear in age (starting from constants, the search kept sigma constant often enough at 120 scans to miss
    the 5th centile by 0.35 SD where the SD grows with age): each step adds one df to the
    parameter whose addition lowers the criterion most, up to ``max_df`` for mu (and at most one df per
    ``scans_per_df`` scans: at 120 scans a 4-df mu, chosen now and then, missed by 1 SD at the ends of the
    ages) and that less 2 for sigma, until
    no addition lowers it; nu and tau stay constant in age (a nu that follows age, allowed in trials, put
    healthy scans of 120-scan charts at |z| 8 at the ends of the age range). The criterion is the generalised AIC,
    GAIC(k) = -2 log-likelihood + k * parameters, k = ``gaic_penalty`` (default 3; None: log(n), the BIC).
    Measured at 120 scans (benchmarks/centile_calibration.py), the BIC left out curvature of mu and the age
    trend of sigma often enough to bias the outer centiles by 0.2 SD; k = 2 (AIC) and k = 3 placed new scans
    alike, k = 3 had the smaller errors of the centiles. The family with the lowest criterion over
    ``families`` is the chart's (bccg and bct only where every value is positive). All densities are of y
    itself, so their criteria compare.
    ``families`` defaults to all four: normal and bccg for the common shapes, shash for skewed or heavy-tailed
    measures that may be negative (HU), bct for heavy-tailed positive ones; the GAIC pays k per shape parameter,
    so a normal truth keeps the normal (seeded tests), and the held-out placement did not get worse
    (docs/benchmarks.md). The price is time: per chart (selection, 5-fold calibration, 100 bootstrap
    resamples; benchmarks/centile_calibration.py --timing, one thread, measured side by side) the four families
    took 1.9-2.3 s against 0.5 s for normal and bccg alone at 200 scans, 5-8 s against 1.8-2.0 s at 2,000
    (each fold selects among four families; the 4-parameter fits need 2-3 times the iterations, bct's tau
    drifting up on data without heavy tails). ``families: [normal, bccg]`` in config gives the old speed.
    shash and bct are candidates only for charts of at least ``tail_min_scans`` scans (500, about 25 beyond each
    outer centile): a tail parameter rests on the few scans in the tails, and at 120 scans of a gamma truth
    (real-CT copies, tests/test_charts_on_real_ct.py) the selection chose a shash with tails lighter than the
    normal's (delta 3.2; its held-out calibration passed), which put a healthy new scan at z 7.5 (true z 3.1)
    and 7.8% of them beyond 1.96; with the threshold the same chart is a bccg.

small-sample correction (``CentileModel.z_scale``)
    Maximum likelihood fits the scale too narrow for a new scan (sigma's estimate is biased low and the
    curves' own error adds to a new scan's deviation), which puts more new healthy scans beyond |z| 1.96 than
    nominal the fewer scans a chart has. As a prediction interval of a linear model widens the residual SD
    by sqrt(n / (n - p_mu)) * sqrt(1 + p_mu / n), every z is divided by (and every centile's normal score
    multiplied by) sqrt((n + p_mu) / (n - p)), p_mu mu's coefficients and p all coefficients: 1.03 at 120 scans
    with 5 coefficients; measured, it takes the share beyond 1.96 at 120 scans from 6.4% to 5.7% (normal
    truth). The likelihood, the criteria and the comparison with R are of the uncorrected fit.

site (``fit_model(..., sites=)``)
    A random intercept on mu's linear predictor for a grouping column (site, scanner): mu's eta gains b_site,
    b ~ N(0, tau^2) (on mu itself for normal, on log mu for bccg: each family's own mu link). For a given tau
    the penalised likelihood, log-likelihood - sum b^2 / (2 tau^2), is maximised by the same optimiser and the
    same generic objective as any fit (the penalty touches only the site coefficients, so every family has it).
    tau maximises the Laplace approximation of the restricted likelihood, every coefficient integrated out
    (fixed ones under a flat prior): -penalised nll - 0.5 log det(H + P) + log det(P)^(1/2), H the Hessian of
    the nll (central differences of the analytic gradient), P the penalty; a bounded search over log tau
    from the start's sigma e^-7 to e^1. That is mgcv's "REML" for its extended families (gaulss): on the same
    splines the fits agree to 0.1% in tau (tests/test_centiles_r.py). GAIC counts the site effects by their
    effective degrees of freedom, the trace of (H + P)^-1 H over the site block (0 at tau = 0, the number of
    sites as tau grows), and uses the likelihood without the penalty. A scan of a site of the chart is placed
    with its site's predicted effect (BLUP); a scan of a new site on the population curve (site effect 0),
    noted ``site_new``, its z widened by the site variance: sigma_total = sqrt(sigma^2 + tau^2 (1 + 1 / sites))
    (the 1 / sites: the population intercept's own error from few sites; with 8 sites and tau = sigma, 4.4%
    of new sites' scans beyond |z| 1.96 against 16% unwidened). Exact for normal; for bccg the same widening
    of sigma, exact at nu = 0 (log y normal) and near it otherwise; other families place no new site's scan.
    The charts are the population's curves; the bootstrap keeps tau at the chart's.

placing a scan (``CentileModel.z``)
    z = Phi^-1(F(y | age, covariates)) / z_scale: (y - mu) / sigma, or the Box-Cox or sinh-arcsinh z above.
    z is clipped to +-``z_limit`` (the tails of the model mean nothing beyond; noted ``z_clipped``); a
    non-positive value on a bccg or bct chart has z = -z_limit (``below_support``). An age outside the fitted
    range gets no z (``age_outside_chart``): the charts never extrapolate in age.

calibration (``calibrate``)
    k-fold (seeded) out-of-fold z of every scan of the chart: family and df are chosen again inside every
    training fold, so the calibration measures the whole procedure (the knots of a fold's splines are at the
    quantiles of its own ages, and a held-out scan outside the fold's ages is placed by the spline's linear
    continuation: only here, never on a chart). With a site effect the folds are still of scans, so a held-out
    scan's site is nearly always in its training fold: the calibration measures placement on the reference's
    own sites (their BLUPs), not the widened z of a new site (tests/test_centiles.py checks that). Reported: mean and
    SD of z, the share of scans beyond
    |z| 1.96, below each lower and above each upper centile. The chart fails (``calibration_failed``) where
    the count beyond |z| 1.96 lies outside the two-sided ``calibration_level`` binomial interval around 5%,
    the SD of z outside the chi-square interval sqrt(chi2(n) / n), or the mean outside +-z / sqrt(n), each at
    ``calibration_level``.

refusal (``fit_centile_chart``)
    A chart is refused, with a note and no curves, where it has fewer than ``min_scans`` scans
    (``too_few_scans``; MIN_SCANS = 70 from benchmarks/centile_calibration.py, 20 charts per n, 2,000 new
    healthy scans each: the share beyond |z| 1.96 stayed within 3.8-7.1% from 15 to 500 scans, but up to 50
    scans of the skewed truth some healthy scans reached the clip at |z| 8, the Box-Cox shape barely
    determined; from 70 scans the largest |z| was 6.6), a constant age or measure (``constant``), no fit that
    converged (``not_converged``) or failed calibration (``calibration_failed``).

uncertainty (``bootstrap_centiles``)
    Seeded nonparametric bootstrap: scans resampled with replacement (with a site effect, sites: ``resample``;
    10 sites of 40 scans, tau 1: the population median's 95% band covered the truth in 90% of 60 cohorts,
    against 23% when scans were resampled within the sites), the chosen family, df and knots refitted
    (the selection is not repeated, so the bands leave out the uncertainty of the choice) from the chart's
    coefficients, percentile intervals of each centile curve on the chart's age grid.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import pandas as pd
from scipy import optimize, special, stats

NORMAL = "normal"
BCCG = "bccg"
SHASH = "shash"
BCT = "bct"
# gamlss's names: nu the skewness, tau the tails (SHASH's epsilon and log delta, BCT's degrees of freedom)
FAMILY_PARAMETERS = {
    NORMAL: ("mu", "sigma"),
    BCCG: ("mu", "sigma", "nu"),
    SHASH: ("mu", "sigma", "nu", "tau"),
    BCT: ("mu", "sigma", "nu", "tau"),
}
# from the held-out calibration measured with benchmarks/centile_calibration.py (see the module docstring)
MIN_SCANS = 70
Z_LIMIT = 8.0
TOO_FEW_SCANS = "too_few_scans"
CONSTANT = "constant"
NOT_CONVERGED = "not_converged"
CALIBRATION_FAILED = "calibration_failed"
AGE_OUTSIDE_CHART = "age_outside_chart"
COVARIATE_MISSING = "covariate_missing"
Z_CLIPPED = "z_clipped"
BELOW_SUPPORT = "below_support"
NO_VALUE = "no_value"
SITE_NEW = "site_new"  # a scan from a site (scanner) the chart's reference has not: placed on the population curve
# families whose z for a new site widens sigma by the site SD (module docstring, site); others place no such scan
_SITE_WIDENED = (NORMAL, BCCG)
_LOG_2PI_HALF = 0.5 * math.log(2 * math.pi)


@dataclass(frozen=True)
class CentileSettings:
    """How centile charts are fitted, checked and drawn; the field defaults are the only defaults."""

    families: tuple[str, ...] = (NORMAL, BCCG, SHASH, BCT)
    tail_min_scans: int = 500  # fewest scans of a chart for the families with a tail parameter (shash, bct)
    max_df: int = 4  # most spline df of mu; sigma's at most max_df - 2, nu constant (module docstring)
    scans_per_df: int = 40  # and at most n // scans_per_df df for mu (at least 1)
    gaic_penalty: float | None = 3.0  # k of GAIC(k); None: log(n), the BIC
    percentiles: tuple[float, ...] = (5, 25, 50, 75, 95)
    age_step: float = 1.0
    min_scans: int = MIN_SCANS
    folds: int = 5
    calibration_level: float = 0.99
    bootstrap_resamples: int = 100
    bootstrap_level: float = 0.95
    seed: int = 18
    z_limit: float = Z_LIMIT

    def __post_init__(self):
        unknown = [f for f in self.families if f not in FAMILY_PARAMETERS]
        if unknown or not self.families:
            raise ValueError(f"families {list(self.families)}: choose from {', '.join(FAMILY_PARAMETERS)}")
        if self.max_df < 1 or self.folds < 2 or self.min_scans < 5 or self.bootstrap_resamples < 0:
            raise ValueError("centiles: max_df >= 1, folds >= 2, min_scans >= 5, bootstrap_resamples >= 0")
        if not all(0 < p < 100 for p in self.percentiles) or not 0 < self.z_limit:
            raise ValueError("centiles: percentiles in (0, 100) and a positive z_limit")

    @classmethod
    def from_config(cls, normative: Mapping) -> CentileSettings:
        """From config's ``normative`` block: its keys named like the fields (others are not this module's)."""
        names = cls.__dataclass_fields__
        values = {key: value for key, value in dict(normative).items() if key in names}
        for key in ("families", "percentiles"):
            if key in values:
                values[key] = tuple(values[key])
        return cls(**values)

    def max_dfs(self, family: str, n: int | None = None) -> tuple[int, ...]:
        """Most df of each of the family's parameters for n scans (None: many): the scale follows age more
        simply than mu, the shape not at all."""
        mu = self.max_df if n is None else max(min(self.max_df, n // self.scans_per_df), 1)
        return (mu, max(mu - 2, 0), *[0] * (len(FAMILY_PARAMETERS[family]) - 2))


DEFAULTS = CentileSettings()


# ---------------------------------------------------------------------------------------------------------
# Age basis and design
# ---------------------------------------------------------------------------------------------------------


def natural_spline(x: np.ndarray, knots: np.ndarray) -> np.ndarray:
    """Natural cubic spline basis without the constant (len(knots) - 1 columns; knots sorted, the first and
    last the boundary knots): x and the truncated-power columns of Hastie, Tibshirani & Friedman, Elements of
    Statistical Learning, eq. 5.4-5.5, on x scaled to the boundary range (for conditioning)."""
    lo, hi = knots[0], knots[-1]
    u = (np.asarray(x, float) - lo) / (hi - lo)
    k = (knots - lo) / (hi - lo)

    def cube(t):  # t * t * t: numpy's power ** 3 took 50x as long
        return t * t * t

    def d(j):
        return (cube(np.maximum(u - k[j], 0)) - cube(np.maximum(u - k[-1], 0))) / (k[-1] - k[j])

    last = d(len(k) - 2)
    return np.column_stack([u, *(d(j) - last for j in range(len(k) - 2))])


def age_knots(age: np.ndarray, df: int) -> np.ndarray:
    """Boundary knots at the youngest and oldest age, df - 1 interior knots at quantiles (as R's ns(df=))."""
    inner = np.quantile(age, np.arange(1, df) / df) if df > 1 else np.empty(0)
    return np.concatenate([[age.min()], inner, [age.max()]])


def _columns(age: np.ndarray, knots: np.ndarray | None, covariates: np.ndarray | None) -> np.ndarray:
    parts = [np.ones((len(age), 1))]
    if knots is not None:
        parts.append(natural_spline(age, knots))
    if covariates is not None and covariates.shape[1]:
        parts.append(covariates)
    return np.hstack(parts)


@dataclass(frozen=True)
class Design:
    """The columns of each parameter's linear predictor: spline knots (None: constant in age), whether the
    covariates enter, and the transform that orthonormalises the fitted data's columns."""

    knots: tuple[np.ndarray | None, ...]
    with_covariates: tuple[bool, ...]
    transforms: tuple[np.ndarray, ...]

    @classmethod
    def for_data(cls, age: np.ndarray, covariates: np.ndarray, dfs: Sequence[int]) -> Design:
        knots = tuple(age_knots(age, df) if df else None for df in dfs)
        with_covariates = tuple(i == 0 for i in range(len(dfs)))  # covariates shift mu only
        transforms = []
        for k, w in zip(knots, with_covariates):
            raw = _columns(age, k, covariates if w else None)
            r = np.linalg.qr(raw / math.sqrt(len(age)), mode="r")
            if np.abs(np.diag(r)).min() < 1e-9 * np.abs(np.diag(r)).max():
                raise np.linalg.LinAlgError("collinear columns")
            transforms.append(np.linalg.inv(r))
        return cls(knots, with_covariates, tuple(transforms))

    site_levels: tuple[str, ...] = ()  # the sites of the random intercept on mu (none: no random effect)

    def matrices(self, age: np.ndarray, covariates: np.ndarray, sites=None) -> list[np.ndarray]:
        """Each parameter's columns; with a random intercept, mu's end in one indicator column per site (not
        orthonormalised: the penalty is on the site effects themselves). ``sites`` None: every site effect 0."""
        matrices = [
            _columns(age, k, covariates if w else None) @ t
            for k, w, t in zip(self.knots, self.with_covariates, self.transforms)
        ]
        if self.site_levels:
            matrices[0] = np.hstack([matrices[0], site_indicators(sites, self.site_levels, len(age))])
        return matrices

    def site_block(self) -> slice:
        """Where the site effects lie among the coefficients (right after mu's fixed ones)."""
        return slice(self.sizes[0], self.sizes[0] + len(self.site_levels))

    @property
    def sizes(self) -> list[int]:
        """The fixed coefficients of each parameter."""
        return [t.shape[1] for t in self.transforms]


def site_indicators(sites, levels: Sequence[str], n: int) -> np.ndarray:
    """n x len(levels) 0/1 columns of each scan's site; a site not among ``levels`` (or None) has none."""
    if sites is None:
        return np.zeros((n, len(levels)))
    sites = np.broadcast_to(np.asarray(sites, dtype=object).astype(str), (n,))
    return (sites[:, None] == np.asarray(levels, dtype=object)[None, :]).astype(float)


# ---------------------------------------------------------------------------------------------------------
# Families: negative log-likelihood per scan and its gradient by linear predictor, z, quantiles
# ---------------------------------------------------------------------------------------------------------


def _normal_nll(y, eta):
    mu, log_sigma = eta
    r = (y - mu) * np.exp(-log_sigma)
    nll = log_sigma + 0.5 * r**2 + _LOG_2PI_HALF
    return nll, [-r * np.exp(-log_sigma), 1 - r**2]


def _normal_z(y, eta):
    return (y - eta[0]) * np.exp(-eta[1])


def _normal_quantile(z, eta):
    return eta[0] + np.exp(eta[1]) * z


def _exprel_slope(x):
    """d/dx of (e^x - 1) / x, by its series near 0."""
    small = np.abs(x) < 1e-2
    xs = np.where(small, 1.0, x)
    exact = (xs * np.exp(xs) - np.expm1(xs)) / xs**2
    series = 0.5 + x * (1 / 3 + x * (1 / 8 + x / 30))  # Horner: numpy's x ** 3 made this the fit's slowest line
    return np.where(small, series, exact)


def _bccg_parts(y, eta):
    log_mu, log_sigma, nu = eta
    distance = np.log(y) - log_mu
    x = np.clip(nu * distance, -700, 700)
    z = distance * special.exprel(x) * np.exp(-log_sigma)
    return distance, x, z


def _box_cox_grads(distance, x, z, score, eta):
    """The gradient of a Box-Cox family's nll by (log mu, log sigma, nu), given the score -d log f(z) / dz of
    its standardised z (z itself for the normal)."""
    inv_sigma = np.exp(-eta[1])
    return [
        eta[2] - score * np.exp(x) * inv_sigma,
        1 - score * z,
        -distance + score * distance**2 * _exprel_slope(x) * inv_sigma,
    ]


def _bccg_nll(y, eta):
    log_mu, log_sigma, nu = eta
    distance, x, z = _bccg_parts(y, eta)
    nll = -nu * distance + np.log(y) + log_sigma + 0.5 * z**2 + _LOG_2PI_HALF
    return nll, _box_cox_grads(distance, x, z, z, eta)


def _bccg_z(y, eta):
    with np.errstate(divide="ignore", invalid="ignore"):
        return _bccg_parts(np.where(y > 0, y, np.nan), eta)[2]


def _bccg_quantile(z, eta):
    log_mu, log_sigma, nu = eta
    t = nu * np.exp(log_sigma) * z
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(np.abs(t) < 1e-10, 1.0, np.log1p(t) / t)  # log1p(t) / t, 1 at t = 0
    return np.where(t > -1, np.exp(log_mu + np.exp(log_sigma) * z * ratio), np.nan)


def _normal_start(y, matrices):
    x_mu, x_sigma = matrices
    mu = x_mu @ np.linalg.lstsq(x_mu, y, rcond=None)[0]
    return [mu, np.full(len(y), math.log(max(np.std(y - mu), 1e-12 * max(np.abs(y).max(), 1.0))))]


def _bccg_start(y, matrices):
    log_mu, log_sigma = _normal_start(np.log(y), matrices[:2])
    return [log_mu, log_sigma, np.zeros(len(y))]


def _shash_parts(y, eta):
    mu, log_sigma, epsilon, log_delta = eta
    delta = np.exp(log_delta)
    u = (y - mu) * np.exp(-log_sigma - log_delta)
    return u, delta, delta * np.arcsinh(u) - epsilon


def _log_cosh(s):
    s = np.abs(s)
    return s + np.log1p(np.exp(-2 * s)) - math.log(2)


def _shash_nll(y, eta):
    u, delta, s = _shash_parts(y, eta)
    root = np.hypot(1, u)  # sqrt(1 + u^2) without overflow
    sinh_s = np.sinh(s)
    nll = eta[1] + _LOG_2PI_HALF - _log_cosh(s) + np.log(root) + 0.5 * sinh_s**2
    score_s = sinh_s * np.cosh(s) - np.tanh(s)  # d nll / d s
    score_u = score_s * delta / root + u / root**2  # d nll / d u
    grads = [
        -score_u * np.exp(-eta[1] - eta[3]),
        1 - score_u * u,
        -score_s,
        -score_u * u + score_s * delta * np.arcsinh(u),
    ]
    return nll, grads


def _shash_z(y, eta):
    return np.sinh(_shash_parts(y, eta)[2])


def _shash_quantile(z, eta):
    mu, log_sigma, epsilon, log_delta = eta
    delta = np.exp(log_delta)
    return mu + np.exp(log_sigma) * delta * np.sinh((np.arcsinh(z) + epsilon) / delta)


def _shash_start(y, matrices):
    return [*_normal_start(y, matrices[:2]), np.zeros(len(y)), np.zeros(len(y))]


# beyond this half of the t's degrees of freedom, log Gamma(x + 1/2) - log Gamma(x) - log(x) / 2 by its
# asymptotic series (the difference of the log gammas loses the digits that the likelihood in tau needs)
_T_SERIES_FROM = 100.0


def _t_log_gamma_ratio(x):
    """log Gamma(x + 1/2) - log Gamma(x) - log(x) / 2 and its derivative in x (both -> 0 as x -> inf)."""
    x, scans = np.unique(x, return_inverse=True)  # tau is constant in age: one value, not one per scan
    large = x > _T_SERIES_FROM
    xs = np.where(large, _T_SERIES_FROM, x)  # the exact branch only where it is accurate
    exact = special.gammaln(xs + 0.5) - special.gammaln(xs) - 0.5 * np.log(xs)
    exact_slope = special.digamma(xs + 0.5) - special.digamma(xs) - 0.5 / xs
    xl = np.where(large, x, _T_SERIES_FROM)
    series = -1 / (8 * xl) + 1 / (192 * xl**3)
    series_slope = 1 / (8 * xl**2) - 1 / (64 * xl**4)
    return np.where(large, series, exact)[scans], np.where(large, series_slope, exact_slope)[scans]


# tau beyond this is the BCCG's normal to the likelihood's digits (gamlss's dBCT switches to BCCG there too); the
# cap stops the fit's slow drift towards infinite tau on data without heavy tails
_BCT_LOG_MAX_DF = math.log(1e6)


def _bct_df(log_tau):
    return np.exp(np.minimum(log_tau, _BCT_LOG_MAX_DF))


def _bct_nll(y, eta):
    log_mu, log_sigma, nu, log_tau = eta
    distance, x, z = _bccg_parts(y, eta[:3])
    tau = _bct_df(log_tau)
    w = z**2 / tau
    ratio, ratio_slope = _t_log_gamma_ratio(tau / 2)
    log_t = ratio - _LOG_2PI_HALF - 0.5 * (tau + 1) * np.log1p(w)  # log density of Student's t at z
    nll = -nu * distance + np.log(y) + log_sigma - log_t
    score = (tau + 1) * z / (tau + z**2)
    by_log_tau = -0.5 * (tau * ratio_slope - tau * np.log1p(w) + (tau + 1) * w / (1 + w)) * (log_tau < _BCT_LOG_MAX_DF)
    return nll, [*_box_cox_grads(distance, x, z, score, eta), by_log_tau]


def _t_normal_score(t, df):
    """Phi^-1(F_t(t; df)), from the log of the nearer tail so that both tails keep their digits."""
    near = special.ndtri_exp(stats.t.logcdf(-np.abs(t), df))
    return np.where(t < 0, near, -near)


def _bct_z(y, eta):
    return _t_normal_score(_bccg_z(y, eta[:3]), _bct_df(eta[3]))


def _bct_quantile(z, eta):
    near = special.stdtrit(_bct_df(eta[3]), special.ndtr(-np.abs(z)))  # the t quantile of Phi(z)
    return _bccg_quantile(np.where(z < 0, near, -near), eta[:3])


def _bct_start(y, matrices):
    return [*_bccg_start(y, matrices[:3]), np.full(len(y), math.log(10.0))]  # gamlss's start, 10 df


@dataclass(frozen=True)
class Family:
    name: str
    nll: object
    z: object
    quantile: object
    start: object
    positive: bool


FAMILIES = {
    NORMAL: Family(NORMAL, _normal_nll, _normal_z, _normal_quantile, _normal_start, positive=False),
    BCCG: Family(BCCG, _bccg_nll, _bccg_z, _bccg_quantile, _bccg_start, positive=True),
    SHASH: Family(SHASH, _shash_nll, _shash_z, _shash_quantile, _shash_start, positive=False),
    BCT: Family(BCT, _bct_nll, _bct_z, _bct_quantile, _bct_start, positive=True),
}


# ---------------------------------------------------------------------------------------------------------
# One model
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CentileModel:
    """A fitted family with its design: centiles and z at any age inside the fitted range."""

    family: str
    dfs: tuple[int, ...]
    covariates: tuple[str, ...]
    design: Design
    coefficients: np.ndarray
    age_range: tuple[float, float]
    n: int
    log_likelihood: float
    converged: bool
    small_sample_correction: bool = True
    site_sd: float = 0.0  # tau, the SD of the random site intercept on mu's linear predictor
    site_edf: float = 0.0  # the site effects' effective degrees of freedom (module docstring, site)

    @property
    def n_parameters(self) -> float:
        """The fixed coefficients plus the site effects' effective degrees of freedom."""
        return len(self.coefficients) - len(self.design.site_levels) + self.site_edf

    @property
    def site_effects(self) -> dict[str, float]:
        """Each site's predicted intercept on mu's linear predictor (BLUP)."""
        return dict(zip(self.design.site_levels, self.coefficients[self.design.site_block()].tolist()))

    @property
    def z_scale(self) -> float:
        """The small-sample widening of z's scale (module docstring); 1 without the correction."""
        if not self.small_sample_correction:
            return 1.0
        return math.sqrt((self.n + self.design.sizes[0]) / max(self.n - self.n_parameters, 1.0))

    def criterion(self, penalty: float | None = None) -> float:
        """GAIC(penalty); None: the BIC."""
        k = math.log(self.n) if penalty is None else penalty
        return -2 * self.log_likelihood + k * self.n_parameters

    def predictors(self, age, covariates=None, sites=None) -> list[np.ndarray]:
        """The linear predictors; ``sites`` None (or a site not in the chart): the population's (site effect 0)."""
        age = np.atleast_1d(np.asarray(age, float))
        values = _covariate_matrix(covariates, self.covariates, len(age))
        return _split_predictors(self.design.matrices(age, values, sites), self.coefficients)

    @property
    def new_site_sd(self) -> float:
        return new_site_sd(self.site_sd, len(self.design.site_levels))

    def new_site(self, sites, n: int) -> np.ndarray:
        """Whether each scan comes from a site the chart's scans do not have (False without a site effect)."""
        if not self.design.site_levels or sites is None:
            return np.zeros(n, bool)
        return ~site_indicators(sites, self.design.site_levels, n).any(axis=1)

    def inside(self, age) -> np.ndarray:
        age = np.atleast_1d(np.asarray(age, float))
        return (age >= self.age_range[0]) & (age <= self.age_range[1])

    def centile(self, p: float, age, covariates=None) -> np.ndarray:
        """The p-th centile (0 < p < 100) at each age (NaN outside the fitted ages); covariates at 0 unless given."""
        eta = self.predictors(age, covariates)
        values = FAMILIES[self.family].quantile(stats.norm.ppf(p / 100) * self.z_scale, eta)
        return np.where(self.inside(age), values, np.nan)

    def z(self, value, age, covariates=None, z_limit: float = Z_LIMIT, sites=None) -> tuple[np.ndarray, np.ndarray]:
        """(z, note) of each value; see the module docstring (a scan of a new site: ``site_new``)."""
        value = np.atleast_1d(np.asarray(value, float))
        age = np.broadcast_to(np.asarray(age, float), value.shape)
        eta, new = self.predictors(age, covariates, sites), self.new_site(sites, len(value))
        z, note = z_by_site(self.family, value, eta, new, self.new_site_sd, self.z_scale, z_limit)
        outside = ~self.inside(age)
        z[outside | ~np.isfinite(value)] = np.nan
        note[outside] = AGE_OUTSIDE_CHART
        note[~np.isfinite(value)] = NO_VALUE
        return z, note


def z_from_predictors(
    family: str, value: np.ndarray, eta: Sequence[np.ndarray], z_scale: float = 1.0, z_limit: float = Z_LIMIT
) -> tuple[np.ndarray, np.ndarray]:
    """(z, note) of values under the family's linear predictors (one array per parameter), widened by z_scale
    and clipped to +-z_limit (noted ``z_clipped``); a non-positive value of a positive family: -z_limit,
    ``below_support``. Also what a chart stored as a table places with (normative.place_values)."""
    value = np.asarray(value, float)
    raw = FAMILIES[family].z(value, eta) / z_scale
    note = np.full(value.shape, "", dtype=object)
    if FAMILIES[family].positive:
        below = np.isfinite(value) & (value <= 0)
        raw = np.where(below, -np.inf, raw)
        note[below] = BELOW_SUPPORT
    clipped = np.isfinite(value) & (np.abs(raw) > z_limit)
    note[clipped & (note == "")] = Z_CLIPPED
    return np.clip(raw, -z_limit, z_limit), note


def new_site_sd(site_sd: float, sites: int) -> float:
    """The SD a new site's intercept adds: tau sqrt(1 + 1 / sites), the population intercept's own error
    from few sites included (as a new group's in a one-way random-effects model)."""
    return site_sd * math.sqrt(1 + 1 / max(sites, 1))


def z_by_site(
    family: str,
    value: np.ndarray,
    eta: Sequence[np.ndarray],
    new: np.ndarray,
    new_site_sd: float,
    z_scale: float = 1.0,
    z_limit: float = Z_LIMIT,
) -> tuple[np.ndarray, np.ndarray]:
    """``z_from_predictors``, where the scans ``new`` (of a site the chart has not) are widened by the new site's
    SD and noted ``site_new`` (module docstring, site)."""
    if new.any():
        eta = [np.where(new, w, e) for w, e in zip(widened_for_new_site(family, eta, new_site_sd), eta)]
    z, note = z_from_predictors(family, value, eta, z_scale, z_limit)
    note[new & (note == "")] = SITE_NEW
    return z, note


def widened_for_new_site(family: str, eta: Sequence[np.ndarray], site_sd: float) -> list[np.ndarray]:
    """The linear predictors of a scan of an unseen site: sigma widened to sqrt(sigma^2 + tau^2) (module
    docstring, site); NaN for a family without that rule."""
    if family not in _SITE_WIDENED:
        return [np.full_like(np.asarray(e, float), np.nan) for e in eta]
    widened = 0.5 * np.logaddexp(2 * np.asarray(eta[1], float), 2 * math.log(site_sd)) if site_sd > 0 else eta[1]
    return [eta[0], widened, *eta[2:]]


def _covariate_matrix(covariates, names: Sequence[str], n: int) -> np.ndarray:
    """n x len(names) covariate values: a mapping or data frame by name; None: all 0 (the chart's reference)."""
    if covariates is None:
        return np.zeros((n, len(names)))
    if isinstance(covariates, np.ndarray):
        return np.asarray(covariates, float).reshape(n, len(names))
    columns = [np.broadcast_to(np.asarray(covariates[name], float), (n,)) for name in names]
    return np.column_stack(columns) if columns else np.zeros((n, 0))


def _split_predictors(matrices, coefficients):
    bounds = np.cumsum([0, *(m.shape[1] for m in matrices)])
    return [m @ coefficients[a:b] for m, a, b in zip(matrices, bounds[:-1], bounds[1:])]


def _objective(theta, y, matrices, family, precision=None):
    """Mean negative log-likelihood and its gradient; ``precision`` (one per coefficient, 1 / tau^2 on the site
    effects, 0 elsewhere) adds the random effects' ridge penalty sum b^2 / (2 tau^2)."""
    eta = _split_predictors(matrices, theta)
    with np.errstate(all="ignore"):  # the line search tries wild steps; those come back infinite
        nll, grads = family.nll(y, eta)
    total = nll.sum()
    if not np.isfinite(total):
        return np.inf, np.zeros_like(theta)
    n = len(y)
    gradient = np.concatenate([m.T @ g for m, g in zip(matrices, grads)])
    if precision is not None:
        total, gradient = total + 0.5 * precision @ theta**2, gradient + precision * theta
    return total / n, gradient / n


def _hessian(theta, y, matrices, family) -> np.ndarray:
    """The negative log-likelihood's Hessian by central differences of its analytic gradient (any family)."""
    n, steps = len(y), 1e-5 * np.maximum(np.abs(theta), 1.0)
    columns = []
    for j, h in enumerate(steps):
        up, down = theta.copy(), theta.copy()
        up[j] += h
        down[j] -= h
        difference = _objective(up, y, matrices, family)[1] - _objective(down, y, matrices, family)[1]
        columns.append(n * difference / (2 * h))
    hessian = np.column_stack(columns)
    return (hessian + hessian.T) / 2


def _penalised_fit(start, y, matrices, family, precision):
    return optimize.minimize(
        _objective,
        start,
        args=(y, matrices, family, precision),
        jac=True,
        method="L-BFGS-B",
        options={"maxiter": 2000, "ftol": 1e-12, "gtol": 1e-8},
    )


def _site_precision(design: Design, size: int, site_sd: float) -> np.ndarray | None:
    """1 / tau^2 on the site effects' coefficients, 0 elsewhere (the random intercept's penalty); None without
    one."""
    if not design.site_levels:
        return None
    precision = np.zeros(size)
    precision[design.site_block()] = site_sd**-2.0
    return precision


def _site_fit(start, y, matrices, family, design: Design, site_sd: float | None):
    """(optimiser result, tau, the site effects' edf): at the given tau, or at the tau that maximises the
    Laplace-approximate restricted likelihood (module docstring, site)."""
    block = design.site_block()

    def precision_of(log_tau):
        return _site_precision(design, len(start), math.exp(log_tau))

    def fit(log_tau):
        result = _penalised_fit(state["theta"], y, matrices, family, precision_of(log_tau))
        if np.isfinite(result.fun):
            state["theta"] = result.x
        return result

    def negative_restricted(log_tau):
        result = fit(log_tau)
        precision = precision_of(log_tau)
        sign, log_det = np.linalg.slogdet(_hessian(result.x, y, matrices, family) + np.diag(precision))
        if not np.isfinite(result.fun) or sign <= 0:
            return np.inf
        return result.fun * len(y) + 0.5 * log_det - 0.5 * np.log(precision[block]).sum()

    state = {"theta": start}
    if site_sd is None:
        scale = math.exp(float(np.mean(_split_predictors(matrices, start)[1])))  # sigma of the start, on mu's scale
        bounds = (math.log(scale) - 7, math.log(scale) + 1)
        site_sd = math.exp(
            optimize.minimize_scalar(negative_restricted, bounds=bounds, method="bounded", options={"xatol": 1e-3}).x
        )
    result = fit(math.log(site_sd))
    precision = precision_of(math.log(site_sd))
    hessian = _hessian(result.x, y, matrices, family)
    covariance = np.linalg.pinv(hessian + np.diag(precision))
    edf = float(len(design.site_levels) - (np.diag(covariance)[block] * precision[block]).sum())
    return result, site_sd, edf


def fit_model(
    family: str,
    dfs: Sequence[int],
    age,
    y,
    covariates: np.ndarray | None = None,
    names: Sequence[str] = (),
    design: Design | None = None,
    start: np.ndarray | None = None,
    sites=None,
    site_sd: float | None = None,
) -> CentileModel:
    """The maximum-likelihood fit of ``family`` with spline df ``dfs`` per parameter; ``design``: reuse one
    (the bootstrap's refits keep the chart's knots), ``start``: coefficients to start from. ``sites``: each
    scan's site, for a random intercept on mu (module docstring, site), its SD ``site_sd`` (None: estimated)."""
    age, y = np.asarray(age, float), np.asarray(y, float)
    covariates = np.zeros((len(age), 0)) if covariates is None else np.asarray(covariates, float)
    chosen = FAMILIES[family]
    design = design or Design.for_data(age, covariates, dfs)
    if sites is not None and not design.site_levels:
        design = replace(design, site_levels=tuple(sorted(set(np.asarray(sites, dtype=object).astype(str)))))
    matrices = design.matrices(age, covariates, sites)
    if start is None:
        # orthonormal columns: least squares is X^T eta / n (the site effects start at 0: no site columns)
        fixed = design.matrices(age, covariates)
        start = np.concatenate([m.T @ e / len(y) for m, e in zip(fixed, chosen.start(y, fixed))])
    edf = 0.0
    if design.site_levels:
        result, site_sd, edf = _site_fit(start, y, matrices, chosen, design, site_sd)
    else:
        result, site_sd = _penalised_fit(start, y, matrices, chosen, None), 0.0
    # the likelihood of the fit itself, without the penalty (GAIC counts the site effects by their edf)
    log_likelihood = -_objective(result.x, y, matrices, chosen)[0] * len(y)
    converged = bool(np.isfinite(result.fun) and np.abs(result.jac).max() < 1e-4)
    return CentileModel(
        family,
        tuple(dfs),
        tuple(names),
        design,
        result.x,
        (float(age.min()), float(age.max())),
        len(y),
        float(log_likelihood),
        converged,
        site_sd=float(site_sd),
        site_edf=edf,
    )


# ---------------------------------------------------------------------------------------------------------
# Selection
# ---------------------------------------------------------------------------------------------------------


def _try_fit(family, dfs, age, y, covariates, names, sites=None):
    if any(df and np.unique(age).size < df + 2 for df in dfs):
        return None
    try:
        model = fit_model(family, dfs, age, y, covariates, names, sites=sites)
    except np.linalg.LinAlgError:
        return None
    return model if model.converged else None


def select_family_model(family: str, age, y, covariates, names, settings: CentileSettings = DEFAULTS, sites=None):
    """Forward stepwise in df (module docstring): (best model or None, the criteria of every model tried)."""
    limits = settings.max_dfs(family, len(y))
    dfs = tuple(min(limit, 1) for limit in limits)
    best = _try_fit(family, dfs, age, y, covariates, names, sites)
    tried = [(family, dfs, best)]
    while best is not None:
        candidates = []
        for i, limit in enumerate(limits):
            if dfs[i] < limit:
                bigger = tuple(d + (j == i) for j, d in enumerate(dfs))
                model = _try_fit(family, bigger, age, y, covariates, names, sites)
                tried.append((family, bigger, model))
                if model is not None:
                    candidates.append(model)
        improving = [
            m for m in candidates if m.criterion(settings.gaic_penalty) < best.criterion(settings.gaic_penalty)
        ]
        if not improving:
            break
        best = min(improving, key=lambda m: m.criterion(settings.gaic_penalty))
        dfs = best.dfs
    return best, tried


def select_model(age, y, covariates=None, names=(), settings: CentileSettings = DEFAULTS, sites=None):
    """(the chart's model or None, a table of every model tried: family, dfs, log_likelihood, parameters,
    criterion, chosen)."""
    age, y = np.asarray(age, float), np.asarray(y, float)
    covariates = np.zeros((len(age), 0)) if covariates is None else np.asarray(covariates, float)
    families = [
        f
        for f in settings.families
        if (not FAMILIES[f].positive or (y > 0).all())
        and (len(FAMILY_PARAMETERS[f]) < 4 or len(y) >= settings.tail_min_scans)
    ]
    best, rows = None, []
    for family in families:
        model, tried = select_family_model(family, age, y, covariates, names, settings, sites)
        rows += tried
        if model is not None and (
            best is None or model.criterion(settings.gaic_penalty) < best.criterion(settings.gaic_penalty)
        ):
            best = model
    table = pd.DataFrame(
        [
            {
                "family": f,
                "dfs": "/".join(map(str, d)),
                "log_likelihood": m.log_likelihood if m else np.nan,
                "parameters": m.n_parameters if m else np.nan,
                "criterion": m.criterion(settings.gaic_penalty) if m else np.nan,
                "chosen": m is best and m is not None,
            }
            for f, d, m in rows
        ]
    )
    return best, table


# ---------------------------------------------------------------------------------------------------------
# Calibration
# ---------------------------------------------------------------------------------------------------------


def out_of_fold_z(age, y, covariates=None, names=(), settings: CentileSettings = DEFAULTS, sites=None) -> np.ndarray:
    """The z of every scan from the model selected and fitted without its fold (NaN where no fit converged).
    The folds are of scans, not sites: a held-out scan's site is nearly always in its training fold, so with a
    site effect this measures placement on a known site (its BLUP), not the widened z of a new site."""
    age, y = np.asarray(age, float), np.asarray(y, float)
    covariates = np.zeros((len(age), 0)) if covariates is None else np.asarray(covariates, float)
    rng = np.random.default_rng(settings.seed)
    fold = rng.permutation(len(y)) % settings.folds
    z = np.full(len(y), np.nan)
    for k in range(settings.folds):
        held = fold == k
        model, _ = select_model(
            age[~held], y[~held], covariates[~held], names, settings, None if sites is None else sites[~held]
        )
        if model is None:
            continue
        # the held-out scans are placed even a little outside the fold's ages (spline continued linearly)
        model = replace(model, age_range=(-np.inf, np.inf))
        z[held] = model.z(
            y[held], age[held], covariates[held], settings.z_limit, None if sites is None else sites[held]
        )[0]
    return z


def calibration_summary(z, settings: CentileSettings = DEFAULTS) -> dict:
    """n, mean and SD of z, share beyond |z| 1.96, below each lower (above each upper) centile, and the
    verdict ``calibration_failed`` by the rule of the module docstring."""
    z = np.asarray(z, float)
    z = z[np.isfinite(z)]
    n = len(z)
    summary = {
        "calibration_n": n,
        "z_mean": float(z.mean()) if n else np.nan,
        "z_sd": float(z.std(ddof=1)) if n > 1 else np.nan,
        "beyond_1.96": float((np.abs(z) > 1.96).mean()) if n else np.nan,
    }
    for p in settings.percentiles:
        if p != 50:
            zp = stats.norm.ppf(p / 100)
            share = (z < zp).mean() if p < 50 else (z > zp).mean()
            summary[f"{'below' if p < 50 else 'above'}_p{p:g}"] = float(share) if n else np.nan
    summary[CALIBRATION_FAILED] = bool(n < 2 or calibration_fails(z, settings.calibration_level))
    return summary


def calibration_fails(z: np.ndarray, level: float) -> bool:
    n = len(z)
    tail = (1 - level) / 2
    beyond = int((np.abs(z) > 1.96).sum())
    low, high = stats.binom.ppf([tail, 1 - tail], n, 0.05)
    sd = z.std(ddof=1)
    sd_low, sd_high = np.sqrt(stats.chi2.ppf([tail, 1 - tail], n - 1) / (n - 1))
    mean_limit = stats.norm.ppf(1 - tail) / math.sqrt(n)
    return bool(not low <= beyond <= high or not sd_low <= sd <= sd_high or abs(z.mean()) > mean_limit)


def calibrate(
    age, y, covariates=None, names=(), settings: CentileSettings = DEFAULTS, sites=None
) -> tuple[dict, np.ndarray]:
    """(calibration_summary of the out-of-fold z, the z)."""
    z = out_of_fold_z(age, y, covariates, names, settings, sites)
    return calibration_summary(z, settings), z


def worm_table(z) -> pd.DataFrame:
    """Q-Q / worm plot data of z (van Buuren & Fredriks 2001, Stat Med 20:1259): each sorted z against its
    normal quantile at (i - 0.5) / n, the deviation, and the pointwise 95% band of the deviation under a
    standard normal z."""
    z = np.sort(np.asarray(z, float)[np.isfinite(z)])
    n = len(z)
    p = (np.arange(1, n + 1) - 0.5) / n
    expected = stats.norm.ppf(p)
    band = 1.96 * np.sqrt(p * (1 - p) / n) / stats.norm.pdf(expected)
    return pd.DataFrame({"expected": expected, "z": z, "deviation": z - expected, "band_low": -band, "band_high": band})


# ---------------------------------------------------------------------------------------------------------
# Bootstrap and the chart
# ---------------------------------------------------------------------------------------------------------


def age_grid(youngest: float, oldest: float, step: float) -> np.ndarray:
    """youngest to oldest in steps of step, both ends included (the last step may be shorter)."""
    ages = np.arange(youngest, oldest, step)
    return np.append(ages, oldest) if ages.size == 0 or ages[-1] < oldest else ages


def centile_curves(model: CentileModel, ages, percentiles) -> np.ndarray:
    """len(ages) x len(percentiles) centiles at the covariates' reference (0)."""
    return np.column_stack([model.centile(p, ages) for p in percentiles])


def _newton_refit(theta, y, matrices, family, hessian_inverse, precision=None, steps: int = 30):
    """Coefficients at the optimum of a resample, by Newton steps with the full data's Hessian of the
    (penalised) negative log-likelihood (a resample's differs from it by O(1/sqrt(n)), so each step shrinks the
    error about that much); None where they do not reach the gradient tolerance of L-BFGS-B's fits."""
    for _ in range(steps):
        value, gradient = _objective(theta, y, matrices, family, precision)
        if not np.isfinite(value):
            return None
        if np.abs(gradient).max() < 1e-8:
            return theta
        theta = theta - hessian_inverse @ (len(y) * gradient)  # _objective's gradient is of the mean
    return None


def resample(rng: np.random.Generator, n: int, sites=None) -> tuple[np.ndarray, np.ndarray | None]:
    """(indices, their sites) of a bootstrap resample of n scans: scans with replacement; or, where scans have
    sites, sites with replacement and every scan of each (a cluster bootstrap), each drawn site under a name of
    its own (the chart's site names in turn: the site effects are exchangeable), so that a site drawn twice
    counts twice. Resampling scans within the chart's sites would leave out the population intercept's error
    from few sites, about tau / sqrt(sites), and draw bands too narrow for a population curve."""
    if sites is None:
        return rng.integers(0, n, n), None
    names, site_of_scan = np.unique(np.asarray(sites, dtype=object).astype(str), return_inverse=True)
    members = [np.flatnonzero(site_of_scan == site) for site in range(len(names))]
    drawn = [members[site] for site in rng.integers(0, len(names), len(names))]
    return np.concatenate(drawn), np.repeat(names, [len(scans) for scans in drawn]).astype(object)


def bootstrap_centiles(
    model: CentileModel, age, y, covariates=None, ages=None, settings: CentileSettings = DEFAULTS, sites=None
) -> tuple[np.ndarray, np.ndarray]:
    """(lower, upper) percentile-interval bounds (len(ages) x len(percentiles)) of the centile curves over
    ``bootstrap_resamples`` seeded resamples (``resample``: of sites where the chart has a site effect, its SD
    kept at the chart's); NaN where there are none. Each
    resample is refitted with the chart's family, df and knots, from the chart's coefficients: by Newton steps
    with the chart's Hessian, or L-BFGS-B where those do not converge (the same optimum, five times faster at
    5,000 scans)."""
    age, y = np.asarray(age, float), np.asarray(y, float)
    covariates = np.zeros((len(age), 0)) if covariates is None else np.asarray(covariates, float)
    ages = age_grid(*model.age_range, settings.age_step) if ages is None else np.asarray(ages, float)
    family = FAMILIES[model.family]
    matrices = model.design.matrices(age, covariates, sites)
    precision = _site_precision(model.design, len(model.coefficients), model.site_sd)
    hessian = _hessian(model.coefficients, y, matrices, family)
    try:
        hessian_inverse = np.linalg.inv(hessian if precision is None else hessian + np.diag(precision))
    except np.linalg.LinAlgError:
        hessian_inverse = None
    # the curves of the chart's ages, even where a resample misses the youngest or oldest scan
    grid = model.design.matrices(ages, np.zeros((len(ages), len(model.covariates))))
    scores = stats.norm.ppf(np.asarray(settings.percentiles) / 100) * model.z_scale
    rng = np.random.default_rng(settings.seed)
    draws = []
    for _ in range(settings.bootstrap_resamples):
        pick, picked_sites = resample(rng, len(y), sites)
        if picked_sites is None:
            picked = [m[pick] for m in matrices]
        else:
            picked = model.design.matrices(age[pick], covariates[pick], picked_sites)
        theta = (
            None
            if hessian_inverse is None
            else _newton_refit(model.coefficients, y[pick], picked, family, hessian_inverse, precision)
        )
        if theta is None:
            refit = fit_model(
                model.family,
                model.dfs,
                age[pick],
                y[pick],
                covariates[pick],
                model.covariates,
                design=model.design,
                start=model.coefficients,
                sites=picked_sites,
                site_sd=model.site_sd,
            )
            theta = refit.coefficients if refit.converged else None
        if theta is not None:
            eta = _split_predictors(grid, theta)
            draws.append(np.column_stack([family.quantile(score, eta) for score in scores]))
    shape = (len(ages), len(settings.percentiles))
    if not draws:
        return np.full(shape, np.nan), np.full(shape, np.nan)
    tail = 100 * (1 - settings.bootstrap_level) / 2
    low, high = np.nanpercentile(np.stack(draws), [tail, 100 - tail], axis=0)
    return low, high


@dataclass(frozen=True)
class CentileChart:
    """One chart: the model (None where refused), its note, the selection table and the calibration."""

    model: CentileModel | None
    note: str
    n: int
    selection: pd.DataFrame = field(default_factory=pd.DataFrame)
    calibration: dict = field(default_factory=dict)
    settings: CentileSettings = DEFAULTS
    out_of_fold_z: np.ndarray | None = None  # the calibration's z of each scan, from a fit without its fold

    def summary(self) -> dict:
        """One row for a table of charts: n, note, family, dfs, parameters, criterion and calibration."""
        m = self.model
        return {
            "n": self.n,
            "note": self.note,
            "family": m.family if m else "",
            "dfs": "/".join(map(str, m.dfs)) if m else "",
            "parameters": m.n_parameters if m else np.nan,
            "criterion": m.criterion(self.settings.gaic_penalty) if m else np.nan,
            "criterion_name": "BIC" if self.settings.gaic_penalty is None else f"GAIC({self.settings.gaic_penalty:g})",
            **self.calibration,
        }

    def curves(self, age, y, covariates=None, with_intervals: bool = True, sites=None) -> pd.DataFrame:
        """The drawn chart: age grid over the fitted ages, one column per centile (p5, ...), with the bootstrap
        bounds p5_low, p5_high, ... (refit from the chart's data ``age``, ``y``, ``covariates``, ``sites``); the
        population's curves (site effect 0). Refused charts: no rows."""
        names = [f"p{p:g}" for p in self.settings.percentiles]
        if self.model is None:
            return pd.DataFrame(columns=["age", *names])
        ages = age_grid(*self.model.age_range, self.settings.age_step)
        table = pd.DataFrame(centile_curves(self.model, ages, self.settings.percentiles), columns=names)
        table.insert(0, "age", ages)
        if with_intervals and self.settings.bootstrap_resamples:
            values = covariates[list(self.model.covariates)].to_numpy(float) if self.model.covariates else None
            low, high = bootstrap_centiles(self.model, age, y, values, ages, self.settings, sites)
            for i, name in enumerate(names):
                table[f"{name}_low"], table[f"{name}_high"] = low[:, i], high[:, i]
        return table

    def place(self, value, age, covariates=None, sites=None) -> tuple[np.ndarray, np.ndarray]:
        """(z, note) of new scans; refused charts: z NaN, the chart's note."""
        value = np.atleast_1d(np.asarray(value, float))
        if self.model is None:
            return np.full(value.shape, np.nan), np.full(value.shape, self.note, dtype=object)
        return self.model.z(value, age, covariates, self.settings.z_limit, sites)


def _varying(covariates: pd.DataFrame | None) -> tuple[np.ndarray, tuple[str, ...]]:
    if covariates is None or covariates.shape[1] == 0:
        return None, ()
    names = tuple(c for c in covariates.columns if covariates[c].nunique() > 1)
    return covariates[list(names)].to_numpy(float), names


def fit_centile_chart(
    age,
    y,
    covariates: pd.DataFrame | None = None,
    settings: CentileSettings = DEFAULTS,
    calibrated: bool = True,
    sites=None,
) -> CentileChart:
    """Select, fit and calibrate one chart from complete cases (finite age, y and covariates), or refuse it
    with a note (module docstring). ``calibrated=False`` skips the k-fold check (and its refusal). ``sites``:
    each scan's site, for a random intercept on mu (None: none)."""
    age, y = np.asarray(age, float), np.asarray(y, float)
    sites = None if sites is None else np.asarray(sites, dtype=object).astype(str)
    covariate_values, names = _varying(covariates)
    n = len(y)
    if n < settings.min_scans:
        return CentileChart(None, TOO_FEW_SCANS, n, settings=settings)
    if np.ptp(age) == 0 or np.ptp(y) == 0:
        return CentileChart(None, CONSTANT, n, settings=settings)
    model, selection = select_model(age, y, covariate_values, names, settings, sites)
    if model is None:
        return CentileChart(None, NOT_CONVERGED, n, selection, settings=settings)
    calibration, held_out = calibrate(age, y, covariate_values, names, settings, sites) if calibrated else ({}, None)
    if calibration.get(CALIBRATION_FAILED):
        return CentileChart(None, CALIBRATION_FAILED, n, selection, calibration, settings, held_out)
    return CentileChart(model, "", n, selection, calibration, settings, held_out)
