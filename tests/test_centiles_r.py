"""ctcohort.centiles against R on the same data: VGAM's lms.bcn (LMS) and uninormal, mgcv's gaulss and shash.

Each model is fitted here and in R with the same natural spline basis of age (R's splines::ns with our
knots) for every parameter (shash: mu and sigma, its skewness and tail weight constant), and without the
small-sample correction (``small_sample_correction=False``): the same likelihood over the same space, so the
maximum-likelihood fits must agree up to the optimisers' tolerances. mgcv's shash is called with b = 0 (its
default 0.01 puts a floor under sigma) and phiPen = 0 (its default adds a small ridge on log delta to the
likelihood). R has no Box-Cox t on this machine's packages (gamlss.dist's BCT): our BCT is checked against
lms.bcn instead, on data without heavy tails (gamma), where its t has over 100 degrees of freedom and is all but
the BCCG.
Tolerance: the centiles p5 to p95 at ages 30, 50 and 70 within 0.01 of the true SD at that age.
Needs Rscript with VGAM and mgcv (Debian: r-base-core r-cran-vgam r-cran-mgcv; .ci/run installs them);
skipped where they are missing, a failure where the environment variable CI is set.
"""

import os
import shutil
import subprocess
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest

from ctcohort import centiles
from ctcohort.centile_truth import TRUTHS

AGES = (30.0, 50.0, 70.0)
TOLERANCE_SD = 0.01
DF = 2  # spline df of every parameter in both fits (shash: of mu and sigma; bct: all but tau)
DFS = {centiles.SHASH: (DF, DF, 0, 0), centiles.BCT: (DF, DF, DF, 0)}

R_SCRIPT = r"""
suppressPackageStartupMessages({library(splines); library(VGAM); library(mgcv)})
args <- commandArgs(trailingOnly = TRUE)
data <- read.csv(args[1])
knots <- as.numeric(strsplit(args[2], ",")[[1]])
model <- args[3]
inner <- knots[-c(1, length(knots))]
edge <- knots[c(1, length(knots))]
basis <- function(a) ns(a, knots = inner, Boundary.knots = edge)
new <- data.frame(age = c(30, 50, 70))
p <- c(5, 25, 50, 75, 95)
z <- qnorm(p / 100)
if (model == "lms.bcn") {
  fit <- vglm(y ~ basis(age), lms.bcn(zero = NULL, lmu = "loglink"), data = data,
              control = vglm.control(epsilon = 1e-10, maxit = 200, trace = FALSE))
  eta <- predict(fit, newdata = new)
  lambda <- eta[, 1]; mu <- exp(eta[, 2]); sigma <- exp(eta[, 3])
  centiles <- sapply(z, function(q) mu * (1 + lambda * sigma * q)^(1 / lambda))
} else if (model == "uninormal") {
  fit <- vglm(y ~ basis(age), uninormal(zero = NULL), data = data,
              control = vglm.control(epsilon = 1e-10, maxit = 200, trace = FALSE))
  eta <- predict(fit, newdata = new)
  centiles <- sapply(z, function(q) eta[, 1] + exp(eta[, 2]) * q)
} else if (model == "shash") {
  fit <- gam(list(y ~ basis(age), ~ basis(age), ~ 1, ~ 1), family = shash(b = 0, phiPen = 0), data = data)
  eta <- predict(fit, newdata = new)  # mu, log sigma, epsilon, log delta
  delta <- exp(eta[, 4])
  centiles <- sapply(z, function(q) eta[, 1] + exp(eta[, 2]) * delta * sinh((asinh(q) + eta[, 3]) / delta))
} else {
  fit <- gam(list(y ~ basis(age), ~ basis(age)), family = gaulss(b = 0), data = data)
  fitted <- predict(fit, newdata = new, type = "response")  # mean and 1 / sd
  centiles <- sapply(z, function(q) fitted[, 1] + q / fitted[, 2])
}
write.csv(unname(centiles), args[4], row.names = FALSE)
"""


def cannot_run(reason: str):
    if os.environ.get("CI"):
        pytest.fail(f"{reason}; CI is set, where the comparison with R must run")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def rscript() -> str:
    path = shutil.which("Rscript")
    if path is None:
        cannot_run("Rscript is not installed (Debian: r-base-core)")
    check = subprocess.run([path, "-e", "library(VGAM); library(mgcv)"], capture_output=True, text=True)
    if check.returncode:
        cannot_run(f"R lacks VGAM or mgcv (Debian: r-cran-vgam r-cran-mgcv): {check.stderr.strip()[-200:]}")
    return path


def r_centiles(rscript: str, tmp_path, age, y, knots, model: str) -> np.ndarray:
    data, script, result = tmp_path / "data.csv", tmp_path / "fit.R", tmp_path / "centiles.csv"
    pd.DataFrame({"age": age, "y": y}).to_csv(data, index=False)
    script.write_text(R_SCRIPT)
    done = subprocess.run(
        [rscript, str(script), str(data), ",".join(f"{k:.17g}" for k in knots), model, str(result)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    return pd.read_csv(result).to_numpy(float)


@pytest.mark.parametrize(
    "truth,family,model",
    [
        ("skewed", centiles.BCCG, "lms.bcn"),
        ("normal", centiles.NORMAL, "uninormal"),
        ("normal", centiles.NORMAL, "gaulss"),
        ("skewed", centiles.SHASH, "shash"),
        ("heavy", centiles.SHASH, "shash"),
        ("skewed", centiles.BCT, "lms.bcn"),
    ],
)
def test_maximum_likelihood_fits_agree_with_r(rscript, tmp_path, truth, family, model):
    age, y = TRUTHS[truth].draw(300, np.random.default_rng(18))
    dfs = DFS.get(family, (DF,) * len(centiles.FAMILY_PARAMETERS[family]))
    ours = centiles.fit_model(family, dfs, age, y)
    ours = replace(ours, small_sample_correction=False)
    assert ours.converged
    if family == centiles.BCT:
        assert np.exp(ours.predictors([50.0])[3][0]) > 100  # tau: almost normal tails
    knots = ours.design.knots[0]
    theirs = r_centiles(rscript, tmp_path, age, y, knots, model)
    mine = np.column_stack([ours.centile(p, AGES) for p in centiles.DEFAULTS.percentiles])
    difference = np.abs(mine - theirs) / TRUTHS[truth].sd(np.array(AGES))[:, None]
    print(model, "largest difference (SD):", difference.max())
    assert difference.max() < TOLERANCE_SD, difference.round(4)


SITE_SCRIPT = r"""
suppressPackageStartupMessages({library(splines); library(mgcv)})
args <- commandArgs(trailingOnly = TRUE)
data <- read.csv(args[1])
data$site <- factor(data$site)
knots <- as.numeric(strsplit(args[2], ",")[[1]])
inner <- knots[-c(1, length(knots))]
edge <- knots[c(1, length(knots))]
basis <- function(a) ns(a, knots = inner, Boundary.knots = edge)
fit <- gam(list(y ~ basis(age) + s(site, bs = "re"), ~ basis(age)), family = gaulss(b = 0), data = data,
           method = "REML")
new <- data.frame(age = c(30, 50, 70), site = data$site[1])
fitted <- predict(fit, newdata = new, type = "response", exclude = "s(site)")  # mean and 1 / sd, site effect 0
z <- qnorm(c(5, 25, 50, 75, 95) / 100)
centiles <- sapply(z, function(q) fitted[, 1] + q / fitted[, 2])
effects <- coef(fit)[grep("s(site)", names(coef(fit)), fixed = TRUE)]
write.csv(rbind(cbind(centiles), c(gam.vcomp(fit)[1, 1], rep(NA, 4)), cbind(effects, NA, NA, NA, NA)),
          args[3], row.names = FALSE)
"""
SITE_SD_TOLERANCE = 0.005  # relative: both maximise the same Laplace-approximate restricted likelihood
SITE_EFFECT_TOLERANCE_SD = 0.002  # the BLUPs, in units of the residual SD


def test_a_random_site_intercept_agrees_with_mgcv_reml(rscript, tmp_path):
    rng = np.random.default_rng(21)
    age, y = TRUTHS["normal"].draw(400, rng)
    site = rng.integers(0, 8, len(y))
    y = y + rng.normal(0, 0.6, 8)[site] * TRUTHS["normal"].sd(age)
    labels = np.array([f"site{i}" for i in range(8)])[site]
    ours = replace(centiles.fit_model(centiles.NORMAL, (DF, DF), age, y, sites=labels), small_sample_correction=False)
    assert ours.converged
    data, script, result = tmp_path / "data.csv", tmp_path / "fit.R", tmp_path / "result.csv"
    pd.DataFrame({"age": age, "y": y, "site": labels}).to_csv(data, index=False)
    script.write_text(SITE_SCRIPT)
    done = subprocess.run(
        [rscript, str(script), str(data), ",".join(f"{k:.17g}" for k in ours.design.knots[0]), str(result)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    theirs = pd.read_csv(result).to_numpy(float)
    sd = TRUTHS["normal"].sd(np.array(AGES))[:, None]
    mine = np.column_stack([ours.centile(p, AGES) for p in centiles.DEFAULTS.percentiles])
    effects = np.array(list(ours.site_effects.values()))
    residual_sd = float(np.exp(ours.predictors(age)[1]).mean())
    print(
        "site SD ours, mgcv:",
        ours.site_sd,
        theirs[3, 0],
        "centiles (SD):",
        (np.abs(mine - theirs[:3]) / sd).max(),
        "BLUPs (SD):",
        np.abs(effects - theirs[4:, 0]).max() / residual_sd,
    )
    assert ours.site_sd == pytest.approx(theirs[3, 0], rel=SITE_SD_TOLERANCE)
    assert np.abs(effects - theirs[4:, 0]).max() < SITE_EFFECT_TOLERANCE_SD * residual_sd
    assert (np.abs(mine - theirs[:3]) / sd).max() < TOLERANCE_SD
