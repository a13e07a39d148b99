# Paper-style figures: age-group box plots and the rs overview.


localrules:
    figure_age_boxplots,
    figure_correlation_overview,


rule figure_age_boxplots:
    input:
        measurements="results/tables/measurements.tsv",
        correlations="results/stats/age_correlations.tsv",
    output:
        png=report(
            "results/figures/age_boxplots.png",
            caption="../report/age_boxplots.rst",
            category="Figures",
        ),
        svg="results/figures/age_boxplots.svg",
    params:
        panels=config["figures"]["boxplots"],
        age_edges=config["figures"]["age_edges"],
    log:
        "results/logs/figure_age_boxplots.log",
    conda:
        "../../envs/analysis.yaml"
    script:
        "../scripts/figure_age_boxplots.py"


rule figure_correlation_overview:
    input:
        "results/stats/age_correlations.tsv",
    output:
        png=report(
            "results/figures/correlation_overview.png",
            caption="../report/correlation_overview.rst",
            category="Figures",
        ),
        svg="results/figures/correlation_overview.svg",
    params:
        measures=config["figures"]["overview_measures"],
    log:
        "results/logs/figure_correlation_overview.log",
    conda:
        "../../envs/analysis.yaml"
    script:
        "../scripts/figure_correlation_overview.py"
