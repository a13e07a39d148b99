"""Forest plot: rs with 95% CI per structure, grouped by organ/bone/muscle/vessel."""

import pandas as pd

from ctcohort.figures import plot_forest
from ctcohort.runlog import log_to

log_to(snakemake.log[0])
plot_forest(pd.read_csv(snakemake.input[0], sep="\t"), snakemake.params.measures,
            [snakemake.output.png, snakemake.output.svg])
