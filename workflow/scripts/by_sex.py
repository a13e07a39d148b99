"""Spearman rs with age per sex, and the test of the difference between men and women."""

from ctcohort.models import by_sex_table
from ctcohort.patients import read_cross_sectional
from ctcohort.runlog import log_to
from ctcohort.stats import StatisticsSettings
from ctcohort.study_models import with_segmentation_model
from ctcohort.tables import STATS_DIGITS, write_tsv

log_to(snakemake.log[0])
measurements = read_cross_sectional(snakemake.input.measurements, snakemake.input.selection)
settings = StatisticsSettings.from_config(snakemake.params.statistics)
table = by_sex_table(measurements, settings.measures, min_n=settings.min_n)
write_tsv(with_segmentation_model(table, measurements), snakemake.output[0], STATS_DIGITS)
