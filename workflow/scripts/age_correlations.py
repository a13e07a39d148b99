"""Spearman rs of each structure x measure with age, with CIs and corrected P values."""

from ctcohort.patients import read_cross_sectional
from ctcohort.runlog import log_to
from ctcohort.stats import age_correlations, write_table

log_to(snakemake.log[0])
# An empty group (structure table without groups) reads back as NaN; age_correlations treats it as "".
measurements = read_cross_sectional(snakemake.input.measurements, snakemake.input.selection)
table = age_correlations(
    measurements,
    snakemake.params.measures,
    correction=snakemake.params.correction,
    alpha=snakemake.params.alpha,
    partial_covariates=snakemake.params.partial_covariates,
    min_n=snakemake.params.min_n,
)
write_table(table, snakemake.output[0])
