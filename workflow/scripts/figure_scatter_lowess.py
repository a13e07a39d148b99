"""Each chosen structure's measure over age, scans coloured by sex, with a LOWESS curve per sex."""

import pandas as pd

from ctcohort.figures import plot_scatter_lowess
from ctcohort.runlog import log_to

log_to(snakemake.log[0])
plot_scatter_lowess(pd.read_csv(snakemake.input[0], sep="\t"), snakemake.params.panels,
                    [snakemake.output.png, snakemake.output.svg])
