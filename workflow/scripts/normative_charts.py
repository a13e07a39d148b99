"""Age- and sex-specific centile charts of the chosen structures' measures (normative.method: lms, location-scale-
shape models calibrated on held-out scans, or quantile regression), and every scan's centile score."""

from ctcohort.aggregate import read_cohort_qc
from ctcohort.normative import CALIBRATION_COLUMNS as CALIBRATION
from ctcohort.normative import ChartSettings, centile_scores, fit_panel_charts, reference_scans
from ctcohort.patients import read_cross_sectional, read_scans
from ctcohort.runlog import log_to
from ctcohort.tables import STATS_DIGITS, write_tsv

log_to(snakemake.log[0])
settings = snakemake.params.settings
# the reference: the scans normative.reference selects, one per patient, without structures the QC flags
measurements = reference_scans(
    read_cross_sectional(snakemake.input.measurements, snakemake.input.selection),
    settings.get("reference", ""),
    read_cohort_qc(snakemake.input.qc),
    snakemake.params.combined,
)
fit = fit_panel_charts(
    measurements,
    [(panel["structure"], panel["measure"]) for panel in settings["panels"]],
    ChartSettings.from_config(settings),
    combined=snakemake.params.combined,
    processes=snakemake.threads,
)
write_tsv(fit.charts, snakemake.output.charts, STATS_DIGITS)
write_tsv(fit.coefficients, snakemake.output.coefficients, STATS_DIGITS)
keys = ["structure", "measure", "sex"]
summary = [*keys, "n", "note", "method", "family", "site_sd", "sites", *CALIBRATION]
write_tsv(fit.charts.drop_duplicates(keys)[summary], snakemake.output.calibration, STATS_DIGITS)
# every measured scan (each patient's every scan), scored against charts it did not help fit
write_tsv(centile_scores(fit, read_scans(snakemake.input.measurements)), snakemake.output.scores, STATS_DIGITS)
