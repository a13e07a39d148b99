# Optional: Dice and NSD of the segmentations against the sheet's reference segmentations.


rule evaluate_scan:
    input:
        seg=segmentation_path,
        upstream=upstream_statuses,
        reference=reference_path,
    output:
        tsv="results/evaluation/scans/{subject}.tsv",
        status="results/evaluation/scans/{subject}.status.json",
    params:
        structures=config["structures"],
        tolerance_mm=config["evaluation"]["nsd_tolerance_mm"],
        on_error=config["on_scan_error"],
    resources:
        mem_mb=4000,
        runtime=20,
    log:
        "results/logs/evaluate/{subject}.log",
    benchmark:
        "results/benchmarks/evaluate/{subject}.tsv"
    conda:
        "../../envs/analysis.yaml"
    script:
        "../scripts/evaluate_scan.py"


localrules:
    evaluation_summary,


rule evaluation_summary:
    input:  # functions: see rule aggregate
        scans=lambda wildcards: expand("results/evaluation/scans/{subject}.tsv", subject=EVALUATED_SUBJECTS),
        statuses=lambda wildcards: expand(
            "results/evaluation/scans/{subject}.status.json", subject=EVALUATED_SUBJECTS
        ),
    output:
        dice=report(
            "results/evaluation/dice.tsv",
            caption="../report/dice.rst",
            category="Segmentation quality",
        ),
        summary=report(
            "results/evaluation/dice_summary.tsv",
            caption="../report/dice_summary.rst",
            category="Segmentation quality",
        ),
        failures="results/evaluation/failures.tsv",
        png=report(
            "results/figures/dice.png",
            caption="../report/dice_summary.rst",
            category="Segmentation quality",
        ),
        svg="results/figures/dice.svg",
    params:
        subjects=EVALUATED_SUBJECTS,
        resamples=config["evaluation"]["bootstrap_resamples"],
    log:
        "results/logs/evaluation_summary.log",
    conda:
        "../../envs/analysis.yaml"
    script:
        "../scripts/evaluation_summary.py"
