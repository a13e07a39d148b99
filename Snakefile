# ctcohort: a cohort of CT scans -> per-structure volume and attenuation -> age statistics, figures, report.
# This file only sets up; the rules live in workflow/rules/, the logic in src/ctcohort/.
from snakemake.utils import min_version

min_version("9.0")


configfile: "config/config.yaml"


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/demo.smk"
include: "workflow/rules/import_ct.smk"
include: "workflow/rules/segment.smk"
include: "workflow/rules/measure.smk"
include: "workflow/rules/aggregate.smk"
include: "workflow/rules/review.smk"
include: "workflow/rules/stats.smk"
include: "workflow/rules/acquisition.smk"
include: "workflow/rules/ct_age.smk"
include: "workflow/rules/longitudinal.smk"
include: "workflow/rules/figures.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/report.smk"


onsuccess:
    print_failure_summary()


rule all:
    default_target: True
    input:
        study_outputs(),
