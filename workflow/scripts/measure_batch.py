"""Measure and check every structure of each scan of a batch; a failure is recorded, not fatal, unless
on_scan_error: fail."""

from ctcohort.batches import batch_outputs, run_batch
from ctcohort.imaging import ScanChecks
from ctcohort.measure import empty_measurements_and_qc, measure_and_qc_files, write_measurements_and_qc
from ctcohort.qc import QCSettings
from ctcohort.runlog import log_to
from ctcohort.structures import load_structure_table

log_to(snakemake.log[0])
table = load_structure_table(snakemake.params.structures)
checks = ScanChecks.from_config(snakemake.params.ct_checks)
qc = QCSettings(**snakemake.params.qc)
# per measurement table: the scan's QC table and preview (none where previews are off)
previews = snakemake.output.get("previews") or [None] * len(snakemake.output.tables)
qc_outputs = dict(zip(snakemake.output.tables, zip(snakemake.output.qc, previews)))
run_batch(
    "measure",
    batch_outputs(
        snakemake.params.subjects, snakemake.output.tables, snakemake.output.statuses, snakemake.params.upstream
    ),
    step=lambda i: measure_and_qc_files(snakemake.input.cts[i], snakemake.input.segs[i], table, checks=checks, qc=qc),
    write=lambda result, path: write_measurements_and_qc(result, path, *qc_outputs[path]),
    empty=empty_measurements_and_qc,
    on_error=snakemake.params.on_error,
)
