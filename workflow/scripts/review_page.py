"""The review page: the cohort's scans ranked by their review score, with their flags."""

from ctcohort.aggregate import read_cohort_qc, read_failures
from ctcohort.review import review_flags, review_scans
from ctcohort.review_page import write_review_page
from ctcohort.runlog import log_to
from ctcohort.tables import BLANK, REVIEW_DIGITS, write_tsv

log_to(snakemake.log[0])
qc = read_cohort_qc(snakemake.input.qc)
failures = read_failures(snakemake.input.failures)
subjects = [*dict.fromkeys([*qc["subject"].astype(str), *failures["subject"]])]
flags = review_flags(qc)
scans = review_scans(subjects, qc, flags, failures)
scans["preview"] = [f"{subject}.png" if snakemake.params.previews else "" for subject in scans["subject"]]
write_tsv(scans, snakemake.output.scans, REVIEW_DIGITS)
write_tsv(flags, snakemake.output.flags, missing=BLANK)
write_review_page(scans, flags, snakemake.output.page)
