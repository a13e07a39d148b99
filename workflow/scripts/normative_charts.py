"""Age- and sex-specific percentile charts of the chosen structures' measures (quantile regression)."""

import pandas as pd

from ctcohort.aggregate import read_cohort_qc
from ctcohort.normative import fit_normative_charts, reference_scans
from ctcohort.patients import read_cross_sectional
from ctcohort.runlog import log_to
from ctcohort.stats import write_table

log_to(snakemake.log[0])
settings = snakemake.params.settings
# the reference: the scans normative.reference selects, one per patient, without structures the QC flags
measurements = reference_scans(read_cross_sectional(snakemake.input.measurements, snakemake.input.selection),
                               settings.get("reference", ""), read_cohort_qc(snakemake.input.qc), snakemake.params.combined)
fits = [
    fit_normative_charts(measurements, [panel["structure"]], [panel["measure"]],
                         percentiles=settings["percentiles"], covariates=settings["covariates"],
                         by_sex=settings["by_sex"], spline_df=settings["spline_df"], min_n=settings["min_n"],
                         combined=snakemake.params.combined)
    for panel in settings["panels"]
]
write_table(pd.concat([charts for charts, _ in fits], ignore_index=True), snakemake.output.charts)
write_table(pd.concat([coefficients for _, coefficients in fits], ignore_index=True), snakemake.output.coefficients)
