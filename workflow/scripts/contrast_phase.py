"""Per scan: the contrast phase TotalSegmentator's classifier estimates from the scan's own measurement."""

from pathlib import Path

from ctcohort.contrast_phase import contrast_phase_table
from ctcohort.measure import read_measurements
from ctcohort.runlog import log_to
from ctcohort.tables import STATS_DIGITS, write_tsv

log_to(snakemake.log[0])
# subjects from the file names: a 10,000-subject list in params would be copied into the report
tables = {Path(path).name.removesuffix(".tsv"): read_measurements(path) for path in snakemake.input.measurements}
write_tsv(contrast_phase_table(tables), snakemake.output[0], STATS_DIGITS)
