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
