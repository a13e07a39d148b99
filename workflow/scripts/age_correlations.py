"""Spearman rs of each structure x measure with age, unadjusted and adjusted, with CIs, corrected P values and
the significance of the primary analysis."""

from ctcohort.patients import read_cross_sectional
from ctcohort.runlog import log_to
from ctcohort.stats import StatisticsSettings, age_correlations
from ctcohort.study_models import with_segmentation_model
from ctcohort.tables import STATS_DIGITS, write_tsv

log_to(snakemake.log[0])
# An empty group (structure table without groups) reads back as NaN; age_correlations treats it as "".
measurements = read_cross_sectional(snakemake.input.measurements, snakemake.input.selection)
settings = StatisticsSettings.from_config(snakemake.params.statistics)
table = age_correlations(
    measurements,
    settings.measures,
    correction=settings.correction,
    alpha=settings.alpha,
    partial_covariates=settings.partial_covariates,
    min_n=settings.min_n,
    primary=settings.primary,
)
write_tsv(with_segmentation_model(table, measurements), snakemake.output[0], STATS_DIGITS)
