"""Write the demo's phantom cohort (scans, label maps, cohort.tsv, truth.tsv, truth_subjects.tsv)."""

from ctcohort import phantom
from ctcohort.runlog import log_to

log_to(snakemake.log[0])
phantom.write_cohort(
    snakemake.params.folder,
    snakemake.params.n,
    snakemake.params.seed,
    tuple(snakemake.params.spacing),
    processes=snakemake.threads,
)
