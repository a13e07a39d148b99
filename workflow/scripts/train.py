"""Train an nnU-Net v2 model (release -> raw -> plan/preprocess -> train -> exported model folder)."""

from ctcohort import train
from ctcohort.runlog import log_to

if __name__ == "__main__":  # nnU-Net starts worker processes
    log_to(snakemake.log[0])
    settings = train.TrainingSettings.from_config(snakemake.params.training)
    train.train_model(snakemake.output[0], snakemake.params.work, settings, threads=snakemake.threads)
