"""Dice and NSD of each scan of a batch against its reference; failures recorded like measure's."""

from ctcohort.batches import batch_outputs, run_batch
from ctcohort.evaluate import empty_metrics, evaluate_scan, write_metrics
from ctcohort.runlog import log_to
from ctcohort.structures import load_structure_table

log_to(snakemake.log[0])
table = load_structure_table(snakemake.params.structures)
run_batch(
    "evaluate",
    batch_outputs(
        snakemake.params.subjects, snakemake.output.tables, snakemake.output.statuses, snakemake.input.upstream
    ),
    step=lambda i: evaluate_scan(
        snakemake.input.segs[i],
        snakemake.input.references[i],
        table,
        tolerance_mm=snakemake.params.tolerance_mm,
    ),
    write=write_metrics,
    empty=empty_metrics,
    on_error=snakemake.params.on_error,
)
