"""The acquisition mix by age decade (ctcohort.acquisition_figure)."""

from ctcohort.acquisition_figure import plot_acquisition_mix
from ctcohort.runlog import log_to
from ctcohort.tables import read_statistics

log_to(snakemake.log[0])
plot_acquisition_mix(read_statistics(snakemake.input[0]), [snakemake.output.png, snakemake.output.svg])
