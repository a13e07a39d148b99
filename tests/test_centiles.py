"""Centile charts (ctcohort.centiles) on draws from a known age-dependent truth (ctcohort.centile_truth)."""

import numpy as np
import pandas as pd
import patsy
import pytest
from scipy import optimize

from ctcohort import centiles
from ctcohort.centile_truth import TRUTHS
from ctcohort.centiles import (BCCG, CALIBRATION_FAILED, NORMAL, TOO_FEW_SCANS, CentileSettings, fit_centile_chart,
                               fit_model)

AGES_CHECKED = np.array([30.0, 50.0, 70.0])


def drawn(name: str, n: int, seed: int):
    return TRUTHS[name].draw(n, np.random.default_rng(seed))


def test_natural_spline_spans_the_same_space_as_patsy_cr():
    age = np.random.default_rng(1).uniform(20, 85, 200)
    knots = centiles.age_knots(age, 4)
    ours = np.column_stack([np.ones(len(age)), centiles.natural_spline(age, knots)])
    theirs = patsy.dmatrix("cr(x, knots=inner, lower_bound=lo, upper_bound=hi) - 1",
                           {"x": age, "inner": knots[1:-1], "lo": knots[0], "hi": knots[-1]})
    residual = theirs - ours @ np.linalg.lstsq(ours, theirs, rcond=None)[0]
    assert ours.shape[1] == np.asarray(theirs).shape[1] == 5
    assert np.abs(residual).max() < 1e-9


@pytest.mark.parametrize("family,dfs", [(NORMAL, (2, 1)), (BCCG, (2, 1, 1)), (BCCG, (0, 0, 0))])
def test_gradients_match_finite_differences(family, dfs):
    age, y = drawn("skewed", 150, 2)
    design = centiles.Design.for_data(age, np.zeros((150, 0)), dfs)
    matrices = design.matrices(age, np.zeros((150, 0)))
    chosen = centiles.FAMILIES[family]
    start = np.concatenate([m.T @ e / 150 for m, e in zip(matrices, chosen.start(y, matrices))])
    theta = start + np.random.default_rng(3).normal(0, 0.05, len(start))
    error = optimize.check_grad(lambda t: centiles._objective(t, y, matrices, chosen)[0],
                                lambda t: centiles._objective(t, y, matrices, chosen)[1], theta)
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
        errors.append([(model.centile(p, AGES_CHECKED) - TRUTHS[truth].centile(p, AGES_CHECKED))
                       / TRUTHS[truth].sd(AGES_CHECKED) for p in centiles.DEFAULTS.percentiles])
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
    chart = fit_centile_chart(age, y, calibrated=False)
    assert chart.model.family == BCCG
    values = [1e-300, 0.0, -5.0, 1e300, np.nan, 150.0, 150.0]
    ages = [50, 50, 50, 50, 50, age.min() - 1, age.max() + 1]
    z, notes = chart.place(values, ages)
    assert list(z[:4]) == [-8, -8, -8, 8]
    assert list(notes) == ["z_clipped", "below_support", "below_support", "z_clipped", "no_value",
                           "age_outside_chart", "age_outside_chart"]
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
    settings = CentileSettings.from_config({"panels": [], "min_n": 15, "families": ["normal"], "folds": 10,
                                            "percentiles": [3, 50, 97]})
    assert settings.families == (NORMAL,) and settings.folds == 10 and settings.percentiles == (3, 50, 97)
    assert settings.min_scans == centiles.MIN_SCANS
    with pytest.raises(ValueError, match="families"):
        CentileSettings(families=("gamma",))
    assert centiles.DEFAULTS.max_dfs(BCCG) == (4, 2, 0) and centiles.DEFAULTS.max_dfs(NORMAL) == (4, 2)
    assert centiles.DEFAULTS.max_dfs(NORMAL, 120) == (3, 1) and centiles.DEFAULTS.max_dfs(NORMAL, 20) == (1, 0)


def test_selection_records_every_model_and_prefers_the_simpler_family_for_normal_data():
    age, y = drawn("normal", 300, 13)
    model, table = centiles.select_model(age, y)
    assert model.family == NORMAL and table["chosen"].sum() == 1
    chosen = table[table["chosen"]].iloc[0]
    assert chosen["criterion"] == table["criterion"].min()
    assert set(table["family"]) == {NORMAL, BCCG}
    _, negative = centiles.select_model(age, y - 200)
    assert set(negative["family"]) == {NORMAL}  # bccg only for positive values
