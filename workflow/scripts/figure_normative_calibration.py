"""How well the normative charts place scans they have not seen: worm plots of the out-of-fold z."""

from ctcohort.figures import plot_normative_calibration
from ctcohort.runlog import log_to
from ctcohort.tables import read_statistics

log_to(snakemake.log[0])
plot_normative_calibration(
    read_statistics(snakemake.input.calibration),
    read_statistics(snakemake.input.scores),
    [snakemake.output.png, snakemake.output.svg],
)
