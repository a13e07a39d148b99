"""Within-patient change per year from repeated scans: a linear mixed model per structure x measure."""

from ctcohort.longitudinal import longitudinal_table
from ctcohort.patients import read_scans
from ctcohort.runlog import log_to
from ctcohort.study_models import with_segmentation_model
from ctcohort.tables import STATS_DIGITS, write_tsv

log_to(snakemake.log[0])
# every scan, not one per patient: the model needs each patient's repeated scans
scans = read_scans(snakemake.input[0])
table = longitudinal_table(
    scans,
    snakemake.params.measures,
    snakemake.params.covariates,
    min_patients=snakemake.params.min_patients,
    correction=snakemake.params.correction,
    alpha=snakemake.params.alpha,
    random_slope=snakemake.params.random_slope,
)
write_tsv(with_segmentation_model(table, scans), snakemake.output[0], STATS_DIGITS)
