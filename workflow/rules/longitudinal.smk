# Within-patient change from repeated scans (ctcohort.longitudinal): a linear mixed model per structure x
# measure on every scan of the patients with two or more, and the patients' trajectories as a figure.


localrules:
    longitudinal,
    figure_trajectories,


rule longitudinal:
    input:
        rules.aggregate.output.measurements,
    output:
        report(
            "results/stats/longitudinal.tsv",
            caption="../report/longitudinal.rst",
            category="Longitudinal change",
        ),
    log:
        "results/logs/longitudinal.log",
    conda:
        "../../envs/analysis.yaml"
    params:
        measures=config["statistics"]["measures"],
        covariates=config["longitudinal"]["covariates"],
        min_patients=config["longitudinal"]["min_patients"],
        random_slope=config["longitudinal"]["random_slope"],
        correction=config["statistics"]["correction"],
        alpha=config["statistics"]["alpha"],
    script:
        "../scripts/longitudinal.py"


rule figure_trajectories:
    input:
        rules.aggregate.output.measurements,
    output:
        **figure_outputs("trajectories"),
    log:
        "results/logs/figure_trajectories.log",
    conda:
        "../../envs/analysis.yaml"
    params:
        panels=config["figures"]["scatter"],
    script:
        "../scripts/figure_trajectories.py"
