"""Centile charts (ctcohort.centiles) on draws from a known age-dependent truth (ctcohort.centile_truth)."""

import numpy as np
import pandas as pd
import patsy
import pytest
from scipy import integrate, optimize, stats

from ctcohort import centiles
from ctcohort.centile_truth import TRUTHS
from ctcohort.centiles import (
    BCCG,
    BCT,
    CALIBRATION_FAILED,
    NORMAL,
    SHASH,
    TOO_FEW_SCANS,
    CentileSettings,
    fit_centile_chart,
    fit_model,
)

AGES_CHECKED = np.array([30.0, 50.0, 70.0])


def drawn(name: str, n: int, seed: int):
    return TRUTHS[name].draw(n, np.random.default_rng(seed))


def test_natural_spline_spans_the_same_space_as_patsy_cr():
    age = np.random.default_rng(1).uniform(20, 85, 200)
    knots = centiles.age_knots(age, 4)
    ours = np.column_stack([np.ones(len(age)), centiles.natural_spline(age, knots)])
    theirs = patsy.dmatrix(
        "cr(x, knots=inner, lower_bound=lo, upper_bound=hi) - 1",
        {"x": age, "inner": knots[1:-1], "lo": knots[0], "hi": knots[-1]},
    )
    residual = theirs - ours @ np.linalg.lstsq(ours, theirs, rcond=None)[0]
    assert ours.shape[1] == np.asarray(theirs).shape[1] == 5
    assert np.abs(residual).max() < 1e-9


@pytest.mark.parametrize(
    "family,dfs", [(NORMAL, (2, 1)), (BCCG, (2, 1, 1)), (BCCG, (0, 0, 0)), (SHASH, (2, 1, 0, 0)), (BCT, (2, 1, 1, 0))]
)
def test_gradients_match_finite_differences(family, dfs):
    age, y = drawn("skewed", 150, 2)
    design = centiles.Design.for_data(age, np.zeros((150, 0)), dfs)
    matrices = design.matrices(age, np.zeros((150, 0)))
    chosen = centiles.FAMILIES[family]
    start = np.concatenate([m.T @ e / 150 for m, e in zip(matrices, chosen.start(y, matrices))])
    theta = start + np.random.default_rng(3).normal(0, 0.05, len(start))
    error = optimize.check_grad(
        lambda t: centiles._objective(t, y, matrices, chosen)[0],
        lambda t: centiles._objective(t, y, matrices, chosen)[1],
        theta,
    )
    assert error < 1e-5


def test_bccg_z_is_the_box_cox_normal_score():
    age, y = drawn("skewed", 150, 4)
    model = fit_model(BCCG, (1, 0, 0), age, y)
    mu, sigma, nu = model.predictors(age)
    mu, sigma = np.exp(mu), np.exp(sigma)
    z, notes = model.z(y, age)
    expected = ((y / mu) ** nu - 1) / (nu * sigma)
    np.testing.assert_allclose(z, np.clip(expected / model.z_scale, -8, 8), rtol=1e-9)
    assert model.z_scale == pytest.approx(np.sqrt((150 + 2) / (150 - 4)))
    # the median is mu, the centiles invert z
    np.testing.assert_allclose(model.centile(50, age), mu, rtol=1e-12)
    np.testing.assert_allclose(model.z(model.centile(90, age), age)[0], 1.2815515655, rtol=1e-9)


@pytest.mark.parametrize("truth,family", [("normal", NORMAL), ("skewed", BCCG)])
def test_centiles_at_120_scans_are_within_a_third_of_an_sd_of_the_truth(truth, family):
    # the root mean square error over 20 charts, each on its own 120 scans, in units of the true SD at that age
    # (one chart's p5 or p95 near the ends of the ages misses by more than 0.35 SD in about half the draws: the
    # error of an outer centile at 120 scans is about 0.2-0.3 SD even for the true model)
    rng = np.random.default_rng(5)
    errors, families = [], set()
    for _ in range(20):
        age, y = TRUTHS[truth].draw(120, rng)
        model, _ = centiles.select_model(age, y)
        families.add(model.family)
        errors.append(
            [
                (model.centile(p, AGES_CHECKED) - TRUTHS[truth].centile(p, AGES_CHECKED))
                / TRUTHS[truth].sd(AGES_CHECKED)
                for p in centiles.DEFAULTS.percentiles
            ]
        )
    rmse = np.sqrt(np.mean(np.square(errors), axis=0))
    assert rmse.max() < 0.35, rmse.round(2)
    assert family in families


def test_a_chart_of_120_healthy_scans_passes_calibration():
    age, y = drawn("normal", 120, 5)
    chart = fit_centile_chart(age, y)
    assert chart.note == "" and not chart.calibration[CALIBRATION_FAILED]
    assert chart.summary()["criterion_name"] == "GAIC(3)"


@pytest.mark.parametrize("truth", ["normal", "skewed"])
def test_new_healthy_scans_land_beyond_1_96_about_one_in_twenty(truth):
    rng = np.random.default_rng(6)
    age, y = TRUTHS[truth].draw(120, rng)
    chart = fit_centile_chart(age, y, calibrated=False)
    new_age = rng.uniform(age.min(), age.max(), 2000)
    z, notes = chart.place(TRUTHS[truth].sample(new_age, rng), new_age)
    assert np.isfinite(z).all() and set(notes) <= {""}
    assert 0.035 <= (np.abs(z) > 1.96).mean() <= 0.075
    assert np.abs(z).max() <= 6


def test_charts_of_15_scans_are_refused():
    age, y = drawn("normal", 15, 7)
    chart = fit_centile_chart(age, y)
    assert chart.model is None and chart.note == TOO_FEW_SCANS
    assert chart.curves(age, y).empty
    z, notes = chart.place([100.0], [50.0])
    assert np.isnan(z).all() and list(notes) == [TOO_FEW_SCANS]


def test_every_z_is_finite_and_bounded_inside_the_ages_and_absent_outside():
    age, y = drawn("skewed", 120, 8)
    chart = fit_centile_chart(age, y, settings=CentileSettings(families=(NORMAL, BCCG)), calibrated=False)
    assert chart.model.family == BCCG
    values = [1e-300, 0.0, -5.0, 1e300, np.nan, 150.0, 150.0]
    ages = [50, 50, 50, 50, 50, age.min() - 1, age.max() + 1]
    z, notes = chart.place(values, ages)
    assert list(z[:4]) == [-8, -8, -8, 8]
    assert list(notes) == [
        "z_clipped",
        "below_support",
        "below_support",
        "z_clipped",
        "no_value",
        "age_outside_chart",
        "age_outside_chart",
    ]
    assert np.isnan(z[4:]).all()
    assert np.isnan(chart.model.centile(50, [age.max() + 1])).all()


def test_a_chart_that_fails_calibration_is_refused():
    # two groups 20 apart, each with SD 2: a normal chart's SD is about 10 and places almost none beyond 1.96
    rng = np.random.default_rng(9)
    age = rng.uniform(20, 85, 400)
    y = 90 + 20 * (rng.random(400) < 0.5) + rng.normal(0, 2, 400)
    chart = fit_centile_chart(age, y, settings=CentileSettings(families=(NORMAL,)))
    assert chart.model is None and chart.note == CALIBRATION_FAILED
    assert chart.calibration["beyond_1.96"] < 0.03


def test_calibration_summary_and_worm_table_of_standard_normal_z():
    z = np.random.default_rng(10).standard_normal(1000)
    summary = centiles.calibration_summary(z)
    assert not summary[CALIBRATION_FAILED]
    assert set(summary) >= {"z_mean", "z_sd", "beyond_1.96", "below_p5", "above_p95", "below_p25"}
    worm = centiles.worm_table(z)
    assert len(worm) == 1000 and (np.abs(worm["deviation"]) <= worm["band_high"]).mean() > 0.9
    assert centiles.calibration_summary(z * 1.3)[CALIBRATION_FAILED]


def test_bootstrap_intervals_are_seeded_and_hold_the_curves():
    age, y = drawn("normal", 120, 11)
    settings = CentileSettings(bootstrap_resamples=30)
    chart = fit_centile_chart(age, y, settings=settings, calibrated=False)
    first, again = chart.curves(age, y), chart.curves(age, y)
    pd.testing.assert_frame_equal(first, again)
    assert first["age"].iloc[0] == age.min() and first["age"].iloc[-1] == age.max()
    for p in ("p5", "p50", "p95"):
        assert (first[f"{p}_low"] <= first[p]).all() and (first[p] <= first[f"{p}_high"]).all()
    other = fit_centile_chart(age, y, settings=CentileSettings(bootstrap_resamples=30, seed=1), calibrated=False)
    assert not np.allclose(other.curves(age, y)["p5_low"], first["p5_low"])


@pytest.mark.parametrize("truth, family, dfs", [("skewed", BCCG, (2, 1, 0)), ("normal", NORMAL, (2, 1))])
def test_a_bootstrap_refit_by_newton_steps_reaches_the_l_bfgs_b_optimum(truth, family, dfs):
    age, y = drawn(truth, 300, 4)
    model = fit_model(family, dfs, age, y)
    pick = np.random.default_rng(0).integers(0, len(y), len(y))
    full = model.design.matrices(age, np.zeros((len(age), 0)))
    matrices = [m[pick] for m in full]
    chosen = centiles.FAMILIES[family]
    inverse = np.linalg.inv(centiles._hessian(model.coefficients, y, full, chosen))
    newton = centiles._newton_refit(model.coefficients, y[pick], matrices, chosen, inverse)
    lbfgs = fit_model(family, dfs, age[pick], y[pick], design=model.design, start=model.coefficients)
    assert lbfgs.converged and newton is not None
    assert not np.allclose(newton, model.coefficients, atol=1e-3)  # the resample moved the optimum
    np.testing.assert_allclose(newton, lbfgs.coefficients, atol=1e-5)
    newton_nll = centiles._objective(newton, y[pick], matrices, chosen)[0]
    assert newton_nll <= -lbfgs.log_likelihood / len(y) + 1e-12


def test_a_covariate_shifts_mu_and_the_curves_are_drawn_at_zero():
    rng = np.random.default_rng(12)
    age, y = TRUTHS["normal"].draw(300, rng)
    contrast = (rng.random(300) < 0.5).astype(float)
    chart = fit_centile_chart(age, y + 40 * contrast, pd.DataFrame({"contrast": contrast, "site": 1.0}))
    assert chart.note == "" and chart.model.covariates == ("contrast",)  # site is constant: left out
    truth = TRUTHS["normal"]
    error = chart.model.centile(50, AGES_CHECKED) - truth.centile(50, AGES_CHECKED)
    assert np.abs(error / truth.sd(AGES_CHECKED)).max() < 0.35
    z_native, _ = chart.place([truth.centile(50, 50)], [50.0], {"contrast": 0.0})
    z_contrast, _ = chart.place([truth.centile(50, 50) + 40], [50.0], {"contrast": 1.0})
    assert abs(z_native[0]) < 0.35 and abs(z_contrast[0]) < 0.35


def test_settings_from_config_and_checks():
    assert CentileSettings.from_config({}) == centiles.DEFAULTS
    settings = CentileSettings.from_config(
        {"panels": [], "min_n": 15, "families": ["normal"], "folds": 10, "percentiles": [3, 50, 97]}
    )
    assert settings.families == (NORMAL,) and settings.folds == 10 and settings.percentiles == (3, 50, 97)
    assert settings.min_scans == centiles.MIN_SCANS
    with pytest.raises(ValueError, match="families"):
        CentileSettings(families=("gamma",))
    assert centiles.DEFAULTS.max_dfs(BCCG) == (4, 2, 0) and centiles.DEFAULTS.max_dfs(NORMAL) == (4, 2)
    assert centiles.DEFAULTS.max_dfs(SHASH) == centiles.DEFAULTS.max_dfs(BCT) == (4, 2, 0, 0)
    assert centiles.DEFAULTS.max_dfs(NORMAL, 120) == (3, 1) and centiles.DEFAULTS.max_dfs(NORMAL, 20) == (1, 0)


def test_selection_records_every_model_and_prefers_the_simpler_family_for_normal_data():
    age, y = drawn("normal", 500, 13)
    model, table = centiles.select_model(age, y)
    assert model.family == NORMAL and table["chosen"].sum() == 1
    chosen = table[table["chosen"]].iloc[0]
    assert chosen["criterion"] == table["criterion"].min()
    assert set(table["family"]) == {NORMAL, BCCG, SHASH, BCT}
    _, negative = centiles.select_model(age, y - 200)
    assert set(negative["family"]) == {NORMAL, SHASH}  # bccg and bct only for positive values
    _, fewer = centiles.select_model(age[:499], y[:499])
    assert set(fewer["family"]) == {NORMAL, BCCG}  # a tail parameter from tail_min_scans scans on


# linear predictors (mu or log mu, log sigma, nu, log delta or log tau) of skewed, heavy- and light-tailed shapes
SHAPES = {
    SHASH: [(120.0, np.log(10.0), 0.6, np.log(0.7)), (80.0, np.log(5.0), -0.4, np.log(1.6))],
    BCT: [(np.log(150.0), np.log(0.2), 0.5, np.log(4.0)), (np.log(90.0), np.log(0.3), -0.8, np.log(30.0))],
}


def density(family, eta):
    return lambda y: np.exp(-centiles.FAMILIES[family].nll(np.array([y]), [np.array([e]) for e in eta])[0][0])


def lost(family, eta):
    """The untruncated BCT's mass outside y > 0 (none for SHASH): F_t(-1 / (sigma |nu|)), below y = 0 where
    nu > 0, beyond y = infinity where nu < 0 (z is bounded there)."""
    if family != BCT:
        return 0.0
    return stats.t.cdf(-1 / (np.exp(eta[1]) * abs(eta[2])), np.exp(eta[3]))


@pytest.mark.parametrize("family,eta", [(f, e) for f, shapes in SHAPES.items() for e in shapes])
def test_density_integrates_to_one_and_the_cdf_inverts_the_quantile(family, eta):
    f = density(family, eta)
    lower = 0.0 if centiles.FAMILIES[family].positive else -np.inf
    total = integrate.quad(f, lower, np.inf, limit=200)[0]
    assert total == pytest.approx(1 - lost(family, eta), abs=1e-8)
    for q in (-2.0, -0.5, 1.2):
        value = centiles.FAMILIES[family].quantile(np.array([q]), [np.array([e]) for e in eta])[0]
        below = integrate.quad(f, lower, value, limit=200)[0] + lost(family, eta) * (eta[2] > 0)
        assert below == pytest.approx(stats.norm.cdf(q), abs=1e-8)
        z = centiles.FAMILIES[family].z(np.array([value]), [np.array([e]) for e in eta])[0]
        assert z == pytest.approx(q, abs=1e-9)


def test_shash_without_skew_or_tails_and_bct_with_nu_1_or_0_are_textbook_distributions():
    y = np.linspace(60.0, 240.0, 7)
    nll = centiles.FAMILIES[SHASH].nll(y, [np.full(7, 130.0), np.full(7, np.log(20.0)), np.zeros(7), np.zeros(7)])[0]
    np.testing.assert_allclose(nll, -stats.norm.logpdf(y, 130.0, 20.0), rtol=1e-12)
    mu, sigma, tau = 130.0, 0.2, 4.0
    for nu, reference in [
        (1.0, stats.t.logpdf(y, tau, mu, mu * sigma)),  # y = mu (1 + sigma T)
        (0.0, stats.t.logpdf(np.log(y), tau, np.log(mu), sigma) - np.log(y)),
    ]:  # log-t
        eta = [np.full(7, np.log(mu)), np.full(7, np.log(sigma)), np.full(7, nu), np.full(7, np.log(tau))]
        np.testing.assert_allclose(centiles.FAMILIES[BCT].nll(y, eta)[0], -reference, rtol=1e-10)


@pytest.mark.parametrize(
    "family,eta",
    [
        (SHASH, SHAPES[SHASH][0]),
        (SHASH, SHAPES[SHASH][1]),
        (BCT, SHAPES[BCT][0]),
        (BCT, (np.log(150.0), np.log(0.2), 0.5, np.log(5e3))),
    ],
)
def test_per_scan_gradients_equal_central_differences(family, eta):
    # the second BCT's tau = 5,000 is computed by the asymptotic series of the t's normalising constant
    y = np.array([40.0, 95.0, 130.0, 160.0, 260.0])
    eta = [np.full(5, e) for e in eta]
    nll, grads = centiles.FAMILIES[family].nll(y, eta)
    for i in range(4):
        step = [np.zeros(5)] * 4
        step[i] = np.full(5, 1e-6)
        up = centiles.FAMILIES[family].nll(y, [e + s for e, s in zip(eta, step)])[0]
        down = centiles.FAMILIES[family].nll(y, [e - s for e, s in zip(eta, step)])[0]
        np.testing.assert_allclose(grads[i], (up - down) / 2e-6, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("truth,chosen", [("heavy", {SHASH, BCT}), ("skewed", {BCCG, SHASH, BCT})])
def test_selection_picks_a_shape_family_for_heavy_tails_or_skew(truth, chosen):
    age, y = drawn(truth, 500, 14)
    model, table = centiles.select_model(age, y)
    assert model.family in chosen
    best = table.groupby("family")["criterion"].min()
    assert best[model.family] < best[NORMAL] - 10  # GAIC(3): a clear preference, not a tie


def test_shash_and_bct_place_every_value_finitely_and_bct_refuses_centiles_outside_its_support():
    age, y = drawn("heavy", 300, 15)
    for family in (SHASH, BCT):
        model = fit_model(family, (2, 1, 0, 0), age, y)
        z, notes = model.z([1e-300, 1e300, 100.0, -1e300], [50.0] * 4)
        # (a BCT with nu > 0 bounds z below: y -> 0 is z = Phi^-1(F_t(-1 / (sigma nu))), finite)
        assert z[0] < -3 and z[1] == 8 and abs(z[2]) < 2 and z[3] == -8 and np.abs(z).max() <= 8
        assert list(notes[1:]) == ["z_clipped", "", "z_clipped" if family == SHASH else "below_support"]
        assert np.isfinite(model.centile(0.01, AGES_CHECKED)).all()
    # a Box-Cox shape so strong that the 5th centile's t quantile lies below y = 0: no value (a refused chart)
    eta = [np.array([np.log(100.0)]), np.array([np.log(0.35)]), np.array([14.0]), np.array([np.log(5.0)])]
    assert np.isnan(centiles.FAMILIES[BCT].quantile(np.array([-1.645]), eta)).all()


def site_draws(rng, offsets, scans_per_site, ages=(20, 85)):
    """Scans of sites with the given intercepts on a normal chart (mean 10 + 0.05 age, SD 1)."""
    site = np.repeat(np.arange(len(offsets)), scans_per_site)
    age = rng.uniform(*ages, len(site))
    return age, 10 + 0.05 * age + offsets[site] + rng.normal(0, 1, len(site)), site


def test_a_random_site_intercept_is_recovered_and_widens_the_z_of_a_new_site():
    rng = np.random.default_rng(8)
    offsets = stats.norm.ppf((np.arange(8) + 0.5) / 8)[[3, 6, 0, 5, 1, 7, 2, 4]]  # tau about 1, mean 0
    age, y, site = site_draws(rng, offsets, 60)
    model = fit_model(NORMAL, (1, 0), age, y, sites=site.astype(str))
    assert model.converged
    # the estimate of tau is of the 8 drawn intercepts (their SD), the BLUPs of each, shrunk a little
    assert model.site_sd == pytest.approx(offsets.std(ddof=1), rel=0.15)
    effects = np.array([model.site_effects[str(i)] for i in range(8)])
    np.testing.assert_allclose(effects, offsets - offsets.mean(), atol=0.3)
    assert 6 < model.site_edf < 8 and model.n_parameters == pytest.approx(3 + model.site_edf)
    # scans of 400 sites the chart has not seen: widened by tau, about 5% beyond 1.96; not widened, far more
    new_age, new_y, new_site = site_draws(rng, rng.normal(0, 1, 400), 5, (25, 80))
    z, notes = model.z(new_y, new_age, sites=(new_site + 100).astype(str))
    assert set(notes) == {centiles.SITE_NEW}
    assert 0.035 < np.mean(np.abs(z) > 1.96) < 0.07
    assert np.mean(np.abs(model.z(new_y, new_age)[0]) > 1.96) > 0.12
    # a scan of a known site is placed with its BLUP and no note
    known_z, known_notes = model.z(y[:60], age[:60], sites="0")
    assert set(known_notes) == {""} and abs(np.mean(known_z)) < 0.3


def test_a_site_intercept_on_the_log_median_of_a_box_cox_chart():
    """bccg: the site moves log mu; a log-normal truth (nu = 0), where widening sigma by tau is exact."""
    rng = np.random.default_rng(9)
    offsets = stats.norm.ppf((np.arange(8) + 0.5) / 8)[[5, 2, 7, 0, 3, 6, 1, 4]]
    age, scaled, site = site_draws(rng, offsets, 60)  # log y: a tenth of these (sigma 0.1, tau 0.1)
    model = fit_model(BCCG, (1, 0, 0), age, np.exp(0.1 * scaled), sites=site.astype(str))
    assert model.converged and model.site_sd == pytest.approx(0.1 * offsets.std(ddof=1), rel=0.15)
    np.testing.assert_allclose([model.site_effects[str(i)] for i in range(8)], 0.1 * offsets, atol=0.03)
    new_age, new_scaled, new_site = site_draws(rng, rng.normal(0, 1, 400), 5, (25, 80))
    z, _ = model.z(np.exp(0.1 * new_scaled), new_age, sites=(new_site + 100).astype(str))
    assert 0.035 < np.mean(np.abs(z) > 1.96) < 0.07


def test_the_bands_of_a_chart_with_sites_hold_the_population_intercepts_error(monkeypatch):
    """The population median's band from a cluster bootstrap of 10 sites: about as wide as the normal
    interval of the population intercept, 1.96 sqrt(tau^2 / sites + sigma^2 / n); resampling scans (within the
    chart's sites) would draw it far narrower."""
    rng = np.random.default_rng(5)
    age, y, site = site_draws(rng, rng.normal(0, 1, 10), 40)
    sites = site.astype(str)
    model = fit_model(NORMAL, (1, 0), age, y, sites=sites)
    settings = CentileSettings(percentiles=(50,), bootstrap_resamples=200)
    middle = [float(np.mean(age))]
    expected = 1.96 * np.sqrt(model.site_sd**2 / 10 + 1 / len(y))

    def half_width() -> float:
        low, high = centiles.bootstrap_centiles(model, age, y, ages=middle, settings=settings, sites=sites)
        return float(high[0, 0] - low[0, 0]) / 2

    assert 0.7 * expected < half_width() < 1.3 * expected
    monkeypatch.setattr(centiles, "resample", lambda rng, n, sites: (pick := rng.integers(0, n, n), sites[pick]))
    assert half_width() < 0.5 * expected
