"""OLS of each structure x measure on age in decades plus covariates (HC3), and the spline test of non-linearity."""

from ctcohort.models import regression_table
from ctcohort.patients import read_cross_sectional
from ctcohort.runlog import log_to
from ctcohort.tables import STATS_DIGITS, write_tsv
from ctcohort.study_models import with_segmentation_model

log_to(snakemake.log[0])
measurements = read_cross_sectional(snakemake.input.measurements, snakemake.input.selection)
table = regression_table(
    measurements,
    snakemake.params.measures,
    snakemake.params.covariates,
    spline_df=snakemake.params.spline_df,
    min_n=snakemake.params.min_n,
)
write_tsv(with_segmentation_model(table, measurements), snakemake.output[0], STATS_DIGITS)
