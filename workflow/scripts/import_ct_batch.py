"""Convert each DICOM series of a batch to NIfTI in HU; a series that fails is recorded, not fatal."""

from ctcohort.dicom_import import import_batch
from ctcohort.runlog import log_to

log_to(snakemake.log[0])
out, params = snakemake.output, snakemake.params
import_batch(
    params.subjects,
    snakemake.input.sources,
    out.cts,
    out.records,
    out.statuses,
    allow_corrected=params.allow_corrected,
    on_error=params.on_error,
)
