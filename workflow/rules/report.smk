# Provenance for the report: the software behind the numbers.


localrules:
    software_versions,


rule software_versions:
    output:
        report(
            "results/tables/software_versions.tsv",
            caption="../report/software_versions.rst",
            category="Provenance",
        ),
    log:
        "results/logs/software_versions.log",
    conda:
        "../../envs/analysis.yaml"
    script:
        "../scripts/software_versions.py"


# The Methods paragraph, from the configuration and this run's counts (ctcohort.methods).


localrules:
    methods,


rule methods:
    input:
        counts=rules.aggregate.output.exclusions,
        correlations=rules.age_correlations.output[0],
        selection=rules.scan_selection.output[0],
        regression=rules.regression.output[0],
        longitudinal=rules.longitudinal.output[0],
        # how many scans made each chart; [] without panels
        calibration=lambda wildcards: (
            [rules.normative_charts.output.calibration] if config["normative"]["panels"] else []
        ),
        ct_age=rules.ct_age.output.summary,
        phases=rules.aggregate.output.phases,
        qc=rules.aggregate.output.qc_table,  # where each scan's contrast came from, and its check
        acquisition=rules.acquisition.output.association,
        sensitivity=rules.acquisition.output.sensitivity,
        versions=rules.software_versions.output[0],
        model=lambda wildcards: SEGMENTATION_MODEL_FILES,  # its checksum is quoted
    output:
        markdown="results/methods.md",
        html=report("results/methods.html", caption="../report/methods.rst", category="Methods"),
    log:
        "results/logs/methods.log",
    conda:
        "../../envs/analysis.yaml"
    params:
        # no paths (the sheet's, the model folder's): the report shows a rule's params
        settings={
            "demo": DEMO,
            "patient_column": "patient" in SHEET.columns,
            "bundled_model": not any(model.folder for model in MODELS),
            "segmentation": {k: v for k, v in config["segmentation"].items() if k != "model"},
            "models": [model.name for model in MODELS if model.name],
            # a table's name, not where it lies
            "structures": models_description(MODELS),
            "qc": {
                **config["qc"],
                "plausible_volumes": os.path.basename(str(config["qc"]["plausible_volumes"] or "")),
            },
            **{key: config[key] for key in ("measure", "statistics", "normative", "longitudinal", "ct_age")},
        },
    script:
        "../scripts/methods.py"
