"""Versions of Python and the packages behind the numbers."""

from ctcohort.provenance import software_versions
from ctcohort.runlog import log_to

log_to(snakemake.log[0])
software_versions().to_csv(snakemake.output[0], sep="\t", index=False)
