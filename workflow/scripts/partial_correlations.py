"""Partial Spearman correlation of each structure x measure with age given the configured covariates."""

from ctcohort.models import partial_table
from ctcohort.patients import read_cross_sectional
from ctcohort.runlog import log_to
from ctcohort.stats import StatisticsSettings
from ctcohort.study_models import with_segmentation_model
from ctcohort.tables import STATS_DIGITS, write_tsv

log_to(snakemake.log[0])
measurements = read_cross_sectional(snakemake.input.measurements, snakemake.input.selection)
settings = StatisticsSettings.from_config(snakemake.params.statistics)
table = partial_table(
    measurements,
    settings.measures,
    settings.partial_covariates,
    correction=settings.correction,
    alpha=settings.alpha,
    min_n=settings.min_n,
)
write_tsv(with_segmentation_model(table, measurements), snakemake.output[0], STATS_DIGITS)
