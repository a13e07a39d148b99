"""One scan per patient for the cross-sectional statistics: which scan of each patient is chosen."""

from ctcohort.patients import PatientSettings, read_scans, scan_selection
from ctcohort.runlog import log_to
from ctcohort.stats import write_table

log_to(snakemake.log[0])
settings = PatientSettings(snakemake.params.scan_per_patient, snakemake.params.seed)
write_table(scan_selection(read_scans(snakemake.input[0]), settings), snakemake.output[0])
