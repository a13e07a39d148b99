# Optional: Dice and NSD of the segmentations against the sheet's reference segmentations, a batch of
# scans per job (evaluation.scans_per_job).


for batch, subjects in enumerate(EVALUATION_BATCHES):

    rule:
        name:
            f"evaluate_batch_{batch:05d}"
        input:  # functions: see batch_files
            segs=batch_files(segmentation_file, subjects),
            upstream=batch_files(segmentation_status_file, [] if PRECOMPUTED else subjects),
            references=batch_files(sheet_file("reference"), subjects),
        output:
            tables=[f"results/evaluation/scans/{s}.tsv" for s in subjects],
            statuses=[f"results/evaluation/scans/{s}.status.json" for s in subjects],
        log:
            f"results/logs/evaluate/batch_{batch:05d}.log",
        benchmark:
            f"results/benchmarks/evaluate/batch_{batch:05d}.tsv"
        conda:
            "../../envs/analysis.yaml"
        resources:  # attempt x: a retried job (--retries; profiles/slurm retries twice) gets more
            mem_mb=lambda wildcards, attempt: config["resources"]["per_scan_mem_mb"] * attempt,
            runtime=batch_runtime_min(len(subjects)),
        params:
            subjects=subjects,
            # a replaced file reruns
            sources=sources_fingerprint(subjects, ("seg", "reference") if PRECOMPUTED else ("reference",)),
            structures=MODELS[0].structures,  # the first model's, whose label maps are evaluated
            tolerance_mm=config["evaluation"]["nsd_tolerance_mm"],
            on_error=config["on_scan_error"],
        script:
            "../scripts/evaluate_batch.py"


localrules:
    evaluation_summary,


rule evaluation_summary:
    input:  # functions: see rule aggregate
        scans=lambda wildcards: expand("results/evaluation/scans/{subject}.tsv", subject=EVALUATED_SUBJECTS),
        statuses=lambda wildcards: expand("results/evaluation/scans/{subject}.status.json", subject=EVALUATED_SUBJECTS),
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
    log:
        "results/logs/evaluation_summary.log",
    conda:
        "../../envs/analysis.yaml"
    params:
        subjects=EVALUATED_SUBJECTS,
        resamples=config["evaluation"]["bootstrap_resamples"],
    script:
        "../scripts/evaluation_summary.py"
