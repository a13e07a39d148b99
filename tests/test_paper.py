"""The paper's reported age correlations (resources/paper/aging_correlations.tsv) beside the study's own."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from scipy import stats

from ctcohort.aggregate import add_combined
from ctcohort.paper import (
    COMPARISON_COLUMNS,
    NOT_IN_STUDY,
    load_paper_correlations,
    paper_comparison,
    paper_table_path,
    write_paper_comparison,
)
from ctcohort.stats import age_correlations, spearman_ci
from ctcohort.structures import load_structure_table

REPO = Path(__file__).parents[1]
# Wasserthal et al. 2023 (doi:10.1148/ryai.230024), aging study, as printed: (structure, measure, rs)
PRINTED = [
    ("aorta", "volume", 0.64),
    ("iliac arteries", "volume", 0.33),
    ("kidneys", "volume", -0.49),
    ("pancreas", "volume", -0.49),
    ("iliopsoas", "volume", -0.61),
    ("autochthonous back muscles", "attenuation", -0.74),
    ("gluteus minimus", "attenuation", -0.79),
    ("gluteus medius", "attenuation", -0.61),
    ("gluteus maximus", "attenuation", -0.51),
    ("hip bone", "attenuation", -0.61),
    ("L4 vertebra", "attenuation", -0.55),
    ("clavicle", "attenuation", -0.53),
]


def test_the_resource_table_holds_the_papers_twelve_rows_and_cites_it():
    paper = load_paper_correlations()
    assert list(zip(paper["paper_structure"], paper["paper_measure"], paper["rs_paper"])) == PRINTED
    assert set(paper["measure"]) == {"volume_ml", "hu_mean"}
    assert (paper["measure"] == "volume_ml").tolist() == [m == "volume" for _, m, _ in PRINTED]
    assert "doi:10.1148/ryai.230024" in paper_table_path().read_text()
    # every row names a structure of the paper's label table or a default combination of them
    names = set(load_structure_table("total_v1")["name"])
    combined = yaml.safe_load((REPO / "config" / "config.yaml").read_text())["statistics"]["combined"]
    for structure in paper["structure"]:
        assert structure in names or set(combined.get(structure, [None])) <= names, structure


def correlations(rows) -> pd.DataFrame:
    """Rows of an age correlation table (the columns paper_comparison reads)."""
    return pd.DataFrame(rows, columns=["structure", "group", "measure", "n", "rs", "ci_low", "ci_high", "p", "note"])


def test_rows_the_study_cannot_give_stay_undecided():
    paper = load_paper_correlations()
    ours = correlations(
        [
            ("aorta", "vessel", "volume_ml", 40, 0.5, 0.2, 0.7, 1e-3, ""),
            ("kidneys", "organ", "volume_ml", 40, 0.1, -0.2, 0.4, 0.5, ""),  # opposite sign
            ("pancreas", "organ", "volume_ml", 5, np.nan, np.nan, np.nan, np.nan, "too_few_scans"),
            ("hips", "bone", "hu_mean", 40, 0.0, -0.3, 0.3, 1.0, ""),  # no direction
            ("aorta", "vessel", "hu_mean", 40, 0.3, 0.0, 0.5, 0.05, ""),  # not a paper row
        ]
    )
    table = paper_comparison(ours, paper).set_index("structure")
    assert list(table.reset_index().columns) == COMPARISON_COLUMNS
    assert len(table) == 12
    assert table.loc["aorta", "same_direction"] == True  # noqa: E712
    assert table.loc["aorta", ["rs", "ci_low", "ci_high", "p", "n"]].tolist() == [0.5, 0.2, 0.7, 1e-3, 40]
    assert table.loc["kidneys", "same_direction"] == False  # noqa: E712
    assert table.loc["hips", "same_direction"] == False  # noqa: E712
    assert pd.isna(table.loc["pancreas", "same_direction"]) and np.isnan(table.loc["pancreas", "rs"])
    assert table.loc["pancreas", "note"] == "too_few_scans" and table.loc["pancreas", "n"] == 5
    missing = table.drop(index=["aorta", "kidneys", "pancreas", "hips"])
    assert (missing["note"] == NOT_IN_STUDY).all() and (missing["n"] == 0).all()
    assert missing[["rs", "ci_low", "ci_high", "p"]].isna().all().all()
    assert missing["same_direction"].isna().all()
    assert table["rs_paper"].tolist() == [rs for *_, rs in PRINTED]


def test_written_table_reads_back_with_NA_for_undecided_rows(tmp_path):
    ours = correlations([("aorta", "vessel", "volume_ml", 40, 0.5, 0.2, 0.7, 1e-3, "")])
    path = tmp_path / "paper_comparison.tsv"
    write_paper_comparison(paper_comparison(ours, load_paper_correlations()), path)
    lines = path.read_text().splitlines()
    assert lines[0].split("\t") == COMPARISON_COLUMNS
    aorta = dict(zip(COMPARISON_COLUMNS, lines[1].split("\t")))
    assert aorta["same_direction"] == "True" and aorta["rs"] == "0.5"
    kidneys = dict(zip(COMPARISON_COLUMNS, lines[3].split("\t")))
    assert kidneys["same_direction"] == "NA" and kidneys["rs"] == "NaN" and kidneys["note"] == NOT_IN_STUDY


def test_a_combined_paper_row_equals_spearman_of_the_summed_members():
    # measurements as the cohort table has them, for the kidneys only; the study's kidneys rs is Spearman
    # of age against left + right volume, computed here by hand
    rng = np.random.default_rng(3)
    n = 40  # above 30 scans the P is scipy's t approximation
    age = rng.uniform(18, 95, n)
    left = 150 - 0.8 * age + rng.normal(0, 15, n)
    right = 160 - 0.6 * age + rng.normal(0, 15, n)
    left[4] = np.nan  # one scan without a left kidney volume: no combined value, not in n
    rows = []
    for i in range(n):
        for name, volume in (("kidney_left", left[i]), ("kidney_right", right[i])):
            rows.append(
                {
                    "subject": f"s{i}",
                    "age": age[i],
                    "structure": name,
                    "label": 2,
                    "group": "organ",
                    "n_voxels": 1000 + i,
                    "volume_ml": volume,
                    "hu_mean": 30.0,
                    "hu_median": 30.0,
                    "hu_std": 10.0,
                    "hu_mean_eroded": 31.0,
                    "complete": True,
                    "exclusion_reason": "" if np.isfinite(volume) else "too_small",
                }
            )
    measurements = add_combined(pd.DataFrame(rows), {"kidneys": ["kidney_left", "kidney_right"]})
    table = paper_comparison(
        age_correlations(measurements, ["volume_ml"], partial_covariates=[]), load_paper_correlations()
    ).set_index("structure")
    keep = np.isfinite(left)
    expected = stats.spearmanr(age[keep], (left + right)[keep])
    kidneys = table.loc["kidneys"]
    assert kidneys["n"] == n - 1
    assert kidneys["rs"] == pytest.approx(expected.statistic, abs=1e-12)
    assert kidneys["p"] == pytest.approx(expected.pvalue, rel=1e-9)
    assert (kidneys["ci_low"], kidneys["ci_high"]) == pytest.approx(spearman_ci(expected.statistic, n - 1))
    assert kidneys["same_direction"] == (expected.statistic < 0)
    assert table.loc["aorta", "note"] == NOT_IN_STUDY
