"""Forest plot: rs with 95% CI per structure, grouped by organ/bone/muscle/vessel."""

from ctcohort.figures import plot_forest
from ctcohort.runlog import log_to
from ctcohort.tables import read_statistics

log_to(snakemake.log[0])
plot_forest(
    read_statistics(snakemake.input[0]), snakemake.params.measures, [snakemake.output.png, snakemake.output.svg]
)
