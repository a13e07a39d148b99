# Per scan: volume and attenuation of every structure, in one pass over CT and label map.


rule measure:
    input:
        ct=ct_path,
        seg=segmentation_path,
        upstream=upstream_statuses,
    output:
        tsv="results/measure/{subject}.tsv",
        status="results/measure/{subject}.status.json",
    params:
        structures=config["structures"],
        border_margin=config["measure"]["border_margin"],
        min_voxels=config["measure"]["min_voxels"],
        ct_checks=config["measure"]["ct_checks"],
        on_error=config["on_scan_error"],
    resources:
        mem_mb=4000,
        runtime=10,
    log:
        "results/logs/measure/{subject}.log",
    benchmark:
        "results/benchmarks/measure/{subject}.tsv"
    conda:
        "../../envs/analysis.yaml"
    script:
        "../scripts/measure.py"
