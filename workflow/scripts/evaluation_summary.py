"""Per-scan Dice/NSD into one table, per-structure means with bootstrap CIs, failures, and the Dice figure."""

from ctcohort.evaluate import write_evaluation_summary
from ctcohort.runlog import log_to

log_to(snakemake.log[0])
write_evaluation_summary(
    dict(zip(snakemake.params.subjects, snakemake.input.scans, strict=True)),
    snakemake.input.statuses,
    dice_path=snakemake.output.dice,
    summary_path=snakemake.output.summary,
    failures_path=snakemake.output.failures,
    figure_paths=[snakemake.output.png, snakemake.output.svg],
    n_resamples=snakemake.params.resamples,
)
