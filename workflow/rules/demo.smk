# The demo study: a phantom cohort with planted age effects (see src/ctcohort/phantom.py).


rule demo_cohort:
    output:
        sheet=f"{DEMO_DIR}/cohort.tsv",
        truth=f"{DEMO_DIR}/truth.tsv",
        truth_subjects=f"{DEMO_DIR}/truth_subjects.tsv",
        cts=expand(f"{DEMO_DIR}/ct/{{subject}}.nii.gz", subject=DEMO_SUBJECTS),
        labels=expand(f"{DEMO_DIR}/labels/{{subject}}.nii.gz", subject=DEMO_SUBJECTS),
    log:
        "results/logs/demo_cohort.log",
    conda:
        "../../envs/analysis.yaml"
    threads: 4
    resources:
        mem_mb=2000,
        runtime=30,
    params:
        n=config["demo"]["n_subjects"],
        seed=config["demo"]["seed"],
        spacing=config["demo"]["spacing"],
        folder=lambda wildcards, output: os.path.dirname(output.sheet),
    script:
        "../scripts/demo_cohort.py"
