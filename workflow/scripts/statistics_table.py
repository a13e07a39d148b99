"""One table of the cross-sectional statistics, named by the rule that runs this script: Spearman rs with age
(age_correlations), partial Spearman given the covariates (partial_correlations), rs per sex (by_sex), or OLS per
decade with the spline test of non-linearity (regression); ctcohort.models.statistics_table."""

from ctcohort.models import statistics_table
from ctcohort.patients import read_cross_sectional
from ctcohort.runlog import log_to
from ctcohort.stats import StatisticsSettings
from ctcohort.study_models import with_segmentation_model
from ctcohort.tables import STATS_DIGITS, write_tsv

log_to(snakemake.log[0])
# An empty group (structure table without groups) reads back as NaN; age_correlations treats it as "".
measurements = read_cross_sectional(snakemake.input.measurements, snakemake.input.selection)
settings = StatisticsSettings.from_config(snakemake.params.statistics)
table = statistics_table(snakemake.rule, measurements, settings)
write_tsv(with_segmentation_model(table, measurements), snakemake.output[0], STATS_DIGITS)
