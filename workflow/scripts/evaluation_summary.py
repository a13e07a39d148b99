"""Per-scan Dice/NSD into one table, per-structure means with bootstrap CIs, and the Dice figure."""

import pandas as pd

from ctcohort import evaluate
from ctcohort.aggregate import collect_failures
from ctcohort.runlog import log_to

log_to(snakemake.log[0])
failures = collect_failures(snakemake.input.statuses)
per_scan = pd.concat(
    [
        pd.read_csv(path, sep="\t").assign(subject=subject)
        for subject, path in zip(snakemake.params.subjects, snakemake.input.scans)
        if subject not in set(failures["subject"])
    ],
    ignore_index=True,
)
dice = per_scan[["subject", "structure", "group", "dice", "nsd", "n_pred", "n_ref"]]
dice.to_csv(snakemake.output.dice, sep="\t", index=False, na_rep="NaN", float_format="%.6g")
summary = evaluate.summarize(dice, n_resamples=snakemake.params.resamples)
summary.to_csv(snakemake.output.summary, sep="\t", index=False, na_rep="NaN", float_format="%.6g")
failures.to_csv(snakemake.output.failures, sep="\t", index=False)
evaluate.plot_dice(summary, [snakemake.output.png, snakemake.output.svg])
