"""Measure every structure of each scan of a batch; a failure is recorded, not fatal, unless on_scan_error: fail."""

from ctcohort.batches import batch_outputs, run_batch
from ctcohort.imaging import ScanChecks
from ctcohort.measure import empty_measurements, measure_scan, write_measurements
from ctcohort.runlog import log_to
from ctcohort.structures import load_structure_table

log_to(snakemake.log[0])
table = load_structure_table(snakemake.params.structures)
checks = ScanChecks.from_config(snakemake.params.ct_checks)
run_batch(
    "measure",
    batch_outputs(snakemake.params.subjects, snakemake.output.tables, snakemake.output.statuses,
                  snakemake.params.upstream),
    step=lambda i: measure_scan(
        snakemake.input.cts[i],
        snakemake.input.segs[i],
        table,
        border_margin=snakemake.params.border_margin,
        min_voxels=snakemake.params.min_voxels,
        checks=checks,
    ),
    write=write_measurements,
    empty=empty_measurements,
    on_error=snakemake.params.on_error,
)
