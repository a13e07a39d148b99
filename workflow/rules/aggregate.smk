# Cohort tables: measurements joined with covariates, per-scan failures, exclusion counts.


localrules:
    aggregate,


rule aggregate:
    input:
        sheet=SHEET_PATH,
        measurements=per_scan("results/measure/{subject}.tsv"),
        statuses=per_scan("results/measure/{subject}.status.json"),
    output:
        measurements=report(
            "results/tables/measurements.tsv",
            caption="../report/measurements.rst",
            category="Tables",
        ),
        parquet="results/tables/measurements.parquet",
        failures=report(
            "results/tables/failures.tsv",
            caption="../report/failures.rst",
            category="Quality control",
        ),
        qc=report(
            "results/tables/qc_summary.tsv",
            caption="../report/qc_summary.rst",
            category="Quality control",
        ),
    params:
        subjects=SUBJECTS,
        schema=SHEET_SCHEMA,
    log:
        "results/logs/aggregate.log",
    conda:
        "../../envs/analysis.yaml"
    script:
        "../scripts/aggregate.py"
