"""Measure every structure of one scan; a failure is recorded, not fatal, unless on_scan_error: fail."""

from ctcohort.measure import empty_measurements, measure_scan, write_measurements
from ctcohort.runlog import log_to
from ctcohort.scan_status import recording_failure
from ctcohort.structures import load_structure_table

log_to(snakemake.log[0])
with recording_failure(
    snakemake.wildcards.subject, "measure", snakemake.output.status, snakemake.params.on_error
) as status:
    frame = measure_scan(
        snakemake.input.ct,
        snakemake.input.seg,
        load_structure_table(snakemake.params.structures),
        border_margin=snakemake.params.border_margin,
        min_voxels=snakemake.params.min_voxels,
    )
    write_measurements(frame, snakemake.output.tsv)
if not status.ok:
    write_measurements(empty_measurements(), snakemake.output.tsv)
