# Optional target `snakemake train`: an nnU-Net v2 model from data in the TotalSegmentator release
# layout (training.release), or from a phantom release when none is given.


rule train:
    output:
        directory("results/train/model"),
    log:
        "results/logs/train.log",
    conda:
        "../../envs/segmentation.yaml"
    threads: 2
    resources:
        mem_mb=16000,
        runtime=24 * 60,
        gpu=int(config["training"]["device"] == "cuda"),
    params:
        training=config["training"],
        work="results/train/work",
    script:
        "../scripts/train.py"
