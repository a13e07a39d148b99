"""Each chosen structure's measure over age, one line per patient with two or more scans."""

from ctcohort.patients import read_scans
from ctcohort.runlog import log_to
from ctcohort.trajectory_figure import plot_trajectories

log_to(snakemake.log[0])
plot_trajectories(read_scans(snakemake.input[0]), snakemake.params.panels, snakemake.output.png, snakemake.output.svg)
