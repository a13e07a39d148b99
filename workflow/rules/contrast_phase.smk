# Per scan: the contrast phase (seconds since injection, native / arterial / portal venous) estimated by
# TotalSegmentator's classifier from the scan's raw measurement (ctcohort.contrast_phase); rows say
# not_available, and why, where the structure table or the classifier's packages are missing.


localrules:
    contrast_phase,


rule contrast_phase:
    input:  # functions: see rule aggregate
        measurements=lambda wildcards: per_scan("results/measure/{subject}.tsv"),
    output:  # per subject: not embedded in the report, as measurements.tsv is not
        "results/tables/contrast_phase.tsv",
    log:
        "results/logs/contrast_phase.log",
    conda:
        "../../envs/analysis.yaml"
    script:
        "../scripts/contrast_phase.py"
