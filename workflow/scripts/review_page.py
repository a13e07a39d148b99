"""The review page: the cohort's scans ranked by their review score, with their flags."""

from ctcohort.aggregate import read_cohort_qc, read_failures
from ctcohort.review import review_flags, review_scans
from ctcohort.review_page import write_review_page
from ctcohort.runlog import log_to

log_to(snakemake.log[0])
qc = read_cohort_qc(snakemake.input.qc)
failures = read_failures(snakemake.input.failures)
subjects = [*dict.fromkeys([*qc["subject"].astype(str), *failures["subject"]])]
flags = review_flags(qc)
scans = review_scans(subjects, qc, flags, failures)
scans["preview"] = [f"{subject}.png" if snakemake.params.previews else "" for subject in scans["subject"]]
scans.to_csv(snakemake.output.scans, sep="\t", index=False, na_rep="NaN", float_format="%.4g")
flags.to_csv(snakemake.output.flags, sep="\t", index=False)
write_review_page(scans, flags, snakemake.output.page)
