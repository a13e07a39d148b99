# Per scan: volume and attenuation of every structure, in one pass over CT and label map, and its quality
# control (results/qc/: faces that cut structures off, vertebral coverage, preview).
# Scans segmented by the workflow are measured in their segmentation job (segment.smk); these rules
# measure precomputed segmentations, a batch of scans per job (measure.scans_per_job).

for batch, subjects in enumerate(MEASURE_BATCHES):

    rule:
        name:
            f"measure_batch_{batch:05d}"
        input:  # functions: see batch_files
            cts=batch_files(ct_file, subjects),
            segs=batch_files(segmentation_file, subjects),
            upstream=import_statuses(subjects),
        output:
            **qc_outputs(subjects),
            tables=[f"results/measure/{s}.tsv" for s in subjects],
            statuses=[f"results/measure/{s}.status.json" for s in subjects],
        log:
            f"results/logs/measure/batch_{batch:05d}.log",
        benchmark:
            f"results/benchmarks/measure/batch_{batch:05d}.tsv"
        conda:
            "../../envs/analysis.yaml"
        resources:  # attempt x: a retried job (--retries; profiles/slurm retries twice) gets more
            mem_mb=lambda wildcards, attempt: config["resources"]["per_scan_mem_mb"] * attempt,
            runtime=batch_runtime_min(len(subjects)),
        params:
            subjects=subjects,
            sources=sources_fingerprint(subjects, ("ct", "seg")),  # a file replaced by another reruns
            upstream=[import_status_file(s) for s in subjects],  # a failed DICOM import is passed on
            structures=config["structures"],
            qc=QC.per_scan(),  # a cohort-wide QC threshold re-runs no scan
            ct_checks=config["measure"]["ct_checks"],
            on_error=config["on_scan_error"],
        script:
            "../scripts/measure_batch.py"
