# The study's figures, each as PNG (in the report) and SVG (for a journal): the paper's age-quartile box plots,
# a forest plot and a heatmap of rs, scatter plots with LOWESS curves by sex, the normative charts and their
# calibration (worm plots).


localrules:
    figure_age_quartile_boxplots,
    figure_rs_forest_plot,
    figure_rs_heatmap,
    figure_scatter_lowess,
    figure_normative_charts,
    figure_normative_calibration,


rule figure_age_quartile_boxplots:
    input:
        measurements=rules.aggregate.output.measurements,
        selection=rules.scan_selection.output[0],
        correlations=rules.age_correlations.output[0],
    output:
        **figure_outputs("age_quartile_boxplots"),
    log:
        "results/logs/figure_age_quartile_boxplots.log",
    conda:
        "../../envs/analysis.yaml"
    params:
        panels=config["figures"]["boxplots"],
        age_edges=config["figures"]["age_edges"],
    script:
        "../scripts/figure_age_quartile_boxplots.py"


rule figure_rs_forest_plot:
    input:
        rules.age_correlations.output[0],
    output:
        **figure_outputs("rs_forest_plot"),
    log:
        "results/logs/figure_rs_forest_plot.log",
    conda:
        "../../envs/analysis.yaml"
    params:
        measures=config["figures"]["overview_measures"],
    script:
        "../scripts/figure_rs_forest_plot.py"


rule figure_rs_heatmap:
    input:
        rules.age_correlations.output[0],
    output:
        **figure_outputs("rs_heatmap"),
    log:
        "results/logs/figure_rs_heatmap.log",
    conda:
        "../../envs/analysis.yaml"
    params:
        measures=config["statistics"]["measures"],
    script:
        "../scripts/figure_rs_heatmap.py"


rule figure_scatter_lowess:
    input:
        measurements=rules.aggregate.output.measurements,
        selection=rules.scan_selection.output[0],
    output:
        **figure_outputs("scatter_lowess"),
    log:
        "results/logs/figure_scatter_lowess.log",
    conda:
        "../../envs/analysis.yaml"
    params:
        panels=config["figures"]["scatter"],
    script:
        "../scripts/figure_scatter_lowess.py"


rule figure_normative_charts:
    input:
        charts=rules.normative_charts.output.charts,
        coefficients=rules.normative_charts.output.coefficients,
        measurements=rules.aggregate.output.measurements,
        selection=rules.scan_selection.output[0],
    output:
        **figure_outputs("normative_charts"),
    log:
        "results/logs/figure_normative_charts.log",
    conda:
        "../../envs/analysis.yaml"
    params:
        panels=config["normative"]["panels"],
    script:
        "../scripts/figure_normative_charts.py"


rule figure_normative_calibration:
    input:
        calibration=rules.normative_charts.output.calibration,
        scores=rules.normative_charts.output.scores,
    output:
        **figure_outputs("normative_calibration"),
    log:
        "results/logs/figure_normative_calibration.log",
    conda:
        "../../envs/analysis.yaml"
    script:
        "../scripts/figure_normative_calibration.py"
