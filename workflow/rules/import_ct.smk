# DICOM import: each scan whose sheet ct names a DICOM series (a folder, a zip or a .txt file list) is
# converted by dcm2niix to results/ct/{subject}.nii.gz in HU, a batch of scans per job
# (import_ct.scans_per_job); the later stages read that file (ct_file in common.smk). A series that is
# not one CT volume fails at stage import_ct; with import_ct.allow_corrected, dcm2niix's corrected volume
# of a series with a missing slice or a gantry tilt is taken, and the correction recorded.

for batch, subjects in enumerate(IMPORT_BATCHES):

    rule:
        name:
            f"import_ct_batch_{batch:05d}"
        input:  # functions: see batch_files
            sources=batch_files(sheet_file("ct"), subjects),
        output:
            cts=[f"results/ct/{s}.nii.gz" for s in subjects],
            records=[f"results/ct/{s}.import.tsv" for s in subjects],
            statuses=[f"results/ct/{s}.status.json" for s in subjects],
        log:
            f"results/logs/import_ct/batch_{batch:05d}.log",
        benchmark:
            f"results/benchmarks/import_ct/batch_{batch:05d}.tsv"
        conda:
            "../../envs/analysis.yaml"
        resources:  # attempt x: a retried job (--retries; profiles/slurm retries twice) gets more
            mem_mb=lambda wildcards, attempt: config["resources"]["per_scan_mem_mb"] * attempt,
            runtime=batch_runtime_min(len(subjects)),
        params:
            subjects=subjects,
            sources=sources_fingerprint(subjects, ("ct",), imported=True),  # rewritten DICOM files rerun
            allow_corrected=config["import_ct"]["allow_corrected"],
            on_error=config["on_scan_error"],
        script:
            "../scripts/import_ct_batch.py"


localrules:
    ct_import_table,


rule ct_import_table:
    input:  # functions: see rule aggregate
        records=lambda wildcards: expand("results/ct/{subject}.import.tsv", subject=DICOM_SUBJECTS),
        statuses=lambda wildcards: expand("results/ct/{subject}.status.json", subject=DICOM_SUBJECTS),
    output:
        report(
            "results/tables/ct_import.tsv",
            caption="../report/ct_import.rst",
            category="Quality control",
        ),
    log:
        "results/logs/ct_import_table.log",
    conda:
        "../../envs/analysis.yaml"
    script:
        "../scripts/ct_import_table.py"
