"""Versions of Python and the packages behind the numbers."""

from ctcohort.provenance import software_versions
from ctcohort.runlog import log_to
from ctcohort.tables import BLANK, write_tsv

log_to(snakemake.log[0])
write_tsv(software_versions(), snakemake.output[0], missing=BLANK)
