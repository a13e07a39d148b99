# The review page (results/qc/review.html): every scan as a card with its preview and flags, the scans to look
# at first on top (review.py); its decisions come back through qc.review_decisions (rule aggregate).


localrules:
    review_page,


rule review_page:
    input:
        qc=rules.aggregate.output.qc_table,
        failures=rules.aggregate.output.failures,
    output:
        page="results/qc/review.html",
        scans="results/tables/review_scans.tsv",
        flags="results/tables/review_flags.tsv",
    log:
        "results/logs/review_page.log",
    conda:
        "../../envs/analysis.yaml"
    params:
        previews=bool(QC_PREVIEW_WIDTH),  # the page shows results/qc/{subject}.png, beside it
    script:
        "../scripts/review_page.py"
