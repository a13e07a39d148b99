"""Spearman rs of each structure x measure with age, with CIs and corrected P values."""

import pandas as pd

from ctcohort.runlog import log_to
from ctcohort.stats import age_correlations

log_to(snakemake.log[0])
measurements = pd.read_csv(snakemake.input[0], sep="\t")
table = age_correlations(
    measurements,
    snakemake.params.measures,
    snakemake.params.correction,
    snakemake.params.alpha,
    snakemake.params.partial_covariates,
)
table.to_csv(snakemake.output[0], sep="\t", index=False, na_rep="NaN", float_format="%.6g")
