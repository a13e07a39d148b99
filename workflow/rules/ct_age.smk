# CT age (ctcohort.ct_age): each scan's age predicted from its measurements, every prediction out of fold
# (folds by patient, trained on one scan per patient), the age gap corrected for regression to the mean.
from ctcohort.ct_age import CtAgeSettings

try:  # a contradiction in the section would otherwise fail the run at its end
    CtAgeSettings.from_config(config["ct_age"])
except ValueError as err:
    raise WorkflowError(f"config section ct_age: {err}") from None


localrules:
    ct_age,
    figure_ct_age,


rule ct_age:
    input:
        measurements=rules.aggregate.output.measurements,
        selection=rules.scan_selection.output[0],
    output:
        table=report("results/stats/ct_age.tsv", caption="../report/ct_age_table.rst", category="CT age"),
        summary=report(
            "results/stats/ct_age_summary.tsv",
            caption="../report/ct_age_summary.rst",
            category="CT age",
        ),
    log:
        "results/logs/ct_age.log",
    conda:
        "../../envs/analysis.yaml"
    threads: config["ct_age"]["threads"]
    params:
        settings=config["ct_age"],
    script:
        "../scripts/ct_age.py"


rule figure_ct_age:
    input:
        table=rules.ct_age.output.table,
        summary=rules.ct_age.output.summary,
    output:
        **figure_outputs("ct_age"),
    log:
        "results/logs/figure_ct_age.log",
    conda:
        "../../envs/analysis.yaml"
    script:
        "../scripts/figure_ct_age.py"
