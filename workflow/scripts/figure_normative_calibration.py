"""How well the normative charts place scans they have not seen: worm plots of the out-of-fold z."""

from ctcohort.figures import plot_normative_calibration
from ctcohort.runlog import log_to
from ctcohort.stats import read_table

log_to(snakemake.log[0])
plot_normative_calibration(read_table(snakemake.input.calibration), read_table(snakemake.input.scores),
                           [snakemake.output.png, snakemake.output.svg])
