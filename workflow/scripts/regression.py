"""OLS of each structure x measure on age in decades plus covariates (HC3), and the spline test of non-linearity."""

from ctcohort.models import regression_table
from ctcohort.patients import read_cross_sectional
from ctcohort.runlog import log_to
from ctcohort.stats import StatisticsSettings
from ctcohort.study_models import with_segmentation_model
from ctcohort.tables import STATS_DIGITS, write_tsv

log_to(snakemake.log[0])
measurements = read_cross_sectional(snakemake.input.measurements, snakemake.input.selection)
settings = StatisticsSettings.from_config(snakemake.params.statistics)
table = regression_table(
    measurements,
    settings.measures,
    settings.partial_covariates,
    spline_df=settings.spline_df,
    min_n=settings.min_n,
)
write_tsv(with_segmentation_model(table, measurements), snakemake.output[0], STATS_DIGITS)
