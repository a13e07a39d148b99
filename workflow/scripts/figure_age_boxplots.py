"""Box plots of chosen structures' measures over age groups (the paper's Figure 6 style)."""

import pandas as pd

from ctcohort.figures import plot_age_boxplots
from ctcohort.runlog import log_to

log_to(snakemake.log[0])
plot_age_boxplots(
    pd.read_csv(snakemake.input.measurements, sep="\t"),
    snakemake.params.panels,
    snakemake.params.age_edges,
    [snakemake.output.png, snakemake.output.svg],
    correlations=pd.read_csv(snakemake.input.correlations, sep="\t"),
)
