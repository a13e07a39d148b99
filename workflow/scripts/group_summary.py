"""Per structure group and measure: structures tested, significant up and down, median |rs|."""

from ctcohort.runlog import log_to
from ctcohort.stats import group_summary, read_table, write_table

log_to(snakemake.log[0])
correlations = read_table(snakemake.input[0])
write_table(group_summary(correlations, combined=snakemake.params.combined), snakemake.output[0])
