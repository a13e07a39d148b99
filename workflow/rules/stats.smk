# Spearman correlation of every structure's measures with age.


localrules:
    age_correlations,


rule age_correlations:
    input:
        "results/tables/measurements.tsv",
    output:
        report(
            "results/stats/age_correlations.tsv",
            caption="../report/age_correlations.rst",
            category="Age correlations",
        ),
    params:
        measures=config["statistics"]["measures"],
        correction=config["statistics"]["correction"],
        alpha=config["statistics"]["alpha"],
        partial_covariates=config["statistics"]["partial_covariates"],
        min_n=config["statistics"]["min_n"],
    log:
        "results/logs/age_correlations.log",
    conda:
        "../../envs/analysis.yaml"
    script:
        "../scripts/age_correlations.py"
