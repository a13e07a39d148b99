# Segmentation with nnU-Net v2: one job per batch of scans, the model loaded once per job. The job also
# measures each scan while its CT and label map are in memory (the measure stage; rule measure serves
# precomputed segmentations). Batches are consecutive sheet rows, so appending rows only touches the
# last batch.

for batch, subjects in enumerate(SEGMENTATION_BATCHES):

    rule:
        name:
            f"segment_batch_{batch:05d}"
        input:
            cts=batch_files(ct_file, subjects),
            upstream=import_statuses(subjects),
            model=lambda wildcards: SEGMENTATION_MODEL_FILES,  # new weights segment again
        output:
            **qc_outputs(subjects),
            # per scan, the label map of each model
            segs=[label_map_path(s, model) for s in subjects for model in MODELS],
            statuses=[f"results/seg/{s}.status.json" for s in subjects],
            measurements=[f"results/measure/{s}.tsv" for s in subjects],
            measure_statuses=[f"results/measure/{s}.status.json" for s in subjects],
        log:
            f"results/logs/segment/batch_{batch:05d}.log",
        benchmark:
            f"results/benchmarks/segment/batch_{batch:05d}.tsv"
        conda:
            "../../envs/segmentation.yaml"
        threads: SEGMENTATION.threads
        resources:
            **(
                {"slurm_partition": config["segmentation"]["slurm_partition"]}
                if config["segmentation"]["slurm_partition"]
                else {}
            ),
            # a retried job (--retries; profiles/slurm retries twice) asks for attempt x the memory and time
            mem_mb=lambda wildcards, attempt: config["segmentation"]["mem_mb"] * attempt,
            runtime=segmentation_runtime_min(len(subjects)),
            gpu=int(SEGMENTATION.device == "cuda"),
            # on SLURM: these rules are generated, a profile cannot name them; empty: the profile's partition
        params:
            subjects=subjects,
            sources=sources_fingerprint(subjects, ("ct",)),  # a file replaced by another reruns
            upstream=[import_status_file(s) for s in subjects],  # a failed DICOM import is passed on
            model=config["segmentation"]["model"],
            task=config["segmentation"]["task"],
            structures=config["structures"],
            segmentation=SEGMENTATION.per_job(),  # threads follow the job's cores
            on_error=config["on_scan_error"],
            ct_checks=config["measure"]["ct_checks"],
            qc=QC.per_scan(),  # a cohort-wide QC threshold re-runs no scan
        script:
            "../scripts/segment_batch.py"
