"""Measure every structure of one scan; a failure is recorded, not fatal, unless on_scan_error: fail."""

from ctcohort.imaging import ScanChecks
from ctcohort.measure import empty_measurements, measure_scan, write_measurements
from ctcohort.runlog import log_to
from ctcohort.scan_status import run_scan_step
from ctcohort.structures import load_structure_table

log_to(snakemake.log[0])
run_scan_step(
    snakemake.wildcards.subject,
    "measure",
    snakemake.output.status,
    snakemake.params.on_error,
    step=lambda: write_measurements(
        measure_scan(
            snakemake.input.ct,
            snakemake.input.seg,
            load_structure_table(snakemake.params.structures),
            border_margin=snakemake.params.border_margin,
            min_voxels=snakemake.params.min_voxels,
            checks=ScanChecks.from_config(snakemake.params.ct_checks),
        ),
        snakemake.output.tsv,
    ),
    placeholder=lambda: write_measurements(empty_measurements(), snakemake.output.tsv),
    upstream=snakemake.input.upstream,
)
