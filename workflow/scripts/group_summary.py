"""Per structure group and measure: structures tested, significant up and down, median |rs|."""

from ctcohort.runlog import log_to
from ctcohort.stats import group_summary
from ctcohort.tables import STATS_DIGITS, read_statistics, write_tsv

log_to(snakemake.log[0])
correlations = read_statistics(snakemake.input[0])
write_tsv(group_summary(correlations, combined=snakemake.params.combined), snakemake.output[0], STATS_DIGITS)
