# Sheet loading, validation and input functions; every other .smk uses what is defined here.
import math
import os
import sys
from dataclasses import asdict

import yaml

from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

from ctcohort import phantom
from ctcohort.aggregate import failure_summary, read_failures
from ctcohort.batches import in_batches
from ctcohort.config_check import structure_reference_problems, typed_like_schema
from ctcohort.dicom_import import is_dicom_source
from ctcohort.fingerprints import batch_fingerprint
from ctcohort.qc import QCSettings, load_plausible_volumes, plausible_volumes_path
from ctcohort.review import check_decision_subjects
from ctcohort.segment import (
    ModelFolderError,
    SegmentationSettings,
    find_model_parts,
    missing_segmentation_packages,
    model_files,
)
from ctcohort.sheet import CohortSheetError, load_cohort_sheet
from ctcohort.study_models import (
    label_map_path,
    models_description,
    study_models,
    study_structure_table,
)

# nested --config values arrive as text (Snakemake reads them with YAML's base loader): read them with the
# schema's types before validating
with open(os.path.join(workflow.basedir, "workflow", "schemas", "config.schema.yaml")) as stream:
    config.update(typed_like_schema(config, yaml.safe_load(stream)))
validate(config, "../schemas/config.schema.yaml")

# A plain path, not workflow.source_path(): that resolves to a new cache path on every run, and the
# aggregate rule's params would change each time, so nothing would ever be up to date.
SHEET_SCHEMA = os.path.join(workflow.basedir, "workflow", "schemas", "sheet.schema.yaml")
# envs/*.post-deploy.sh install ctcohort from this checkout into the rules' conda environments (--sdm conda)
os.environ.update(CTCOHORT_CHECKOUT=workflow.basedir)
DEMO = not config.get("cohort")
DEMO_DIR = "results/demo"
DEMO_SUBJECTS = phantom.subject_ids(config["demo"]["n_subjects"])
PRECOMPUTED = config["segmentation"]["method"] == "precomputed"
try:
    SEGMENTATION = SegmentationSettings.from_config(config["segmentation"])
except ValueError as err:
    raise WorkflowError(f"config section segmentation: {err}") from None

if DEMO:
    # The demo sheet is written by rule demo_cohort; its rows are known from the config alone.
    SHEET_PATH = f"{DEMO_DIR}/cohort.tsv"
    SHEET = phantom.cohort_sheet(config["demo"]["n_subjects"], config["demo"]["seed"])
    for column in ("ct", "seg", "reference"):
        SHEET[column] = [f"{DEMO_DIR}/{path}" for path in SHEET[column]]
    SHEET = SHEET.set_index("subject", drop=False)
else:
    SHEET_PATH = config["cohort"]
    try:
        SHEET = load_cohort_sheet(
            SHEET_PATH,
            SHEET_SCHEMA,
            required_files=("ct", "seg") if PRECOMPUTED else ("ct",),
            check_files=workflow.is_main_process,
        )
    except CohortSheetError as err:
        raise WorkflowError(str(err)) from None

# Rows that are the same scan (ctcohort/duplicate_scans.py; config duplicates): `error` stops the run here;
# `drop_later` leaves the later rows out of SHEET, so no job is made for them, and lists them in
# DUPLICATES_TABLE, an input of rule aggregate (failures.tsv, stage duplicate). The main process checks and
# writes the table, only when it changes (a second run has nothing to do); cluster jobs re-parse the workflow
# and read it, so that their batches hold the same scans as the main process's.
DUPLICATES_TABLE = "results/tables/duplicates.tsv"
DUPLICATES_INPUT = [DUPLICATES_TABLE] if not DEMO and config["duplicates"] == "drop_later" else []
DROPPED_SUBJECTS = []
if not DEMO:
    from ctcohort import duplicate_scans

    if workflow.is_main_process:
        DUPLICATE_GROUPS = duplicate_scans.find_duplicate_scans(SHEET)
        if DUPLICATE_GROUPS and config["duplicates"] == "error":
            raise WorkflowError(
                duplicate_scans.duplicates_message(
                    DUPLICATE_GROUPS, SHEET_PATH, duplicate_scans.sheet_lines(SHEET_PATH)
                )
            )
        if DUPLICATES_INPUT:
            duplicate_scans.write_table_if_changed(duplicate_scans.duplicates_table(DUPLICATE_GROUPS), DUPLICATES_TABLE)
            DROPPED_SUBJECTS = duplicate_scans.dropped_subjects(DUPLICATE_GROUPS)
    elif DUPLICATES_INPUT and os.path.exists(DUPLICATES_TABLE):
        DROPPED_SUBJECTS = duplicate_scans.read_duplicates(DUPLICATES_TABLE)["subject"].tolist()
    SHEET = SHEET.drop(index=DROPPED_SUBJECTS, errors="ignore")

SUBJECTS = SHEET.index.tolist()
# Scans whose ct names a DICOM series (a folder, a zip, a file list): imported to results/ct/ (import_ct.smk)
DICOM_SUBJECTS = [s for s in SUBJECTS if is_dicom_source(SHEET.at[s, "ct"])]
IMPORTED = set(DICOM_SUBJECTS)
IMPORT_BATCHES = in_batches(DICOM_SUBJECTS, config["import_ct"]["scans_per_job"])
with open(SHEET_SCHEMA) as stream:
    SUBJECT_PATTERN = yaml.safe_load(stream)["properties"]["subject"]["pattern"].strip("^$")

# The segmentation models (one, or several by name: study_models.py) and the study's structures. A bad structure
# table would otherwise fail every scan, one job at a time.
try:
    MODELS = study_models(
        "" if PRECOMPUTED else config["segmentation"]["model"],
        config["segmentation"]["task"],
        config["structures"],
    )
    STRUCTURE_TABLE = study_structure_table(MODELS)
except (ValueError, FileNotFoundError) as err:
    raise WorkflowError(f"config key structures or segmentation.model: {err}") from None
# a misspelled structure in statistics.combined or a panel would vanish or draw nothing: stop, naming the key
CONFIG_PROBLEMS = structure_reference_problems(config, STRUCTURE_TABLE["name"], models_description(MODELS))
if CONFIG_PROBLEMS:
    raise WorkflowError("\n".join(CONFIG_PROBLEMS))

if PRECOMPUTED:
    SEGMENTATION_BATCHES = []
    SEGMENTATION_MODEL_FILES = []
else:
    # Checked by the main process only, and not where rules run in their own conda environments (--sdm conda):
    # there envs/segmentation.yaml brings torch and nnunetv2, which the driver's environment need not have.
    MISSING_PACKAGES = (
        missing_segmentation_packages()
        if workflow.is_main_process
        and not any(method.name == "CONDA" for method in workflow.deployment_settings.deployment_method)
        else None
    )
    if MISSING_PACKAGES:
        raise WorkflowError(MISSING_PACKAGES)
    if not DEMO and not all(model.folder for model in MODELS):
        # The bundled model knows phantoms only; on real scans it would give plausible-looking nonsense.
        raise WorkflowError(
            "segmentation.model is empty: the bundled model is trained on phantom scans and serves the demo "
            "only. Set segmentation.model to your model folder (e.g. TotalSegmentator's weights, "
            "Dataset291_.. to Dataset295_..), or segmentation.method: precomputed to measure the sheet's "
            "seg column."
        )
    try:  # a missing or malformed model folder stops the run before any job
        parts = [part for model in MODELS for part in find_model_parts(model.folder, model.table, model.task)]
    except ModelFolderError as err:
        raise WorkflowError(str(err)) from None
    # a folder that serves two models is listed once
    SEGMENTATION_MODEL_FILES = list(dict.fromkeys(str(path) for path in model_files(parts, SEGMENTATION)))
    SEGMENTATION_BATCHES = in_batches(SUBJECTS, config["segmentation"]["scans_per_job"])

# Scans with a reference segmentation are evaluated (Dice, NSD).
EVALUATED_SUBJECTS = SHEET.index[SHEET["reference"].notna()].tolist() if "reference" in SHEET.columns else []
# Measurement of precomputed segmentations and evaluation run in batches: one job per batch, not per scan.
MEASURE_BATCHES = in_batches(SUBJECTS, config["measure"]["scans_per_job"]) if PRECOMPUTED else []
EVALUATION_BATCHES = in_batches(EVALUATED_SUBJECTS, config["evaluation"]["scans_per_job"])


wildcard_constraints:
    # the sheet's id pattern, not an alternation of every id: that regex is matched against every file
    # name in every job, and at 10,000 scans it is a 100 kB regular expression
    subject=SUBJECT_PATTERN,


def segmentation_file(subject):
    """The scan's label map (of the first model, where there are several)."""
    return SHEET.at[subject, "seg"] if PRECOMPUTED else label_map_path(subject, MODELS[0])


def segmentation_status_file(subject):
    """The status of the scan's segmentation, whose failure its later stages pass on."""
    return f"results/seg/{subject}.status.json"


def sheet_file(column):
    return lambda subject: SHEET.at[subject, column]


def ct_file(subject):
    """The scan's CT as NIfTI: the sheet's file, or the import of the sheet's DICOM series."""
    return f"results/ct/{subject}.nii.gz" if subject in IMPORTED else SHEET.at[subject, "ct"]


def import_status_file(subject):
    """The status of the scan's DICOM import, whose failure its later stages pass on; "" for a NIfTI CT."""
    return f"results/ct/{subject}.status.json" if subject in IMPORTED else ""


def import_statuses(subjects):
    """Input function: the import status files of a batch's DICOM scans (see batch_files)."""
    return batch_files(import_status_file, [s for s in subjects if s in IMPORTED])


def batch_files(file_of, subjects):
    """The files of a batch's scans, as an input function: the report prints a rule's declared inputs,
    and a list would put every scan's path there."""
    return lambda wildcards: [file_of(s) for s in subjects]


def sources_fingerprint(subjects, columns, imported=False):
    """A per-scan batch rule's param: a digest of the sheet's files it reads for ``subjects`` (``columns``; a CT
    that the workflow imported is read from results/ct/, whose changes Snakemake follows, unless ``imported``:
    the import itself), so that a file replaced by another with an older modification time reruns the batch
    (ctcohort/fingerprints.py). Main process only (cluster jobs re-parse the workflow), and not for the demo,
    whose files are the workflow's own outputs."""
    if DEMO or not workflow.is_main_process:
        return ""

    def files_of(subject):
        cells = [SHEET.at[subject, column] for column in columns if column in SHEET.columns]
        if "ct" in columns and (subject in IMPORTED) != imported:
            cells.remove(SHEET.at[subject, "ct"])
        return [cell for cell in cells if isinstance(cell, str)]

    return batch_fingerprint(subjects, {subject: files_of(subject) for subject in subjects})


def batch_runtime_min(n_scans):
    """Run time (minutes) of a job measuring or evaluating ``n_scans`` scans; a retried job gets attempt x."""
    per_scan = config["resources"]["per_scan_runtime_min"]
    return lambda wildcards, attempt: attempt * (10 + math.ceil(n_scans * per_scan))


def segmentation_runtime_min(n_scans):
    """Run time (minutes) of a job segmenting ``n_scans`` scans, each once per model; a retried job gets attempt x.
    (A factory, as batch_runtime_min: a lambda in a rule's loop would see the loop's last batch.)"""
    minutes = config["segmentation"]["runtime_per_scan_min"] * n_scans * len(MODELS)
    return lambda wildcards, attempt: attempt * minutes


# Quality control (qc.py): written beside each scan's measurement by the job that measures it; the
# cohort-wide checks and the reviewer's decisions in the aggregate rule (review.py)
try:
    QC = QCSettings.from_config(config)
except ValueError as err:
    raise WorkflowError(f"config section qc: {err}") from None
QC_PREVIEW_WIDTH = QC.preview_width or 0
try:  # a bad table would otherwise fail the cohort's aggregation at the end of the run
    PLAUSIBLE_VOLUMES = plausible_volumes_path(QC.plausible_volumes)
    load_plausible_volumes(PLAUSIBLE_VOLUMES)
    PLAUSIBLE_VOLUMES = [str(PLAUSIBLE_VOLUMES)] if PLAUSIBLE_VOLUMES else []
except (ValueError, FileNotFoundError) as err:
    raise WorkflowError(f"config key qc.plausible_volumes: {err}") from None
# A reviewer's decisions (review.py): read here, so that a misspelt subject or a bad line stops the run before
# any job; the structures are checked where the cohort is joined
REVIEW_DECISIONS = [QC.review_decisions] if QC.review_decisions else []
if REVIEW_DECISIONS:
    try:
        check_decision_subjects(QC.review_decisions, SUBJECTS)
    except (ValueError, OSError) as err:
        raise WorkflowError(f"config key qc.review_decisions: {err}") from None


def qc_outputs(subjects):
    """A measuring job's QC outputs per scan: the table, and the preview where previews are on."""
    outputs = {"qc": [f"results/qc/{s}.tsv" for s in subjects]}
    if QC_PREVIEW_WIDTH:
        outputs["previews"] = [f"results/qc/{s}.png" for s in subjects]
    return outputs


def per_scan(pattern):
    return expand(pattern, subject=SUBJECTS)


def figure_outputs(name):
    """A figure's PNG (registered in the report with its caption) and SVG."""
    return {
        "png": report(f"results/figures/{name}.png", caption=f"../report/{name}.rst", category="Figures"),
        "svg": f"results/figures/{name}.svg",
    }


# the study's figures, each as .png and .svg (figures.smk)
FIGURES = [
    *(["age_quartile_boxplots"] if config["figures"]["boxplots"] else []),
    "rs_forest_plot",
    "rs_heatmap",
    *(["scatter_lowess", "trajectories"] if config["figures"]["scatter"] else []),
    *(["normative_charts", "normative_calibration"] if config["normative"]["panels"] else []),
    "ct_age",
    "acquisition_mix",
]


def study_outputs():
    return [
        "results/tables/measurements.tsv",
        "results/tables/measurements.parquet",
        "results/tables/failures.tsv",
        "results/tables/qc_summary.tsv",
        "results/tables/qc.tsv",
        "results/tables/exclusion_flow.tsv",
        "results/tables/contrast_phase.tsv",
        *(per_scan("results/qc/{subject}.png") if QC_PREVIEW_WIDTH else []),
        "results/qc/review.html",
        "results/tables/software_versions.tsv",
        *(["results/tables/ct_import.tsv"] if DICOM_SUBJECTS else []),
        "results/stats/age_correlations.tsv",
        "results/stats/partial_correlations.tsv",
        "results/stats/by_sex.tsv",
        "results/stats/regression.tsv",
        "results/stats/longitudinal.tsv",
        "results/stats/paper_comparison.tsv",
        "results/stats/group_summary.tsv",
        "results/stats/acquisition.tsv",
        "results/stats/acquisition_by_decade.tsv",
        "results/stats/sensitivity_acquisition.tsv",
        *(
            ["results/stats/normative_charts.tsv", "results/stats/centile_scores.tsv"]
            if config["normative"]["panels"]
            else []
        ),
        "results/stats/ct_age.tsv",
        "results/stats/ct_age_summary.tsv",
        *(f"results/figures/{name}.png" for name in FIGURES),
        "results/methods.md",
        *(["results/evaluation/dice_summary.tsv"] if EVALUATED_SUBJECTS else []),
    ]


def print_failure_summary():
    """At the end of a run: how many scans were left out and where the causes are (a run that
    records failures exits 0, so without this a user would not notice)."""
    for path in ("results/tables/failures.tsv", "results/evaluation/failures.tsv"):
        if os.path.exists(path):
            line = failure_summary(read_failures(path), len(SUBJECTS) + len(DROPPED_SUBJECTS), path)
            if line:
                print(line, file=sys.stderr)
