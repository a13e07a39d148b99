"""Spearman rs with age per sex, and the test of the difference between men and women."""

import pandas as pd

from ctcohort.models import by_sex_table
from ctcohort.runlog import log_to
from ctcohort.stats import write_table

log_to(snakemake.log[0])
measurements = pd.read_csv(snakemake.input[0], sep="\t")
table = by_sex_table(measurements, snakemake.params.measures, min_n=snakemake.params.min_n)
write_table(table, snakemake.output[0])
