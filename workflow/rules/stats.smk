# One scan per patient for every cross-sectional analysis (ctcohort.patients): the scans chosen, by
# statistics.scan_per_patient, from the patients' measured scans.


localrules:
    scan_selection,


rule scan_selection:
    input:
        rules.aggregate.output.measurements,
    output:
        report(
            "results/tables/scan_selection.tsv",
            caption="../report/scan_selection.rst",
            category="Quality control",
        ),
    log:
        "results/logs/scan_selection.log",
    conda:
        "../../envs/analysis.yaml"
    params:
        scan_per_patient=config["statistics"]["scan_per_patient"],
        seed=config["statistics"]["seed"],
    script:
        "../scripts/scan_selection.py"


# Spearman correlation of every structure's measures with age (one scan per patient).


localrules:
    age_correlations,


rule age_correlations:
    input:
        measurements=rules.aggregate.output.measurements,
        selection=rules.scan_selection.output[0],
    output:
        report(
            "results/stats/age_correlations.tsv",
            caption="../report/age_correlations.rst",
            category="Age correlations",
        ),
    log:
        "results/logs/age_correlations.log",
    conda:
        "../../envs/analysis.yaml"
    params:
        statistics=config["statistics"],  # StatisticsSettings
    script:
        "../scripts/statistics_table.py"


# The paper's 12 reported correlations (resources/paper/aging_correlations.tsv) beside the study's own.
from ctcohort.paper import paper_table_path

PAPER_CORRELATIONS = paper_table_path()


localrules:
    paper_comparison,


rule paper_comparison:
    input:
        correlations=rules.age_correlations.output[0],
        paper=lambda wildcards: str(PAPER_CORRELATIONS),
    output:
        report(
            "results/stats/paper_comparison.tsv",
            caption="../report/paper_comparison.rst",
            category="Age correlations",
        ),
    log:
        "results/logs/paper_comparison.log",
    conda:
        "../../envs/analysis.yaml"
    script:
        "../scripts/paper_comparison.py"


# Age and each measure adjusted for the covariates, per sex, and as a regression per decade with a
# spline test of non-linearity (ctcohort.models).


localrules:
    partial_correlations,
    by_sex,
    regression,


rule partial_correlations:
    input:
        measurements=rules.aggregate.output.measurements,
        selection=rules.scan_selection.output[0],
    output:
        report(
            "results/stats/partial_correlations.tsv",
            caption="../report/partial_correlations.rst",
            category="Age correlations",
        ),
    log:
        "results/logs/partial_correlations.log",
    conda:
        "../../envs/analysis.yaml"
    params:
        statistics=config["statistics"],  # StatisticsSettings
    script:
        "../scripts/statistics_table.py"


rule by_sex:
    input:
        measurements=rules.aggregate.output.measurements,
        selection=rules.scan_selection.output[0],
    output:
        report(
            "results/stats/by_sex.tsv",
            caption="../report/by_sex.rst",
            category="Age correlations",
        ),
    log:
        "results/logs/by_sex.log",
    conda:
        "../../envs/analysis.yaml"
    params:
        statistics=config["statistics"],  # StatisticsSettings
    script:
        "../scripts/statistics_table.py"


rule regression:
    input:
        measurements=rules.aggregate.output.measurements,
        selection=rules.scan_selection.output[0],
    output:
        report(
            "results/stats/regression.tsv",
            caption="../report/regression.rst",
            category="Age regression",
        ),
    log:
        "results/logs/regression.log",
    conda:
        "../../envs/analysis.yaml"
    params:
        statistics=config["statistics"],  # StatisticsSettings
    script:
        "../scripts/statistics_table.py"


# Per structure group and measure: how many structures were tested, and went up or down with age.


localrules:
    group_summary,
    normative_charts,


rule group_summary:
    input:
        rules.age_correlations.output[0],
    output:
        report(
            "results/stats/group_summary.tsv",
            caption="../report/group_summary.rst",
            category="Age correlations",
        ),
    log:
        "results/logs/group_summary.log",
    conda:
        "../../envs/analysis.yaml"
    params:
        combined=list(config["statistics"]["combined"]),
    script:
        "../scripts/group_summary.py"


# Age- and sex-specific percentile charts of chosen structures (ctcohort.normative); `ctcohort zscore`
# places a new scan on them.


rule normative_charts:
    input:
        measurements=rules.aggregate.output.measurements,
        selection=rules.scan_selection.output[0],
        qc=rules.aggregate.output.qc_table,  # scans the sanity checks flag are no reference
    output:
        charts=report(
            "results/stats/normative_charts.tsv",
            caption="../report/normative_charts_table.rst",
            category="Normative charts",
        ),
        coefficients="results/stats/normative_covariates.tsv",
        calibration=report(
            "results/stats/normative_calibration.tsv",
            caption="../report/normative_calibration_table.rst",
            category="Normative charts",
        ),
        scores="results/stats/centile_scores.tsv",
    log:
        "results/logs/normative_charts.log",
    conda:
        "../../envs/analysis.yaml"
    threads: config["normative"]["threads"]
    params:
        settings=config["normative"],
        combined=config["statistics"]["combined"],
    script:
        "../scripts/normative_charts.py"
