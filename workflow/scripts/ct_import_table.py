"""One row per imported DICOM series: what dcm2niix made of it, the correction taken, or why it failed."""

from ctcohort.dicom_import import import_table
from ctcohort.runlog import log_to

log_to(snakemake.log[0])
import_table(snakemake.input.records, snakemake.input.statuses).to_csv(snakemake.output[0], sep="\t", index=False)
