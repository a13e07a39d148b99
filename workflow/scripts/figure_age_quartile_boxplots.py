"""Box plots of chosen structures' measures over the age quartiles (the paper's Figure 6 style)."""

from ctcohort.figures import cohort_age_edges, plot_age_boxplots
from ctcohort.patients import read_cross_sectional
from ctcohort.runlog import log_to
from ctcohort.tables import read_statistics

log_to(snakemake.log[0])
measurements = read_cross_sectional(snakemake.input.measurements, snakemake.input.selection)
plot_age_boxplots(
    measurements,
    snakemake.params.panels,
    cohort_age_edges(measurements.drop_duplicates("subject")["age"].dropna(), snakemake.params.age_edges),
    [snakemake.output.png, snakemake.output.svg],
    correlations=read_statistics(snakemake.input.correlations),
)
