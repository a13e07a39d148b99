"""The paper's reported age correlations beside the study's own."""

from ctcohort.paper import load_paper_correlations, paper_comparison, write_paper_comparison
from ctcohort.runlog import log_to
from ctcohort.tables import read_statistics

log_to(snakemake.log[0])
correlations = read_statistics(snakemake.input.correlations)
table = paper_comparison(correlations, load_paper_correlations(snakemake.input.paper))
write_paper_comparison(table, snakemake.output[0])
