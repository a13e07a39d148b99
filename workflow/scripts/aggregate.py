"""Join every scan's measurements with the sheet's covariates; list failed scans."""

from ctcohort import aggregate
from ctcohort.runlog import log_to
from ctcohort.sheet import load_cohort_sheet

log_to(snakemake.log[0])
sheet = load_cohort_sheet(snakemake.input.sheet, snakemake.params.schema)
failures = aggregate.collect_failures(snakemake.input.statuses)
paths = dict(zip(snakemake.params.subjects, snakemake.input.measurements))
measurements = aggregate.cohort_measurements(sheet, paths, set(failures["subject"]))

measurements.to_csv(snakemake.output.measurements, sep="\t", index=False, na_rep="NaN", float_format="%.10g")
measurements.to_parquet(snakemake.output.parquet, index=False)
failures.to_csv(snakemake.output.failures, sep="\t", index=False)
aggregate.qc_summary(measurements).to_csv(snakemake.output.qc, sep="\t", index=False)
