"""The paper's reported age correlations beside the study's own."""

from ctcohort.paper import load_paper_correlations, paper_comparison, write_paper_comparison
from ctcohort.runlog import log_to
from ctcohort.stats import read_table

log_to(snakemake.log[0])
correlations = read_table(snakemake.input.correlations)
table = paper_comparison(correlations, load_paper_correlations(snakemake.input.paper))
write_paper_comparison(table, snakemake.output[0])
