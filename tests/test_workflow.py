"""Real snakemake runs of the whole workflow on tiny cohorts."""

import base64
import io
import math
import platform
import re
import subprocess
import sys

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import REPO, run_workflow
from scipy import stats
from test_figures import svg_text

from ctcohort import phantom
from ctcohort.aggregate import read_cohort_qc
from ctcohort.tables import read_statistics

pytestmark = pytest.mark.slow

# A user's cohort measured from the sheet's seg column (the demo segments with the bundled model).
PRECOMPUTED = {"method": "precomputed"}


@pytest.fixture(scope="module")
def demo_study(tmp_path_factory):
    """The demo study at 40 scans, segmented by the bundled nnU-Net model, run once for the tests below,
    with its report."""
    workdir = tmp_path_factory.mktemp("demo")
    # a thread per segmentation job: its two batches run side by side on two cores, sooner than one after the
    # other with two threads each (a setting of speed, not of what the study computes)
    config = {"demo": {"n_subjects": 40, "seed": 1}, "segmentation": {"threads": 1}}
    run_workflow(workdir, config, "--report", "results/report.html", "--report-after-run")
    # a second run with nothing changed has nothing to do
    again = run_workflow(workdir, config, "--dry-run")
    assert "Nothing to be done" in again.stdout + again.stderr, again.stdout[-3000:]
    return workdir / "results"


def embedded_files(report_path) -> dict[str, str]:
    """File name -> decoded text of every file a snakemake report embeds (as base64 data URIs)."""
    html = report_path.read_text(errors="replace")
    return {
        name: base64.b64decode(data).decode("utf-8", errors="replace")
        for name, data in re.findall(r"filename=([^;\"]+);base64,([A-Za-z0-9+/=]+)", html)
    }


def test_demo_tables(demo_study):
    measurements = pd.read_csv(demo_study / "tables" / "measurements.tsv", sep="\t")
    assert measurements["subject"].nunique() == 40
    combined = yaml.safe_load((REPO / "config" / "config.yaml").read_text())["statistics"]["combined"]
    assert len(measurements) == 40 * (104 + len(combined))
    assert set(measurements.loc[measurements["label"].isna(), "structure"]) == set(combined)
    assert list(measurements.columns[:6]) == ["subject", "age", "sex", "contrast", "kvp", "structure"]
    parquet = pd.read_parquet(demo_study / "tables" / "measurements.parquet")
    assert len(parquet) == len(measurements)
    np.testing.assert_allclose(parquet["volume_ml"], measurements["volume_ml"], equal_nan=True)
    # cut-off structures: NaN volume with a reason, never 0
    cut = measurements["exclusion_reason"] == "cut_off"
    assert cut.any() and measurements.loc[cut, "volume_ml"].isna().all()
    assert not (measurements["volume_ml"] == 0).any()
    assert pd.read_csv(demo_study / "tables" / "failures.tsv", sep="\t").empty
    qc = pd.read_csv(demo_study / "tables" / "qc_summary.tsv", sep="\t").set_index("structure")
    assert qc.at["clavicula_left", "cut_off"] == cut[measurements["structure"] == "clavicula_left"].sum()


def test_demo_contrast_phase_is_not_available_and_says_why(demo_study):
    """The bundled model gives total_v1 names: no phase estimate from partial inputs."""
    phases = pd.read_csv(demo_study / "tables" / "contrast_phase.tsv", sep="\t")
    assert len(phases) == 40 and (phases["phase"] == "not_available").all()
    assert phases["note"].str.contains("lacks heart, pulmonary_vein").all()


def test_demo_left_and_right_lie_where_ras_puts_them(demo_study):
    """The phantom is drawn in RAS+ (the subject's right at x > 0) and the bundled model segments it so: no pair is
    flagged on the wrong side of its twin, and the cohort does not look mirrored."""
    qc = read_cohort_qc(demo_study / "tables" / "qc.tsv")
    assert not qc["laterality"].any(), qc.loc[qc["laterality"], ["subject", "structure"]]
    right = qc.loc[qc["structure"].isin(["kidney_right", "liver"]), "centroid_x_mm"].dropna()
    assert len(right) == 80 and (right > 0).all()
    assert "look mirrored" not in (demo_study / "logs" / "aggregate.log").read_text()


def test_demo_correlations_equal_scipy_on_the_measurement_table(demo_study):
    measurements = pd.read_csv(demo_study / "tables" / "measurements.tsv", sep="\t")
    correlations = pd.read_csv(
        demo_study / "stats" / "age_correlations.tsv", sep="\t", keep_default_na=False, na_values=["NaN"]
    )
    min_n = yaml.safe_load((REPO / "config" / "config.yaml").read_text())["statistics"]["min_n"]
    checked = 0
    for row in correlations.itertuples():
        block = measurements[measurements["structure"] == row.structure]
        valid = block[["age", row.measure]].dropna()
        assert row.n == len(valid)
        if row.n < min_n:
            assert row.note == "too_few_scans" and np.isnan(row.rs) and np.isnan(row.p)
            continue
        if valid["age"].nunique() == 1 or valid[row.measure].nunique() == 1:
            assert row.note == "constant" and np.isnan(row.rs) and np.isnan(row.p)
            continue
        result = stats.spearmanr(valid["age"], valid[row.measure])
        assert row.note == ""
        assert row.rs == pytest.approx(result.statistic, abs=1e-5)
        # scipy's t approximation, floored at the exact P of a perfect order (2/n!), which it gives as 0
        assert row.p == pytest.approx(max(result.pvalue, 2 / math.factorial(row.n)), rel=1e-4, abs=1e-300)
        checked += 1
    assert checked >= 90


def test_demo_recovers_planted_effects_and_keeps_nulls_null(demo_study):
    truth = pd.read_csv(demo_study / "demo" / "truth.tsv", sep="\t")
    correlations = pd.read_csv(demo_study / "stats" / "age_correlations.tsv", sep="\t")
    merged = truth.merge(correlations, on=["structure", "measure"], validate="one_to_one")
    planted = merged[merged["direction"] != 0]
    assert len(planted) >= 20
    assert planted["significant"].all(), planted.loc[~planted["significant"], ["structure", "measure", "p_bonferroni"]]
    assert (np.sign(planted["rs"]) == planted["direction"]).all()
    nulls = truth.groupby("structure")["trajectory"].apply(lambda t: (t == "none").all())
    null_rows = correlations[correlations["structure"].isin(nulls[nulls].index)]
    assert len(null_rows) >= 15
    assert not null_rows["significant"].any(), null_rows[null_rows["significant"]]


def test_demo_acquisition_check_flags_the_kvp_confounded_null_and_no_planted_effect(demo_study):
    """The phantom's kVp is lower in the young and raises muscle HU: acquisition.tsv finds kvp associated with age,
    and the sensitivity table flags the iliopsoas HU (no age effect; significant through kVp alone) and no
    structure with a planted age effect."""
    truth = pd.read_csv(demo_study / "demo" / "truth.tsv", sep="\t").set_index(["structure", "measure"])
    association = read_statistics(demo_study / "stats" / "acquisition.tsv").set_index("variable")
    assert association.at["kvp", "p"] < 0.05 and association.at["kvp", "statistic"] > 0
    sensitivity = read_statistics(demo_study / "stats" / "sensitivity_acquisition.tsv")
    sensitivity = sensitivity.set_index(["structure", "measure"])
    assert sensitivity.loc[[("iliopsoas_left", "hu_mean"), ("iliopsoas_right", "hu_mean")], "conclusion_changed"].all()
    changed = sensitivity.index[sensitivity["conclusion_changed"]].get_level_values("structure")
    assert set(changed) == {"iliopsoas_left", "iliopsoas_right", "iliopsoas"}
    planted = truth.index[truth["direction"] != 0]
    assert not sensitivity.loc[planted, "conclusion_changed"].any(), sensitivity.loc[planted].query(
        "conclusion_changed"
    )
    assert (demo_study / "figures" / "acquisition_mix.png").exists()


def test_demo_spline_test_finds_the_planted_curve_and_not_the_planted_lines(demo_study):
    """The phantom's spleen attenuation peaks at 55 and falls on both sides: Spearman's rs and the linear
    term miss it, the spline test finds it (Bonferroni over the fitted rows), with the peak inside the
    age range near 55; no planted linear effect looks curved to it."""
    truth = pd.read_csv(demo_study / "demo" / "truth.tsv", sep="\t")
    regression = pd.read_csv(demo_study / "stats" / "regression.tsv", sep="\t").set_index(["structure", "measure"])
    correlations = pd.read_csv(demo_study / "stats" / "age_correlations.tsv", sep="\t").set_index(
        ["structure", "measure"]
    )
    fitted = int(regression["p_nonlinear"].notna().sum())
    curved = truth[truth["trajectory"] == "peak"].set_index(["structure", "measure"])
    assert list(curved.index) == [("spleen", "hu_mean")]
    for key, planted in curved.iterrows():
        row = regression.loc[key]
        assert row["p_nonlinear"] * fitted < 0.05, row
        assert abs(row["peak_age"] - planted["extremum_age"]) < 15 and np.isnan(row["trough_age"])
        assert not correlations.at[key, "significant"] and not row["p_bonferroni"] < 0.05
    lines = truth[truth["trajectory"] == "linear"].set_index(["structure", "measure"])
    assert len(lines) >= 20
    assert (regression.loc[lines.index, "p_nonlinear"] * fitted >= 0.05).all(), regression.loc[
        lines.index, "p_nonlinear"
    ]


def test_demo_paper_comparison_has_the_papers_rows_in_its_directions(demo_study):
    """The phantom's planted effects follow the paper: each of its 12 rows, combined ones included, has
    an rs of the paper's sign, and the report shows the table."""
    paper = pd.read_csv(REPO / "resources" / "paper" / "aging_correlations.tsv", sep="\t", comment="#")
    table = pd.read_csv(
        demo_study / "stats" / "paper_comparison.tsv", sep="\t", keep_default_na=False, na_values=["NaN"]
    )
    assert list(zip(table["structure"], table["measure"])) == list(zip(paper["structure"], paper["measure"]))
    assert table["rs"].notna().all() and (table["note"] == "").all()
    assert (table["same_direction"].astype(str) == "True").all(), table[["structure", "rs", "rs_paper"]]
    correlations = pd.read_csv(demo_study / "stats" / "age_correlations.tsv", sep="\t").set_index(
        ["structure", "measure"]
    )
    # the primary analysis: adjusted for sex and contrast, which the demo sheet has
    assert (correlations["primary"] == "adjusted").all() and (table["primary"] == "adjusted").all()
    for row in table.itertuples():
        assert row.rs == correlations.at[(row.structure, row.measure), "rs_partial"]
        assert row.n == correlations.at[(row.structure, row.measure), "n_partial"]
    assert "paper_comparison.tsv" in embedded_files(demo_study / "report.html")


def test_demo_adjusted_by_sex_and_regression_tables_against_pingouin_and_statsmodels(demo_study):
    """The demo's partial correlations equal pingouin's, its regression coefficients a direct statsmodels
    fit, and every planted effect has the planted sign per decade; all three tables are in the report."""
    import pingouin
    import statsmodels.formula.api as smf

    measurements = pd.read_csv(demo_study / "tables" / "measurements.tsv", sep="\t")
    partial = pd.read_csv(demo_study / "stats" / "partial_correlations.tsv", sep="\t").set_index(
        ["structure", "measure"]
    )
    regression = pd.read_csv(demo_study / "stats" / "regression.tsv", sep="\t").set_index(["structure", "measure"])
    by_sex = pd.read_csv(demo_study / "stats" / "by_sex.tsv", sep="\t")
    for structure, measure in (("kidney_left", "volume_ml"), ("hip_left", "hu_mean"), ("liver", "hu_mean")):
        rows = measurements[measurements["structure"] == structure].dropna(subset=[measure, "age", "sex"])
        rows = rows.assign(sex_m=(rows["sex"] == "M").astype(float))
        reference = pingouin.partial_corr(rows, x="age", y=measure, covar=["sex_m", "contrast"], method="spearman")
        assert partial.at[(structure, measure), "rs_partial"] == pytest.approx(float(reference["r"].iloc[0]), abs=1e-6)
        fit = smf.ols(f"{measure} ~ I(age / 10) + sex_m + contrast", data=rows).fit(cov_type="HC3")
        assert regression.at[(structure, measure), "coef_per_decade"] == pytest.approx(
            fit.params["I(age / 10)"], rel=1e-5
        )  # the table holds 6 significant digits
        assert regression.at[(structure, measure), "p"] == pytest.approx(fit.pvalues["I(age / 10)"], rel=1e-4)
    truth = pd.read_csv(demo_study / "demo" / "truth.tsv", sep="\t")
    planted = truth[truth["direction"] != 0].set_index(["structure", "measure"])
    assert (np.sign(regression.loc[planted.index, "coef_per_decade"]) == planted["direction"]).all()
    assert len(by_sex) == len(partial) and by_sex["n_M"].add(by_sex["n_F"]).max() <= 40
    embedded = embedded_files(demo_study / "report.html")
    assert {"partial_correlations.tsv", "by_sex.tsv", "regression.tsv"} <= set(embedded)


def test_demo_normative_charts_put_the_median_man_near_the_50th_percentile(demo_study, tmp_path):
    """The phantom's median man (age 55, contrast, every between-subject deviation 0), rendered, measured
    and placed by `ctcohort zscore` on the demo's charts, lies near the 50th percentile of every chart, the
    combined structures made from his left and right sides; the charts' curves never cross."""
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    charts = read_statistics(demo_study / "stats" / "normative_charts.tsv")
    panels = {(p["structure"], p["measure"]) for p in config["normative"]["panels"]}
    assert set(zip(charts["structure"], charts["measure"])) == panels
    # the demo's 25 men have every chart; a chart of its 15 women may fail its held-out calibration, or take a
    # Box-Cox shape whose outer centiles leave the distribution: refused, noted
    assert (charts.loc[charts["sex"] == "M", "note"] == "").all() and set(charts["sex"]) == {"M", "F"}
    assert charts["note"].isin(["", "calibration_failed", "undefined_centiles"]).all()
    fitted = charts[charts["note"] == ""]
    curves = fitted[[f"p{p:g}" for p in config["normative"]["percentiles"]]].to_numpy()
    assert (np.diff(curves, axis=1) >= 0).all()
    n = len(phantom.ANATOMY)
    median_man = phantom.SubjectDraw(55, "M", 1, "", False, np.zeros(n), np.zeros(n), image_seed=12345)
    ct, labels, affine = phantom.render_subject(median_man)
    for name, array in (("ct", ct), ("seg", labels)):
        nib.save(nib.Nifti1Image(array, affine), tmp_path / f"{name}.nii.gz")
    cli = [sys.executable, "-m", "ctcohort"]
    subprocess.run(
        [
            *cli,
            "measure",
            "--ct",
            tmp_path / "ct.nii.gz",
            "--seg",
            tmp_path / "seg.nii.gz",
            "--structures",
            "total_v1",
            "-o",
            tmp_path / "scan.tsv",
        ],
        check=True,
        capture_output=True,
    )
    subprocess.run(
        [
            *cli,
            "zscore",
            "--charts",
            demo_study / "stats" / "normative_charts.tsv",
            "--coefficients",
            demo_study / "stats" / "normative_covariates.tsv",
            "--measurements",
            tmp_path / "scan.tsv",
            "--age",
            "55",
            "--sex",
            "M",
            "--covariate",
            "contrast=1",
            "-o",
            tmp_path / "z.tsv",
        ],
        check=True,
        capture_output=True,
    )
    placed = read_statistics(tmp_path / "z.tsv").set_index(["structure", "measure"]).loc[sorted(panels)]
    assert (placed["note"] == "").all(), placed
    assert placed["percentile"].between(30, 70).all(), placed[["value", "percentile"]]


FIGURES = [
    "age_quartile_boxplots",
    "rs_forest_plot",
    "rs_heatmap",
    "scatter_lowess",
    "normative_charts",
    "normative_calibration",
    "ct_age",
]


def test_demo_figures_are_in_the_report_with_their_captions(demo_study):
    """Every figure as PNG and SVG; each PNG embedded in the report beside its caption's first words."""
    report = (demo_study / "report.html").read_text(errors="replace")
    embedded = embedded_files(demo_study / "report.html")
    for name in FIGURES:
        assert (demo_study / "figures" / f"{name}.svg").stat().st_size > 1000, name
        assert f"{name}.png" in embedded, name
        caption = (REPO / "workflow" / "report" / f"{name}.rst").read_text().split()[:3]
        assert " ".join(caption) in report, (name, caption)
    scatter = svg_text(demo_study / "figures" / "scatter_lowess.svg")
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    for panel in config["figures"]["scatter"]:
        assert panel["structure"].replace("_", " ") in scatter


def test_demo_group_summary_and_methods(demo_study):
    """The group summary counts what age_correlations.tsv holds (counted here with pandas); the Methods
    paragraph quotes the run's numbers and is in the report."""
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    correlations = pd.read_csv(demo_study / "stats" / "age_correlations.tsv", sep="\t")
    own = correlations[~correlations["structure"].isin(list(config["statistics"]["combined"]))]
    assert (own["family"] == "structures").all()
    assert (
        correlations.loc[correlations["structure"].isin(list(config["statistics"]["combined"])), "family"] == "combined"
    ).all()
    summary = pd.read_csv(demo_study / "stats" / "group_summary.tsv", sep="\t").set_index(["group", "measure"])
    for (group, measure), rows in own.groupby(["group", "measure"]):
        tested = rows[rows["note_partial"].isna()]  # the primary analysis is the adjusted one
        row = summary.loc[(group, measure)]
        assert row["structures"] == len(rows) and row["tested"] == len(tested)
        assert row["significant_up"] == (tested["significant"] & (tested["rs_partial"] > 0)).sum()
        assert row["significant_down"] == (tested["significant"] & (tested["rs_partial"] < 0)).sum()
        assert row["median_abs_rs"] == pytest.approx(np.median(np.abs(tested["rs_partial"])), abs=1e-6)
    assert summary.loc[("bone", "hu_mean"), "significant_down"] >= 4  # hips, L4, clavicles: the paper's
    methods = (demo_study / "methods.md").read_text()
    tested = correlations["note_partial"].isna()
    significant = correlations["significant"]
    n_tested = (tested & (correlations["family"] == "structures")).sum()
    for words in (
        "The demo cohort of 40 scans",
        "Every scan was processed",
        f"Of {len(correlations):,} structure-measure pairs, {tested.sum():,} were tested",
        f"{n_tested} of the segmentation's structures",
        f"a raw P below {config['statistics']['alpha'] / n_tested:.3g} among the structures",
        "The primary analysis was the partial Spearman correlation adjusted for sex and contrast",
        "each scan was taken as a patient of its own (40 patients)",
        f"{significant.sum()} were ({(significant & (correlations['rs_partial'] > 0)).sum()} positive",
        "the bundled demo model of ctcohort",
        "fold_0 SHA-256 ",
    ):
        assert words in methods, words
    assert str(demo_study) not in methods and str(REPO) not in methods
    assert "methods.html" in embedded_files(demo_study / "report.html")


def test_demo_figures_and_report(demo_study):
    # what the figures show, read from their SVGs: every configured panel with its group sizes, and every
    # tested structure in the rs overview
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    boxplots = svg_text(demo_study / "figures" / "age_quartile_boxplots.svg")
    for panel in config["figures"]["boxplots"]:
        assert panel["structure"].replace("_", " ") in boxplots
    assert boxplots.count("(n=") == len(config["figures"]["boxplots"]) * (len(config["figures"]["age_edges"]) + 1)
    overview = svg_text(demo_study / "figures" / "rs_forest_plot.svg")
    correlations = pd.read_csv(demo_study / "stats" / "age_correlations.tsv", sep="\t")
    tested = correlations.loc[correlations["rs"].notna(), "structure"].unique()
    assert len(tested) >= 30
    for structure in tested:
        assert structure.replace("_", " ") in overview, structure
    report = (demo_study / "report.html").read_text(errors="replace")
    for needle in ("age_correlations.tsv", "failures.tsv", "software_versions.tsv", "Spearman"):
        assert needle in report
    # summaries, not the per-subject table; no folder of this machine, no kernel build string
    files = embedded_files(demo_study / "report.html")
    assert {"measurement_summary.tsv", "exclusion_counts.tsv", "qc_summary.tsv"} <= set(files)
    assert "measurements.tsv" not in files
    for text in [report, *files.values()]:
        assert str(demo_study.parent) not in text and str(REPO) not in text
        assert platform.release() not in text
    counts = pd.read_csv(io.StringIO(files["exclusion_counts.tsv"]), sep="\t").set_index(["level", "kind"])
    assert counts.at[("scans", "measured"), "count"] == 40
    versions = pd.read_csv(demo_study / "tables" / "software_versions.tsv", sep="\t").set_index("software")
    assert versions.at["snakemake", "version"][0].isdigit()


def write_small_user_cohort(workdir):
    """Six phantom scans written as a user's cohort (sheet with a seg column) under ``workdir``, two of them
    broken; the sheet's path."""
    cohort = workdir / "data"
    phantom.write_cohort(cohort, 6, seed=3)
    sheet = pd.read_csv(cohort / "cohort.tsv", sep="\t")
    sheet["bmi"] = [21.5, 30.1, 25.0, 19.8, 27.3, 33.0]
    sheet.to_csv(cohort / "cohort.tsv", sep="\t", index=False)
    (cohort / "ct" / "demo002.nii.gz").write_bytes(b"truncated download")
    labels = nib.load(cohort / "labels" / "demo004.nii.gz")
    nib.save(labels.slicer[:, :, 5:], cohort / "labels" / "demo004.nii.gz")  # not on the CT's grid
    return cohort / "cohort.tsv"


@pytest.fixture
def small_user_cohort(tmp_path):
    """The small user cohort in a study folder of its own, not yet run."""
    return tmp_path, write_small_user_cohort(tmp_path)


@pytest.fixture(scope="module")
def small_user_study(tmp_path_factory):
    """The small user cohort's whole study, run once for the tests that read it: its folder, config and run."""
    workdir = tmp_path_factory.mktemp("small_user")
    config = {"cohort": str(write_small_user_cohort(workdir)), "segmentation": PRECOMPUTED}
    return workdir, config, run_workflow(workdir, config)


def test_broken_scans_are_listed_and_the_others_finish(small_user_study):
    workdir, _, result = small_user_study
    # said on the console at the end, not only in a table
    assert (
        "ctcohort: 2 of 6 scans failed and are left out of the study (measure: 2); "
        "the causes are in results/tables/failures.tsv"
    ) in result.stderr
    failures = pd.read_csv(workdir / "results" / "tables" / "failures.tsv", sep="\t")
    assert list(failures["subject"]) == ["demo002", "demo004"]
    assert set(failures["stage"]) == {"measure"}
    assert "demo002.nii.gz" in failures.at[0, "error"] and "cannot read" in failures.at[0, "error"]
    assert "grid does not match" in failures.at[1, "error"]
    measurements = pd.read_csv(workdir / "results" / "tables" / "measurements.tsv", sep="\t")
    assert sorted(measurements["subject"].unique()) == ["demo001", "demo003", "demo005", "demo006"]
    assert measurements["bmi"].dtype.kind == "f"
    assert (workdir / "results" / "stats" / "age_correlations.tsv").exists()


def test_a_second_run_with_nothing_changed_has_nothing_to_do(small_user_study):
    workdir, config, _ = small_user_study
    again = run_workflow(workdir, config, "--dry-run")
    assert "Nothing to be done" in again.stdout + again.stderr, again.stdout[-3000:]


@pytest.mark.parametrize(
    "table, message",
    [
        ("label,name,group\n1,spleen,organ\n1,kidney_right,organ\n", "duplicate label"),
        (None, "no such file"),
    ],
)
def test_a_bad_structure_table_stops_before_any_job(small_user_cohort, table, message):
    workdir, sheet = small_user_cohort
    path = workdir / "structures.csv"
    if table is not None:
        path.write_text(table)
    result = run_workflow(
        workdir, {"cohort": str(sheet), "segmentation": PRECOMPUTED, "structures": str(path)}, check=False
    )
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "config key structures" in output and message in output
    assert not (workdir / "results").exists()


def test_on_scan_error_fail_stops_the_study(small_user_cohort):
    workdir, sheet = small_user_cohort
    result = run_workflow(
        workdir, {"cohort": str(sheet), "on_scan_error": "fail", "segmentation": PRECOMPUTED}, check=False
    )
    assert result.returncode != 0
    assert not (workdir / "results" / "tables" / "measurements.tsv").exists()
    log = (workdir / "results" / "logs" / "measure" / "batch_00000.log").read_text()
    assert "demo002" in log and "cannot read" in log


def test_bad_sheet_stops_before_any_job(tmp_path):
    data = tmp_path / "data"
    phantom.write_cohort(data, 3, seed=3)
    sheet = pd.read_csv(data / "cohort.tsv", sep="\t", dtype=str)
    sheet.loc[1, "subject"] = "demo001"
    sheet.loc[2, "age"] = "unknown"
    sheet.to_csv(data / "cohort.tsv", sep="\t", index=False)
    result = run_workflow(tmp_path, {"cohort": str(data / "cohort.tsv"), "segmentation": PRECOMPUTED}, check=False)
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "line 3 (subject 'demo001')" in output
    assert "duplicate subject" in output
    assert "line 4" in output and "'age'" in output
    assert not (tmp_path / "results").exists()


def test_a_user_cohort_needs_a_model_to_segment(tmp_path):
    data = tmp_path / "data"
    phantom.write_cohort(data, 2, seed=3)
    result = run_workflow(
        tmp_path, {"cohort": str(data / "cohort.tsv"), "segmentation": {"method": "nnunet"}}, check=False
    )
    assert result.returncode != 0
    assert "segmentation.model is empty" in result.stdout + result.stderr
    assert not (tmp_path / "results").exists()


def test_lint_is_clean():
    lint = subprocess.run(
        [sys.executable, "-m", "snakemake", "--lint"], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert lint.returncode == 0, lint.stdout + lint.stderr


def test_demo_segments_with_the_bundled_model_as_well_as_its_truth(demo_study):
    """The demo's scans are segmented by nnU-Net (results/seg) and scored against the phantom's truth."""
    assert len(list((demo_study / "seg").glob("*.nii.gz"))) == 40
    dice = pd.read_csv(demo_study / "evaluation" / "dice.tsv", sep="\t")
    assert dice["subject"].nunique() == 40
    present = dice.dropna(subset=["dice"])
    assert present["structure"].nunique() == len(phantom.ANATOMY)
    summary = pd.read_csv(demo_study / "evaluation" / "dice_summary.tsv", sep="\t").dropna(subset=["dice_mean"])
    assert set(summary["structure"]) == set(present["structure"])
    # the bundled model segments its phantoms near-perfectly (resources/models/demo/README.md), in float32 and
    # in bfloat16 (segmentation.precision: auto takes bfloat16 on CPUs that compute it natively)
    assert (summary["dice_mean"] >= 0.99).all(), summary.loc[summary["dice_mean"] < 0.99, ["structure", "dice_mean"]]
    assert (summary["dice_ci_low"] <= summary["dice_mean"]).all()
    dice_figure = svg_text(demo_study / "figures" / "dice.svg")
    for structure in summary["structure"]:
        assert structure.replace("_", " ") in dice_figure, structure
