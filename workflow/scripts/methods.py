"""The Methods paragraph, from the configuration and the run's counts (results/methods.md and .html)."""

from ctcohort.aggregate import read_contrast_record
from ctcohort.methods import RunTables, methods_paragraphs, model_description, write_methods
from ctcohort.runlog import log_to
from ctcohort.tables import read_statistics

log_to(snakemake.log[0])
tables = RunTables(
    read_statistics(snakemake.input.counts),
    read_statistics(snakemake.input.correlations),
    read_statistics(snakemake.input.versions),
    selection=read_statistics(snakemake.input.selection),
    regression=read_statistics(snakemake.input.regression),
    longitudinal=read_statistics(snakemake.input.longitudinal),
    calibration=read_statistics(snakemake.input.calibration[0]) if snakemake.input.calibration else None,
    ct_age=read_statistics(snakemake.input.ct_age),
    phases=read_statistics(snakemake.input.phases),
    contrast=read_contrast_record(snakemake.input.qc),
    acquisition=read_statistics(snakemake.input.acquisition),
    sensitivity=read_statistics(snakemake.input.sensitivity),
)
model = model_description(snakemake.params.settings["bundled_model"], snakemake.input.model)
paragraphs = methods_paragraphs(snakemake.params.settings, tables, model=model)
write_methods(paragraphs, snakemake.output.markdown, snakemake.output.html)
