# Acquisition (kVp, kernel, scanner, year, phase) as a confounder of age (ctcohort.acquisition): its association
# with age, its mix by age decade, and the primary analysis adjusted for it.


localrules:
    acquisition,
    figure_acquisition_mix,


rule acquisition:
    input:
        measurements=rules.aggregate.output.measurements,
        selection=rules.scan_selection.output[0],
    output:
        association=report(
            "results/stats/acquisition.tsv",
            caption="../report/acquisition.rst",
            category="Acquisition",
        ),
        by_decade="results/stats/acquisition_by_decade.tsv",
        sensitivity=report(
            "results/stats/sensitivity_acquisition.tsv",
            caption="../report/sensitivity_acquisition.rst",
            category="Acquisition",
        ),
    log:
        "results/logs/acquisition.log",
    conda:
        "../../envs/analysis.yaml"
    params:
        statistics=config["statistics"],  # StatisticsSettings
    script:
        "../scripts/acquisition.py"


rule figure_acquisition_mix:
    input:
        rules.acquisition.output.by_decade,
    output:
        **figure_outputs("acquisition_mix"),
    log:
        "results/logs/figure_acquisition_mix.log",
    conda:
        "../../envs/analysis.yaml"
    script:
        "../scripts/figure_acquisition_mix.py"
