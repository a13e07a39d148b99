"""OLS of each structure x measure on age in decades plus covariates (HC3), and the spline test of non-linearity."""

import pandas as pd

from ctcohort.models import regression_table
from ctcohort.runlog import log_to

log_to(snakemake.log[0])
measurements = pd.read_csv(snakemake.input[0], sep="\t")
table = regression_table(
    measurements,
    snakemake.params.measures,
    snakemake.params.covariates,
    spline_df=snakemake.params.spline_df,
    min_n=snakemake.params.min_n,
)
table.to_csv(snakemake.output[0], sep="\t", index=False, na_rep="NaN", float_format="%.6g")
