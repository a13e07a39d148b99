"""CT age: each scan's age predicted out of fold from its measurements, the corrected gap, and the summary."""

from ctcohort.ct_age import CtAgeSettings, ct_age
from ctcohort.patients import read_scans
from ctcohort.runlog import log_to
from ctcohort.stats import write_table

log_to(snakemake.log[0])
result = ct_age(read_scans(snakemake.input.measurements), read_scans(snakemake.input.selection),
                CtAgeSettings.from_config(snakemake.params.settings))
write_table(result.table, snakemake.output.table)
write_table(result.summary, snakemake.output.summary)
