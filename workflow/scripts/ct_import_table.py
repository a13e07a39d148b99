"""One row per imported DICOM series: what dcm2niix made of it, the correction taken, or why it failed."""

from ctcohort.dicom_import import import_table
from ctcohort.runlog import log_to
from ctcohort.tables import BLANK, write_tsv

log_to(snakemake.log[0])
write_tsv(import_table(snakemake.input.records, snakemake.input.statuses), snakemake.output[0], missing=BLANK)
