"""The Methods paragraph says what the run's tables count and what the configuration set, and nothing else."""

import re
import subprocess
from pathlib import Path

import pandas as pd
import pytest
import yaml

from ctcohort.methods import RunTables, methods_paragraphs, model_description, write_methods

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def settings():
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    config["segmentation"].pop("model")
    return {**config, "demo": False, "bundled_model": False}


COUNTS = pd.DataFrame(
    [
        ("scans", "in the sheet", 120),
        ("scans", "measured", 117),
        ("scans", "failed: segment", 2),
        ("scans", "failed: import_ct", 1),
        ("scans", "measured, no age", 4),
        ("scans", "measured, no sex", 0),
        ("structures", "measured", 3500),
        ("structures", "absent", 40),
        ("structures", "too_small", 0),
        ("structures", "cut_off", 61),
        ("structures", "implausible_volume", 3),
    ],
    columns=["level", "kind", "count"],
)
VERSIONS = pd.DataFrame(
    [
        ("python", "3.11.9"),
        ("snakemake", "9.1.0"),
        ("scipy", "1.14.1"),
        ("nnunetv2", "2.6.2"),
        ("pydicom", "not installed"),
    ],
    columns=["software", "version"],
)


def correlations(primary: str = "adjusted"):
    # 6 rows: 4 tested, 2 significant positive, 1 significant negative, 1 row too small to test; the adjusted
    # analysis (primary) repeats the unadjusted numbers, adjusted for sex and contrast
    table = pd.DataFrame(
        {
            "structure": ["a", "b", "c", "d", "e", "f"],
            "family": "structures",
            "measure": ["volume_ml"] * 6,
            "n": 50,
            "rs": [0.5, 0.6, -0.4, 0.1, float("nan"), float("nan")],
            "significant": [True, True, True, False, False, False],
            "note": ["", "", "", "", "too_few_scans", "constant"],
        }
    )
    for column in ("n", "rs", "note"):
        table[f"{column}_partial"] = table[column]
    return table.assign(covariates="sex,contrast", primary=primary)


def run_tables(counts=COUNTS, correlation_table=None, **optional) -> RunTables:
    table = correlations() if correlation_table is None else correlation_table
    return RunTables(counts, table, VERSIONS, **optional)


def test_methods_quote_the_runs_counts_and_the_settings(settings):
    text = " ".join(methods_paragraphs(settings, run_tables(), model="the nnU-Net model X"))
    assert "The cohort comprised 120 scans." in text
    assert "3 scans could not be processed (2 in segmentation and 1 in DICOM import)" in text
    assert "117 scans were measured, of which 113 scans with a recorded age" in text
    assert "Of 3,604 structure measurements, 40 absent, 61 cut off" in text and "3 with a volume outside" in text
    assert "Of 6 structure-measure pairs, 4 were tested in the primary analysis: 4, one correction family" in text
    assert "corrected within each family (Bonferroni)" in text
    assert f"a raw P below {settings['statistics']['alpha'] / 4:.3g} among the structures" in text
    assert "3 were (2 positive, 1 negative)" in text
    assert f"below {settings['statistics']['alpha']:g}" in text
    assert "adjusted for sex and contrast" in text
    assert f"({settings['statistics']['spline_df']} degrees of freedom, knots" in text
    assert "location-scale-shape models adjusted for contrast" in text and "5-fold cross-validation" in text
    assert "a normal, Box-Cox Cole-Green (LMS), sinh-arcsinh (Jones and Pewsey) or Box-Cox t distribution whose" in text
    normal_only = {**settings, "normative": {**settings["normative"], "families": ["normal"]}}
    assert "models adjusted for contrast: a normal distribution whose" in " ".join(
        methods_paragraphs(normal_only, run_tables())
    )
    calibration = pd.DataFrame({"n": [120, 80, 10], "note": ["", "", "too_few_scans"]})
    text = " ".join(methods_paragraphs(settings, run_tables(calibration=calibration)))
    assert "2 of 3 charts were drawn, from 80 to 120 patients each." in text
    quantile = {**settings, "normative": {**settings["normative"], "method": "quantile"}}
    text = " ".join(methods_paragraphs(quantile, run_tables(), model="the nnU-Net model X"))
    assert f"quantile regression on a natural cubic spline in age ({settings['normative']['spline_df']} degrees" in text
    assert "nnunetv2 2.6.2" in text and "snakemake 9.1.0" in text and "Python 3.11.9" in text
    assert "pydicom" not in text  # not installed: not cited
    assert "the nnU-Net model X" in text
    assert "(the 5th, 25th, 50th, 75th and 95th) by sex" in text


def test_methods_say_the_random_site_intercept(settings):
    settings["normative"]["site"] = "scanner"
    calibration = pd.DataFrame({"n": [120, 80, 10], "note": ["", "", "too_few_scans"], "sites": [6, 5, float("nan")]})
    text = " ".join(methods_paragraphs(settings, run_tables(calibration=calibration)))
    assert "Gaussian random intercept for scanner" in text and "restricted likelihood" in text
    assert "The charts had 5 and 6 scanner levels." in text
    settings["normative"]["site"] = None
    assert "random intercept" not in " ".join(methods_paragraphs(settings, run_tables()))


def test_methods_follow_the_configuration(settings):
    settings["statistics"].update(correction="fdr_bh", alpha=0.05, partial_covariates=[])
    settings["segmentation"]["method"] = "precomputed"
    settings["normative"]["panels"] = []
    text = " ".join(methods_paragraphs(settings, run_tables()))
    assert "Benjamini-Hochberg" in text and "below 0.05" in text
    assert "Partial Spearman" not in text and "quantile regression" not in text
    assert "Segmentations were supplied with the cohort" in text and "nnU-Net" not in text


def test_methods_name_several_segmentation_models(settings):
    settings = {**settings, "models": ["total", "body"], "structures": "total: total_v2; body: body.csv"}
    text = " ".join(methods_paragraphs(settings, run_tables()))
    assert "Each scan was segmented by each of 2 models (total and body)" in text
    assert "named model:structure" in text and "structure table total: total_v2; body: body.csv" in text
    assert "Each scan was segmented by each" not in " ".join(
        methods_paragraphs({**settings, "models": []}, run_tables())
    )


def test_model_description_names_folders_and_checksums_not_paths(tmp_path):
    checkpoint = tmp_path / "site" / "Dataset291_Organs" / "nnUNetTrainer__nnUNetPlans__3d_fullres" / "fold_0"
    checkpoint.mkdir(parents=True)
    (checkpoint / "checkpoint_final.pth").write_bytes(b"weights" * 1000)
    files = [checkpoint / "checkpoint_final.pth", checkpoint.parent / "plans.json"]
    digest = subprocess.run(["sha256sum", str(files[0])], capture_output=True, text=True, check=True).stdout[:12]
    words = model_description(False, files)
    assert words == f"the nnU-Net model Dataset291_Organs (Dataset291_Organs fold_0 SHA-256 {digest})"
    assert "bundled demo model" in model_description(True, files) and str(tmp_path) not in words


def test_methods_files(tmp_path, settings):
    paragraphs = methods_paragraphs(settings, run_tables())
    write_methods(paragraphs, tmp_path / "methods.md", tmp_path / "methods.html")
    markdown = (tmp_path / "methods.md").read_text()
    assert markdown.startswith("# Methods\n\n") and markdown.count("\n\n") == len(paragraphs)
    page = (tmp_path / "methods.html").read_text()
    assert len(re.findall("<p>", page)) == len(paragraphs)


def selection(patients: list[str], ages: list[float], chosen: list[bool]) -> pd.DataFrame:
    return pd.DataFrame(
        {"subject": [f"s{i}" for i in range(len(patients))], "patient": patients, "age": ages, "chosen": chosen}
    )


def test_methods_count_patients_and_say_which_scan(settings):
    settings["patient_column"] = True
    picked = selection(
        ["p1", "p1", "p1", "p2", "p3"], [60, 61, float("nan"), 40, float("nan")], [True, False, False, True, True]
    )
    counts = COUNTS.copy()
    counts.loc[counts["kind"] == "in the sheet", "count"] = 5
    counts.loc[counts["kind"] == "measured", "count"] = 5
    counts = counts[~counts["kind"].str.startswith("failed")]
    text = " ".join(methods_paragraphs(settings, run_tables(counts, selection=picked)))
    assert "The 5 scans came from 3 patients, 1 of them with repeated scans" in text
    assert "one scan per patient, the earliest of the patient's measured scans with an age" in text
    assert "2 patients entered the age analyses" in text  # p3's only scan has no age
    assert "fewer than 10 patients were not tested" in text
    settings["statistics"]["scan_per_patient"] = "random"
    text = " ".join(methods_paragraphs(settings, run_tables(counts, selection=picked)))
    assert "one chosen at random (seeded)" in text


def test_methods_say_when_the_sheet_names_no_patients_and_when_rows_were_dropped(settings):
    settings["patient_column"] = False
    picked = selection(["s0", "s1"], [50, 60], [True, True])
    counts = pd.concat([COUNTS, pd.DataFrame([("scans", "dropped: duplicate", 2)], columns=COUNTS.columns)])
    counts.loc[counts["kind"] == "measured", "count"] = 115
    text = " ".join(methods_paragraphs(settings, run_tables(counts, selection=picked)))
    assert "named no patients, so each scan was taken as a patient of its own (2 patients)" in text
    assert "2 rows of the sheet repeated another scan (the same file or identical content) and were dropped" in text
    assert "3 scans could not be processed (2 in segmentation and 1 in DICOM import)" in text
    assert "exact (every pairing) up to 9 patients" in text


def study_tables(measurements, config):
    """The tables Methods reads, made by the workflow's own functions from ``measurements``."""
    from ctcohort.models import regression_table
    from ctcohort.stats import age_correlations

    stats_cfg = config["statistics"]
    correlations = age_correlations(
        measurements, ["volume_ml"], partial_covariates=stats_cfg["partial_covariates"], min_n=10
    )
    return correlations, regression_table(measurements, ["volume_ml"], stats_cfg["partial_covariates"])


@pytest.mark.parametrize(
    "drop, covariates, primary, regression",
    [
        (
            [],
            ["sex", "contrast"],
            "the partial Spearman correlation adjusted for sex and contrast (ranks",
            "with sex and contrast as covariates",
        ),
        (
            ["contrast"],
            ["sex", "contrast"],
            "the partial Spearman correlation adjusted for sex (contrast configured but not available)",
            "with sex as covariates",
        ),
        (
            ["contrast", "sex"],
            ["sex", "contrast"],
            "the unadjusted correlation (sex and contrast configured but not available); no covariate was adjusted for",
            "without covariates",
        ),
        ([], [], "the unadjusted correlation; no covariate was adjusted for", "without covariates"),
    ],
)
def test_methods_say_what_the_tables_used_not_what_was_configured(settings, drop, covariates, primary, regression):
    import numpy as np

    rng = np.random.default_rng(0)
    n = 60
    measurements = pd.DataFrame(
        {
            "subject": [f"s{i}" for i in range(n)],
            "age": rng.uniform(20, 80, n),
            "sex": rng.choice(["M", "F"], n),
            "contrast": rng.integers(0, 2, n),
            "structure": "liver",
            "group": "organ",
            "label": 5,
            "volume_ml": rng.normal(1500, 100, n),
        }
    ).drop(columns=drop)
    settings["statistics"]["partial_covariates"] = covariates
    table, fits = study_tables(measurements, settings)
    text = " ".join(methods_paragraphs(settings, run_tables(correlation_table=table, regression=fits)))
    assert f"The primary analysis was {primary}" in text
    assert f"ordinary least squares {regression} and HC3" in text
    # the by-sex, regression and spline sentences are there whatever the covariates
    assert "separately in men and women" in text and "F test of a natural cubic spline" in text


def test_methods_count_the_scans_with_an_estimated_contrast_phase(settings):
    phases = pd.DataFrame({"phase": ["native", "portal_venous", "native", "not_available"], "note": ""})
    versions = pd.concat([VERSIONS, pd.DataFrame({"software": ["totalsegmentator"], "version": ["2.18.0"]})])
    text = " ".join(methods_paragraphs(settings, RunTables(COUNTS, correlations(), versions, phases=phases)))
    assert "(totalsegmentator 2.18.0) for 3 of 4 scans: native 2, portal venous 1." in text
    assert "contrast phase" not in " ".join(methods_paragraphs(settings, run_tables()))
    lacking = phases.assign(phase="not_available", note="structure table lacks heart")
    text = " ".join(methods_paragraphs(settings, RunTables(COUNTS, correlations(), versions, phases=lacking)))
    assert (
        "could be estimated" in text and "(totalsegmentator 2.18.0) for no scan (structure table lacks heart)." in text
    )
