"""Heatmap of rs with age: structures x measures."""

import pandas as pd

from ctcohort.figures import plot_rs_heatmap
from ctcohort.runlog import log_to

log_to(snakemake.log[0])
plot_rs_heatmap(pd.read_csv(snakemake.input[0], sep="\t"), snakemake.params.measures,
                [snakemake.output.png, snakemake.output.svg])
