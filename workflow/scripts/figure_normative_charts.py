"""The normative charts: percentile curves over age per sex, with the cohort's scans."""

from ctcohort.figures import plot_normative_charts
from ctcohort.patients import read_cross_sectional
from ctcohort.runlog import log_to
from ctcohort.tables import read_statistics

log_to(snakemake.log[0])
plot_normative_charts(
    read_statistics(snakemake.input.charts),
    read_statistics(snakemake.input.coefficients),
    read_cross_sectional(snakemake.input.measurements, snakemake.input.selection),
    snakemake.params.panels,
    [snakemake.output.png, snakemake.output.svg],
)
