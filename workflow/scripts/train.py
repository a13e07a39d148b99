"""Train an nnU-Net v2 model (release -> raw -> plan/preprocess -> train -> exported model folder)."""

from pathlib import Path

from ctcohort import train
from ctcohort.runlog import log_to

if __name__ == "__main__":  # nnU-Net starts worker processes
    log_to(snakemake.log[0])
    params = snakemake.params
    release = params.release or train.write_phantom_release(
        Path(params.work) / "release", params.phantom_n, params.phantom_seed, processes=snakemake.threads
    )
    train.train_from_release(
        release,
        snakemake.output[0],
        Path(params.work) / "nnunet",
        dataset_id=params.dataset_id,
        epochs=params.epochs,
        iterations=params.iterations,
        configuration=params.configuration,
        device=params.device,
        threads=snakemake.threads,
        optimizer=params.optimizer,
        loss=params.loss,
        bf16=params.bf16,
        augmentation=params.augmentation,
        time_budget_min=params.time_budget_min,
        data_workers=params.data_workers,
        half=params.half,
        small_configuration=dict(params.small_configuration),
    )
