"""The CT-age figure: predicted against true age, and the corrected gaps per structure group."""

from ctcohort.ct_age_figure import plot_ct_age
from ctcohort.runlog import log_to
from ctcohort.tables import read_statistics

log_to(snakemake.log[0])
plot_ct_age(
    read_statistics(snakemake.input.table),
    read_statistics(snakemake.input.summary),
    [snakemake.output.png, snakemake.output.svg],
)
