"""Dice and NSD of one scan's segmentation against its reference; failures recorded like measure's."""

import pandas as pd

from ctcohort.evaluate import METRIC_COLUMNS, evaluate_scan
from ctcohort.runlog import log_to
from ctcohort.scan_status import run_scan_step
from ctcohort.structures import load_structure_table


def write(table):
    table.to_csv(snakemake.output.tsv, sep="\t", index=False, na_rep="NaN", float_format="%.6g")


log_to(snakemake.log[0])
run_scan_step(
    snakemake.wildcards.subject,
    "evaluate",
    snakemake.output.status,
    snakemake.params.on_error,
    step=lambda: write(
        evaluate_scan(
            snakemake.input.seg,
            snakemake.input.reference,
            load_structure_table(snakemake.params.structures),
            tolerance_mm=snakemake.params.tolerance_mm,
        )
    ),
    placeholder=lambda: write(pd.DataFrame(columns=METRIC_COLUMNS)),
    upstream=snakemake.input.upstream,
)
