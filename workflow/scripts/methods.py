"""The Methods paragraph, from the configuration and the run's counts (results/methods.md and .html)."""

from ctcohort.methods import RunTables, methods_paragraphs, model_description, write_methods
from ctcohort.runlog import log_to
from ctcohort.stats import read_table

log_to(snakemake.log[0])
tables = RunTables(
    read_table(snakemake.input.counts),
    read_table(snakemake.input.correlations),
    read_table(snakemake.input.versions),
    selection=read_table(snakemake.input.selection),
    regression=read_table(snakemake.input.regression),
    longitudinal=read_table(snakemake.input.longitudinal),
    calibration=read_table(snakemake.input.calibration[0]) if snakemake.input.calibration else None,
    ct_age=read_table(snakemake.input.ct_age),
)
model = model_description(snakemake.params.settings["bundled_model"], snakemake.input.model)
paragraphs = methods_paragraphs(snakemake.params.settings, tables, model=model)
write_methods(paragraphs, snakemake.output.markdown, snakemake.output.html)
