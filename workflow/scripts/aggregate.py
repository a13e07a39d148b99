"""Join every scan's measurements with the sheet's covariates and apply the plausibility exclusions; list
failed scans; QC and summaries for the report."""

import logging

from ctcohort import aggregate
from ctcohort.contrast_phase import contrast_phase_table, resolved_sheet
from ctcohort.duplicate_scans import failures_with_duplicates
from ctcohort.qc import QCSettings, apply_plausibility, load_plausible_volumes
from ctcohort.review import apply_review_decisions, count_sentence, load_decisions
from ctcohort.runlog import log_to
from ctcohort.scan_status import read_status
from ctcohort.sheet import load_cohort_sheet
from ctcohort.tables import BLANK, MEASUREMENT_DIGITS, STATS_DIGITS, write_tsv

log = logging.getLogger("ctcohort.aggregate")

log_to(snakemake.log[0])
settings = QCSettings(**snakemake.params.qc)
sheet = load_cohort_sheet(snakemake.input.sheet, snakemake.input.schema)
statuses = [read_status(path) for path in snakemake.input.statuses]
failures = aggregate.failure_table(statuses)
# rows left out before any job as the same scan as an earlier row (config duplicates: drop_later), and imported
# DICOM series with identical voxels and geometry (one series exported twice, other headers)
failures, n_dropped = failures_with_duplicates(
    failures,
    snakemake.input.duplicates,
    snakemake.input.imported,
    sheet,
    snakemake.input.sheet,
    snakemake.params.duplicates,
)
# subjects from their status files: a 10,000-subject list in params would be copied into the report
subjects = [status.subject for status in statuses]
tables = aggregate.read_scan_measurements(dict(zip(subjects, snakemake.input.measurements)))
# each scan's contrast phase from its own measurement; the contrast covariate resolved once, here, so that every
# analysis reading measurements.tsv adjusts for the same
phases = contrast_phase_table(tables)
sheet, contrast = resolved_sheet(sheet, phases, snakemake.params.contrast)
measured = aggregate.join_covariates(sheet, tables, set(failures["subject"]))
del tables  # joined: at 10,000 scans the separate tables are as big again
volumes = load_plausible_volumes(snakemake.input.plausible_volumes[0] if snakemake.input.plausible_volumes else None)
# the reviewer's exclusions (qc.review_decisions) override every other reason
decisions = load_decisions(snakemake.input.review_decisions[0] if snakemake.input.review_decisions else None, measured)
checked = apply_review_decisions(apply_plausibility(measured, volumes, settings.hu_window), decisions)
if decisions is not None:
    log.info("%s", count_sentence(decisions) or "review decisions: none excludes anything")
measurements = checked.drop(columns=["volume_implausible", "hu_implausible"])
# combined structures (kidneys = left + right, ...) from the members' excluded-as-needed values; the QC
# tables below count the structures of the segmentation only
study = aggregate.add_combined(measurements, snakemake.params.combined)

write_tsv(phases, snakemake.output.phases, STATS_DIGITS)
write_tsv(study, snakemake.output.measurements, MEASUREMENT_DIGITS)
study.to_parquet(snakemake.output.parquet, index=False)
write_tsv(failures, snakemake.output.failures, missing=BLANK)
qc_paths = dict(zip(subjects, snakemake.input.qc))
qc_table = aggregate.cohort_qc(measured, checked, qc_paths, settings, decisions, contrast)
write_tsv(qc_table, snakemake.output.qc_table, MEASUREMENT_DIGITS)
write_tsv(aggregate.qc_summary(measurements), snakemake.output.qc, missing=BLANK)
write_tsv(aggregate.measurement_summary(study), snakemake.output.summary, STATS_DIGITS)
n_scans = len(subjects) + n_dropped  # the sheet's rows
write_tsv(aggregate.exclusion_counts(n_scans, failures, measurements), snakemake.output.exclusions, missing=BLANK)
write_tsv(
    aggregate.exclusion_flow(n_scans, failures, checked, snakemake.params.measures),
    snakemake.output.flow,
    missing=BLANK,
)
