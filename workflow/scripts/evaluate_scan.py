"""Dice and NSD of one scan's segmentation against its reference; failures recorded like measure's."""

from ctcohort.evaluate import METRIC_COLUMNS, evaluate_scan
from ctcohort.runlog import log_to
from ctcohort.scan_status import recording_failure
from ctcohort.structures import load_structure_table

import pandas as pd

log_to(snakemake.log[0])
with recording_failure(
    snakemake.wildcards.subject, "evaluate", snakemake.output.status, snakemake.params.on_error
) as status:
    metrics = evaluate_scan(
        snakemake.input.seg,
        snakemake.input.reference,
        load_structure_table(snakemake.params.structures),
        tolerance_mm=snakemake.params.tolerance_mm,
    )
    metrics.to_csv(snakemake.output.tsv, sep="\t", index=False, na_rep="NaN", float_format="%.6g")
if not status.ok:
    pd.DataFrame(columns=METRIC_COLUMNS).to_csv(snakemake.output.tsv, sep="\t", index=False)
