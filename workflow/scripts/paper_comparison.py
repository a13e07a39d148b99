"""The paper's reported age correlations beside the study's own."""

import pandas as pd

from ctcohort.paper import load_paper_correlations, paper_comparison, write_paper_comparison
from ctcohort.runlog import log_to

log_to(snakemake.log[0])
correlations = pd.read_csv(snakemake.input.correlations, sep="\t", keep_default_na=False, na_values=["NaN"])
table = paper_comparison(correlations, load_paper_correlations(snakemake.input.paper))
write_paper_comparison(table, snakemake.output[0])
