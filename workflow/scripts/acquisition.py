"""Acquisition as a confounder of age: its association with age, its mix by age decade, and the primary analysis
adjusted for it (ctcohort.acquisition)."""

from ctcohort.acquisition import association_table, decade_shares, sensitivity_table
from ctcohort.patients import read_cross_sectional
from ctcohort.runlog import log_to
from ctcohort.stats import StatisticsSettings
from ctcohort.tables import STATS_DIGITS, write_tsv

log_to(snakemake.log[0])
measurements = read_cross_sectional(snakemake.input.measurements, snakemake.input.selection)
settings = StatisticsSettings.from_config(snakemake.params.statistics)
write_tsv(association_table(measurements, settings.min_n), snakemake.output.association, STATS_DIGITS)
write_tsv(decade_shares(measurements), snakemake.output.by_decade, STATS_DIGITS)
write_tsv(sensitivity_table(measurements, settings), snakemake.output.sensitivity, STATS_DIGITS)
