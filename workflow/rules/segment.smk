# Segmentation with nnU-Net v2: one job per batch of scans, the model loaded once per job.
# Batches are consecutive sheet rows, so appending rows only touches the last batch.

for batch, subjects in enumerate(SEGMENTATION_BATCHES):

    rule:
        name:
            f"segment_batch_{batch:05d}"
        input:
            cts=batch_cts(subjects),
            model=lambda wildcards: SEGMENTATION_MODEL_FILES,  # new weights segment again
        output:
            segs=[f"results/seg/{s}.nii.gz" for s in subjects],
            statuses=[f"results/seg/{s}.status.json" for s in subjects],
        params:
            subjects=subjects,
            model=config["segmentation"]["model"],
            task=config["segmentation"]["task"],
            structures=config["structures"],
            device=config["segmentation"]["device"],
            folds=config["segmentation"]["folds"],
            tile_step=config["segmentation"]["tile_step"],
            mirroring=config["segmentation"]["mirroring"],
            on_error=config["on_scan_error"],
            ct_checks=config["measure"]["ct_checks"],
        threads: config["segmentation"]["threads"]
        resources:
            mem_mb=config["segmentation"]["mem_mb"],
            runtime=config["segmentation"]["runtime_per_scan_min"] * len(subjects),
            gpu=int(config["segmentation"]["device"] == "cuda"),
        log:
            f"results/logs/segment/batch_{batch:05d}.log",
        benchmark:
            f"results/benchmarks/segment/batch_{batch:05d}.tsv"
        conda:
            "../../envs/segmentation.yaml"
        script:
            "../scripts/segment_batch.py"
