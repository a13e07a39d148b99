"""Acquisition as a confounder of age: the association tests against scipy, the adjusted rs against pingouin,
and the phantom's planted kVp confounding found on its drawn values."""

import dataclasses

import numpy as np
import pandas as pd
import pingouin
import pytest
from scipy import stats
from test_figures import svg_text

from ctcohort import phantom
from ctcohort.acquisition import (
    association_table,
    decade_shares,
    kruskal_wallis,
    pool_rare,
    sensitivity_table,
)
from ctcohort.stats import StatisticsSettings
from ctcohort.structures import load_structure_table


def scan_cohort(n=60, seed=0) -> pd.DataFrame:
    """A long table of two structures with acquisition columns; kvp lower in the young, HU up at low kVp."""
    rng = np.random.default_rng(seed)
    age = rng.integers(20, 90, n).astype(float)
    kvp = np.where(rng.random(n) < np.where(age < 50, 0.8, 0.2), 100, 120)
    scans = pd.DataFrame(
        {
            "subject": [f"s{i:03d}" for i in range(n)],
            "age": age,
            "sex": rng.choice(["M", "F"], n),
            "contrast": rng.integers(0, 2, n),
            "kvp": kvp,
            "kernel_class": rng.choice(["soft", "sharp", "bone"], n, p=[0.55, 0.4, 0.05]),
            "manufacturer": rng.choice(["A", "B"], n),
        }
    )
    rows = []
    for structure, age_slope in (("muscle_a", -0.5), ("muscle_b", 0.0)):
        hu = 50 + age_slope * age + 15 * (kvp == 100) + rng.normal(0, 4, n)
        rows.append(scans.assign(structure=structure, group="muscle", hu_mean=hu, volume_ml=rng.normal(100, 5, n)))
    return pd.concat(rows, ignore_index=True)


def test_kruskal_wallis_equals_scipy_with_ties():
    rng = np.random.default_rng(3)
    values = rng.integers(0, 12, 50).astype(float)  # many ties
    groups = rng.choice(["a", "b", "c"], 50)
    h, p = kruskal_wallis(values, groups)
    expected = stats.kruskal(*(values[groups == g] for g in "abc"))
    assert h == pytest.approx(expected.statistic, rel=1e-12) and p == pytest.approx(expected.pvalue, rel=1e-10)
    assert np.isnan(kruskal_wallis(values, np.full(50, "a"))[0])


def test_association_table_tests_numbers_by_spearman_and_text_by_kruskal_wallis():
    measurements = scan_cohort()
    table = association_table(measurements, min_n=10).set_index("variable")
    assert list(table.index) == ["kvp", "kernel_class", "manufacturer"]
    scans = measurements.drop_duplicates("subject")
    assert table.at["kvp", "test"] == "spearman" and table.at["kvp", "n"] == 60
    assert table.at["kvp", "statistic"] == pytest.approx(stats.spearmanr(scans["age"], scans["kvp"]).statistic)
    assert table.at["kvp", "p"] < 0.05
    by_kernel = [scans.loc[scans["kernel_class"] == k, "age"] for k in sorted(set(scans["kernel_class"]))]
    assert table.at["kernel_class", "statistic"] == pytest.approx(stats.kruskal(*by_kernel).statistic)
    assert table.at["kernel_class", "p"] == pytest.approx(stats.kruskal(*by_kernel).pvalue)
    assert table.at["kernel_class", "test"] == "kruskal_wallis" and table.at["kernel_class", "categories"] == 3


def test_decade_shares_sum_to_one_per_decade():
    shares = decade_shares(scan_cohort())
    sums = shares.groupby(["variable", "decade"])["share"].sum()
    np.testing.assert_allclose(sums, 1.0)
    young = shares[(shares["variable"] == "kvp") & (shares["decade"] == 20)].set_index("value")["share"]
    assert young["100"] > young["120"]


def test_rare_categories_are_pooled_into_other():
    measurements = scan_cohort()
    pooled, note = pool_rare(measurements, ["kvp", "kernel_class"], min_scans=10)
    assert note == "kernel_class: bone"
    assert set(pooled["kernel_class"]) == {"soft", "sharp", "other"}


def test_adjusted_rs_equals_pingouin_partial_spearman():
    measurements = scan_cohort()
    settings = StatisticsSettings(measures=("hu_mean",), acquisition_covariates=("kvp", "kernel_class"))
    table = sensitivity_table(measurements, settings).set_index("structure")
    scans = pool_rare(measurements, ["kernel_class"], 10)[0]
    block = scans[scans["structure"] == "muscle_b"].assign(
        male=lambda t: (t["sex"] == "M").astype(float), sharp=lambda t: (t["kernel_class"] == "soft").astype(float)
    )
    block["other"] = (block["kernel_class"] == "other").astype(float)
    expected = pingouin.partial_corr(
        block, x="age", y="hu_mean", covar=["male", "contrast", "kvp", "sharp", "other"], method="spearman"
    )
    assert table.at["muscle_b", "rs_acquisition_adjusted"] == pytest.approx(expected["r"].iloc[0], abs=1e-10)
    assert table.at["muscle_b", "covariates"] == "sex,contrast,kvp,kernel_class"
    assert table.at["muscle_b", "pooled"] == "kernel_class: bone"
    primary = pingouin.partial_corr(block, x="age", y="hu_mean", covar=["male", "contrast"], method="spearman")
    assert table.at["muscle_b", "rs_primary"] == pytest.approx(primary["r"].iloc[0], abs=1e-10)


def phantom_measurements(n: int, seed: int) -> pd.DataFrame:
    """The phantom's drawn HU and volume factors per subject and structure, as a measurement table (what
    segmentation and measurement would give, without their partial volume and noise)."""
    groups = load_structure_table("total_v1").set_index("name")["group"]
    rows = []
    for index, subject in enumerate(phantom.subject_ids(n)):
        draw = phantom.draw_subject(seed, index)
        for k, s in enumerate(phantom.ANATOMY):
            group = groups[s.name]
            rows.append(
                (subject, draw.age, draw.sex, draw.contrast, draw.kvp, s.name, group)
                + (phantom._volume_factor(s, group, draw, k), phantom._attenuation(s, group, draw, k))
            )
    columns = ["subject", "age", "sex", "contrast", "kvp", "structure", "group", "volume_ml", "hu_mean"]
    return pd.DataFrame(rows, columns=columns)


def test_the_demo_plants_a_kvp_confounded_null_and_keeps_its_age_effects():
    """On the demo's 40 drawn subjects: kvp goes with age; the iliopsoas HU (no age effect, a kVp effect) is
    significant in the primary analysis and not once adjusted for kvp; no planted age effect loses
    significance."""
    measurements = phantom_measurements(40, 1)
    association = association_table(measurements, min_n=10).set_index("variable")
    assert association.at["kvp", "p"] < 0.05 and association.at["kvp", "statistic"] > 0
    settings = StatisticsSettings(measures=("volume_ml", "hu_mean"))
    table = sensitivity_table(measurements, settings).set_index(["structure", "measure"])
    truth = phantom.truth_table().set_index(["structure", "measure"])
    confounded = truth.index[(truth["direction"] == 0) & (truth["kvp_effect"] != 0)]
    assert {("iliopsoas_left", "hu_mean"), ("iliopsoas_right", "hu_mean")} <= set(confounded)
    for key in confounded:
        if table.at[key, "significant_primary"]:
            assert table.at[key, "conclusion_changed"] and not table.at[key, "significant_acquisition_adjusted"]
    # the only rows that change: a sign flip of a non-significant rs near 0 changes no conclusion
    assert set(table.index[table["conclusion_changed"]]) == {
        ("iliopsoas_left", "hu_mean"),
        ("iliopsoas_right", "hu_mean"),
    }
    planted = truth.index[truth["direction"] != 0]
    assert table.loc[planted, "significant_primary"].all()
    assert table.loc[planted, "significant_acquisition_adjusted"].all(), table.loc[planted].query(
        "not significant_acquisition_adjusted"
    )


def test_phantom_kvp_is_lower_in_the_young_and_shifts_fat_and_muscle():
    sheet = phantom.covariates(400, seed=1)
    assert set(sheet["kvp"]) == set(phantom.KVP_SETTINGS)
    low = sheet["kvp"] == phantom.KVP_SETTINGS[0]
    assert (
        low[sheet["age"] < phantom.KVP_AGE_SPLIT].mean() > 0.85
        and low[sheet["age"] >= phantom.KVP_AGE_SPLIT].mean() < 0.15
    )
    truth = phantom.truth_table().set_index(["structure", "measure"])
    assert truth.at[("gluteus_maximus_left", "hu_mean"), "kvp_effect"] == phantom.KVP_HU_EFFECT["muscle"]
    assert (
        truth.at[("liver", "hu_mean"), "kvp_effect"] == 0 and (truth.xs("volume_ml", level=1)["kvp_effect"] == 0).all()
    )
    draw = phantom.draw_subject(1, int(np.flatnonzero(low)[0]))
    ct_low, labels, _ = phantom.render_subject(draw)
    ct_high, _, _ = phantom.render_subject(dataclasses.replace(draw, kvp=phantom.KVP_SETTINGS[1]))
    difference = ct_low.astype(float) - ct_high
    muscle = labels == load_structure_table("total_v1").set_index("name").at["iliopsoas_left", "label"]
    fat = (labels == 0) & (ct_high > -200)
    assert np.median(difference[muscle]) == pytest.approx(phantom.KVP_HU_EFFECT["muscle"], abs=1)
    assert np.median(difference[fat]) == pytest.approx(phantom.KVP_HU_EFFECT["fat"], abs=1)


def test_methods_say_what_was_checked_associated_and_changed():
    from ctcohort.methods import _acquisition_sentence

    measurements = scan_cohort()
    association = association_table(measurements, min_n=10)
    sensitivity = sensitivity_table(measurements, StatisticsSettings(measures=("hu_mean",)))
    sentence = _acquisition_sentence(association, sensitivity)
    assert "(kvp, kernel_class and manufacturer)" in sentence and "kvp changed with age" in sentence
    changed = int(sensitivity["conclusion_changed"].sum())
    assert (
        f"Adjusted additionally for sex, contrast, kvp and kernel_class, {changed} structure-measure pair" in sentence
    )


def test_the_mix_figure_has_a_panel_per_acquisition_column(tmp_path):
    from ctcohort.acquisition_figure import plot_acquisition_mix

    plot_acquisition_mix(decade_shares(scan_cohort()), [tmp_path / "mix.svg"])
    shown = svg_text(tmp_path / "mix.svg").splitlines()
    assert {"kvp", "kernel class", "manufacturer", "100", "120", "soft"} <= set(shown)
