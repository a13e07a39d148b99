"""Heatmap of rs with age: structures x measures."""

from ctcohort.figures import plot_rs_heatmap
from ctcohort.runlog import log_to
from ctcohort.tables import read_statistics

log_to(snakemake.log[0])
plot_rs_heatmap(
    read_statistics(snakemake.input[0]), snakemake.params.measures, [snakemake.output.png, snakemake.output.svg]
)
