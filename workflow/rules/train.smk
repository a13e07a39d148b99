# Optional target `snakemake train`: an nnU-Net v2 model from data in the TotalSegmentator release
# layout (training.release), or from a phantom release when none is given.


rule train:
    output:
        directory("results/train/model"),
    params:
        release=config["training"]["release"],
        work="results/train/work",
        phantom_n=config["training"]["phantom_n"],
        phantom_seed=config["training"]["phantom_seed"],
        epochs=config["training"]["epochs"],
        iterations=config["training"]["iterations"],
        configuration=config["training"]["configuration"],
        device=config["training"]["device"],
        dataset_id=config["training"]["dataset_id"],
        optimizer=config["training"]["optimizer"],
        loss=config["training"]["loss"],
        bf16=config["training"]["bf16"],
        augmentation=config["training"]["augmentation"],
        time_budget_min=config["training"]["time_budget_min"],
        data_workers=config["training"]["data_workers"],
        half=config["training"]["half"],
        small_configuration=config["training"]["small_configuration"],
    threads: 2
    resources:
        mem_mb=16000,
        runtime=24 * 60,
        gpu=int(config["training"]["device"] == "cuda"),
    log:
        "results/logs/train.log",
    conda:
        "../../envs/segmentation.yaml"
    script:
        "../scripts/train.py"
