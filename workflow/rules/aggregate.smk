# Cohort tables: measurements joined with covariates, plausibility exclusions applied (qc.py), per-scan
# failures, exclusion counts and the flow from scans in to scans analysed; the cohort's QC table. The
# measurement table and its summary also hold the combined structures (statistics.combined). Each scan's contrast
# phase is estimated here, from the per-scan tables read once, and the contrast covariate resolved from it and the
# sheet (statistics.contrast) before the join, so that every analysis adjusts for the same values.
# The full measurement table is linked from the report, not embedded: at thousands of scans it is
# half a million rows, and a report is shared more widely than the data.


localrules:
    aggregate,


rule aggregate:
    # Input functions, not lists: the report prints a rule's declared inputs, which would be every
    # scan's path (20,000 at 10,000 scans) and folders of this machine.
    input:
        sheet=lambda wildcards: SHEET_PATH,
        schema=lambda wildcards: SHEET_SCHEMA,
        measurements=lambda wildcards: per_scan("results/measure/{subject}.tsv"),
        statuses=lambda wildcards: per_scan("results/measure/{subject}.status.json"),
        qc=lambda wildcards: per_scan("results/qc/{subject}.tsv"),
        plausible_volumes=lambda wildcards: PLAUSIBLE_VOLUMES,  # [] where the check is off
        review_decisions=lambda wildcards: REVIEW_DECISIONS,  # [] where none; a new file re-runs the cohort rules
        duplicates=lambda wildcards: DUPLICATES_INPUT,  # rows dropped as the same scan; [] unless drop_later
        imported=lambda wildcards: expand("results/ct/{subject}.nii.gz", subject=DICOM_SUBJECTS),  # same image?
    output:
        measurements="results/tables/measurements.tsv",
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
        exclusions=report(
            "results/tables/exclusion_counts.tsv",
            caption="../report/exclusion_counts.rst",
            category="Quality control",
        ),
        flow=report(
            "results/tables/exclusion_flow.tsv",
            caption="../report/exclusion_flow.rst",
            category="Quality control",
        ),
        qc_table="results/tables/qc.tsv",
        # per scan: the contrast phase (seconds since injection, native / arterial / portal venous) that
        # TotalSegmentator's classifier estimates from the scan's measurement (ctcohort.contrast_phase); rows say
        # not_available, and why, where the structure table or the classifier's packages are missing. Per subject:
        # not embedded in the report, as measurements.tsv is not.
        phases="results/tables/contrast_phase.tsv",
        summary=report(
            "results/tables/measurement_summary.tsv",
            caption="../report/measurement_summary.rst",
            category="Tables",
        ),
    log:
        "results/logs/aggregate.log",
    conda:
        "../../envs/analysis.yaml"
    params:
        qc=asdict(QC),
        measures=config["statistics"]["measures"],
        combined=config["statistics"]["combined"],
        duplicates=config["duplicates"],
        contrast=config["statistics"]["contrast"],
    script:
        "../scripts/aggregate.py"
