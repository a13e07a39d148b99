"""CT age: each scan's age predicted out of fold from its measurements, the corrected gap, and the summary."""

from ctcohort.ct_age import CtAgeSettings, ct_age
from ctcohort.patients import read_scans
from ctcohort.runlog import log_to
from ctcohort.tables import STATS_DIGITS, write_tsv

log_to(snakemake.log[0])
result = ct_age(
    read_scans(snakemake.input.measurements),
    read_scans(snakemake.input.selection),
    CtAgeSettings.from_config(snakemake.params.settings),
)
write_tsv(result.table, snakemake.output.table, STATS_DIGITS)
write_tsv(result.summary, snakemake.output.summary, STATS_DIGITS)
