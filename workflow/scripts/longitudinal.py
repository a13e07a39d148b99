"""Within-patient change per year from repeated scans: a linear mixed model per structure x measure."""

from ctcohort.longitudinal import longitudinal_table
from ctcohort.runlog import log_to
from ctcohort.patients import read_scans
from ctcohort.stats import write_table

log_to(snakemake.log[0])
# every scan, not one per patient: the model needs each patient's repeated scans
table = longitudinal_table(
    read_scans(snakemake.input[0]),
    snakemake.params.measures,
    snakemake.params.covariates,
    min_patients=snakemake.params.min_patients,
    correction=snakemake.params.correction,
    alpha=snakemake.params.alpha,
    random_slope=snakemake.params.random_slope,
)
write_table(table, snakemake.output[0])
