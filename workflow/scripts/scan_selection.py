"""One scan per patient for the cross-sectional statistics: which scan of each patient is chosen."""

from ctcohort.patients import PatientSettings, read_scans, scan_selection
from ctcohort.runlog import log_to
from ctcohort.tables import STATS_DIGITS, write_tsv

log_to(snakemake.log[0])
settings = PatientSettings(snakemake.params.scan_per_patient, snakemake.params.seed)
write_tsv(scan_selection(read_scans(snakemake.input[0]), settings), snakemake.output[0], STATS_DIGITS)
