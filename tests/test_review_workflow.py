"""Quality review through the real workflow: six copies of the real example CT with its real v1 segmentation, one
with the kidneys' labels swapped and one with L1 and L3 swapped. Both are flagged in qc.tsv and ranked first on the
review page, read in headless Chromium; a decision excluding one scan, made on that page and downloaded, lowers the
analysed n by one, counts as a reviewer exclusion, and re-runs the cohort rules only."""

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from browser import browser  # noqa: F401
from conftest import precomputed_study, real_example_v1, run_workflow, study_folder

from ctcohort.aggregate import read_cohort_qc
from ctcohort.review import SANITY_FLAGS

pytestmark = pytest.mark.slow

# v1 label ids (structures/total_v1_classes.csv)
KIDNEY_RIGHT, KIDNEY_LEFT, L3, L1 = 2, 3, 20, 22
SWAPS = {"kidneys": (KIDNEY_RIGHT, KIDNEY_LEFT), "lumbar": (L1, L3)}
ORDINARY = ["plain1", "plain2", "plain3", "plain4"]
# what these tests read: the review page, the tables behind it and after it, the Methods (not the figures)
TARGETS = ["results/qc/review.html", "results/tables/exclusion_flow.tsv", "results/methods.md"]


def swapped(labels, pair):
    out = labels.copy()
    out[labels == pair[0]], out[labels == pair[1]] = pair[1], pair[0]
    return out


@pytest.fixture(scope="module")
def review_study(tmp_path_factory):
    affine, hu, labels = real_example_v1()
    workdir, data = study_folder(tmp_path_factory, "review")
    rows = []
    for i, subject in enumerate([*ORDINARY, *SWAPS]):
        seg = swapped(labels, SWAPS[subject]) if subject in SWAPS else labels
        # each copy its own bytes (one HU apart), or the duplicate check would stop the run
        nib.save(nib.Nifti1Image((hu + i).astype(np.int16), affine), data / f"{subject}.nii.gz")
        nib.save(nib.Nifti1Image(seg, affine), data / f"{subject}_seg.nii.gz")
        rows.append(
            {
                "subject": subject,
                "ct": f"{subject}.nii.gz",
                "seg": f"{subject}_seg.nii.gz",
                "age": 40 + 5 * i,
                "sex": "MF"[i % 2],
            }
        )
    config = precomputed_study(data, rows)
    run_workflow(workdir, config, *TARGETS)
    return workdir, config


def test_the_two_mixups_are_flagged_and_no_other_scan(review_study):
    workdir, _ = review_study
    qc = read_cohort_qc(workdir / "results" / "tables" / "qc.tsv")
    flagged = qc[qc[list(SANITY_FLAGS)].any(axis=1)]
    assert set(flagged["subject"]) == set(SWAPS)
    kidneys = flagged[flagged["subject"] == "kidneys"]
    assert set(kidneys.loc[kidneys["laterality"], "structure"]) == {"kidney_left", "kidney_right"}
    lumbar = flagged[flagged["subject"] == "lumbar"]
    assert {"vertebrae_L1", "vertebrae_L3"} <= set(lumbar.loc[lumbar["vertebra_order"], "structure"])
    assert not lumbar["laterality"].any() and not kidneys["vertebra_order"].any()


def test_review_page_ranks_them_first_and_its_decision_excludes_one_scan(review_study, browser):  # noqa: F811
    from selenium.webdriver.common.by import By

    workdir, config = review_study
    results = workdir / "results"
    browser.open(results / "qc" / "review.html")
    order = browser.driver.execute_script(
        "return Array.from(document.querySelectorAll('[data-subject]'), e => e.dataset.subject)"
    )
    assert sorted(order) == sorted([*ORDINARY, *SWAPS])
    assert set(order[:2]) == set(SWAPS)

    # the reviewer excludes an ordinary scan on the page and downloads the decisions
    browser.driver.find_element(By.CSS_SELECTOR, '[data-subject="plain2"] .scan-decision .exclude').click()
    browser.driver.find_element(By.ID, "download").click()
    decisions = browser.wait_for_download("review_decisions.tsv")

    def analysed():
        flow = pd.read_csv(results / "tables" / "exclusion_flow.tsv", sep="\t")
        return flow.set_index(["structure", "measure"]).loc[("liver", "hu_mean"), "analysed"]

    before = analysed()
    assert before == len(ORDINARY) + len(SWAPS)
    per_scan = {path: path.stat().st_mtime_ns for path in (results / "measure").glob("*.tsv")}
    run_workflow(workdir, {**config, "qc": {"review_decisions": str(decisions)}}, *TARGETS)
    assert analysed() == before - 1
    counts = pd.read_csv(results / "tables" / "exclusion_counts.tsv", sep="\t").set_index(["level", "kind"])
    assert counts.loc[("scans", "measured, reviewer_excluded"), "count"] == 1
    measurements = pd.read_csv(results / "tables" / "measurements.tsv", sep="\t")
    plain2 = measurements[(measurements["subject"] == "plain2") & measurements["label"].notna()]
    assert (plain2["exclusion_reason"] == "reviewer_excluded").all() and plain2["volume_ml"].isna().all()
    correlations = pd.read_csv(results / "stats" / "age_correlations.tsv", sep="\t").set_index(["structure", "measure"])
    assert correlations.loc[("liver", "hu_mean"), "n"] == before - 1
    assert "a reviewer excluded 1 scan as a whole" in (results / "methods.md").read_text()
    qc = read_cohort_qc(results / "tables" / "qc.tsv")
    assert (qc.loc[qc["subject"] == "plain2", "review"] == "exclude").all()
    # no scan was measured again: a decision re-runs the cohort rules only
    assert {path: path.stat().st_mtime_ns for path in per_scan} == per_scan


def test_a_decision_about_a_scan_not_in_the_sheet_stops_the_run_before_any_job(review_study, tmp_path):
    workdir, config = review_study
    decisions = tmp_path / "decisions.tsv"
    decisions.write_text("subject\tstructure\tdecision\treason\nplain9\t\texclude\tmotion\n")
    result = run_workflow(workdir, {**config, "qc": {"review_decisions": str(decisions)}}, "--dry-run", check=False)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "config key qc.review_decisions" in output and "subject 'plain9' is not a scan of the cohort" in output
