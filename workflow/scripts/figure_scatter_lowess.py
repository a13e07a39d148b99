"""Each chosen structure's measure over age, one scan per patient, coloured by sex, with a LOWESS curve per sex."""

from ctcohort.figures import plot_scatter_lowess
from ctcohort.patients import read_cross_sectional
from ctcohort.runlog import log_to

log_to(snakemake.log[0])
plot_scatter_lowess(
    read_cross_sectional(snakemake.input.measurements, snakemake.input.selection),
    snakemake.params.panels,
    [snakemake.output.png, snakemake.output.svg],
)
