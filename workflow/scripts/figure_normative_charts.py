"""The normative charts: percentile curves over age per sex, with the cohort's scans."""

import pandas as pd

from ctcohort.figures import plot_normative_charts
from ctcohort.runlog import log_to
from ctcohort.stats import read_table

log_to(snakemake.log[0])
plot_normative_charts(read_table(snakemake.input.charts), read_table(snakemake.input.coefficients),
                      pd.read_csv(snakemake.input.measurements, sep="\t"), snakemake.params.panels,
                      [snakemake.output.png, snakemake.output.svg])
