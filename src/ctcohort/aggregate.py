"""Cohort tables: every scan's measurements joined with the sheet's covariates."""

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from ctcohort.columns import EXCLUSION_REASONS, GEOMETRY_COLUMNS, MEASURE_COLUMNS, MODEL_COLUMN, REVIEWER_EXCLUDED
from ctcohort.contrast_phase import CONTRAST_QC_COLUMNS
from ctcohort.measure import read_measurements
from ctcohort.qc import QCSettings, read_qc
from ctcohort.review import SANITY_FLAGS, review_column, sanity_flags
from ctcohort.scan_status import ScanStatus, read_status
from ctcohort.sheet import covariate_columns
from ctcohort.tables import MISSING, NOTHING_MISSING, read_tsv

FAILURE_COLUMNS = ["subject", "stage", "error"]
SUMMARY_MEASURES = ("volume_ml", "hu_mean", "hu_median", "hu_std", "hu_mean_eroded")
SUMMARY_COLUMNS = ["structure", "group", "measure", "n", "mean", "sd", "q25", "median", "q75"]
# Stages a scan can fail at, in the order it meets them (failures at other stages follow)
STAGES = ("import_ct", "segment", "measure")
QC_TABLE_COLUMNS = [
    "subject",
    "structure",
    "label",
    "group",
    "n_voxels",
    "volume_ml_measured",
    "hu_mean_measured",
    "complete",
    "cut_faces",
    "volume_implausible",
    "hu_implausible",
    "exclusion_reason",
    "cranial_vertebra",
    "caudal_vertebra",
    *GEOMETRY_COLUMNS,
    "sform_qform_mm",
    *SANITY_FLAGS,
    "volume_z",
    "review",
]
# Why a measure is NaN: per measure, the exclusion reasons that remove it (in order of precedence)
HU_REASONS = ("absent", "too_small", "hu_nonfinite", "implausible_hu", REVIEWER_EXCLUDED)
# exclusion_reason of a combined structure's row with a NaN measure (combine_structures)
MEMBER_MISSING = "member_missing"
# the measures of a combined row that need every member; its hu_median is always NaN
COMBINED_MEASURES = ("volume_ml", "hu_mean", "hu_std", "hu_mean_eroded")
log = logging.getLogger(__name__)


def collect_failures(status_paths: Sequence[str | Path]) -> pd.DataFrame:
    """subject, stage, error of every failed per-scan step."""
    return failure_table([read_status(p) for p in status_paths])


def failure_table(statuses: Sequence[ScanStatus]) -> pd.DataFrame:
    """subject, stage, error of the failed ones among ``statuses``."""
    rows = [(s.subject, s.stage, s.error) for s in statuses if not s.ok]
    return pd.DataFrame(rows, columns=FAILURE_COLUMNS)


def read_scan_measurements(measurement_paths: Mapping[str, str | Path]) -> dict[str, pd.DataFrame]:
    """Every scan's own measurement table by subject (a failed scan's is empty), read once for the cohort."""
    return {subject: read_measurements(path) for subject, path in measurement_paths.items()}


def cohort_measurements(
    sheet: pd.DataFrame, measurement_paths: Mapping[str, str | Path], failed: set[str]
) -> pd.DataFrame:
    """One row per subject x structure: covariates first, then the measures. Failed scans are left out."""
    measured = {subject: path for subject, path in measurement_paths.items() if subject not in failed}
    return join_covariates(sheet, read_scan_measurements(measured), failed)


def join_covariates(sheet: pd.DataFrame, tables: Mapping[str, pd.DataFrame], failed: set[str]) -> pd.DataFrame:
    """``cohort_measurements`` of tables already read (``read_scan_measurements``)."""
    kept = {subject: table for subject, table in tables.items() if subject not in failed}
    covariates = sheet[["subject", *covariate_columns(sheet)]].reset_index(drop=True)
    if not kept:
        return pd.DataFrame(columns=[*covariates.columns, *MEASURE_COLUMNS])
    # the subject as a key of the one concatenation, not a column added to a copy of each of 10,000 tables
    measured = pd.concat(kept.values(), keys=list(kept), names=["subject", None]).reset_index(level="subject")
    return covariates.merge(measured.reset_index(drop=True), on="subject", how="inner", validate="one_to_many")


def combine_structures(measurements: pd.DataFrame, combined: Mapping[str, Sequence[str]]) -> pd.DataFrame:
    """Rows of combined structures (e.g. kidneys = kidney_left + kidney_right), one per subject and
    combination, with the columns of ``measurements`` (a cohort table: subject, covariates, the
    MEASURE_COLUMNS), computed from the member rows of the same subject:

    - ``volume_ml``: the sum of the members' volumes.
    - ``hu_mean``: the voxel-weighted mean of the members' means (weights ``n_voxels``): the mean over
      the union of the members' voxels, exactly.
    - ``hu_std``: the pooled standard deviation over the union, exact from each member's n, mean and
      (population) standard deviation: sqrt(sum n_i (std_i^2 + (mean_i - mean)^2) / sum n_i).
    - ``hu_mean_eroded``: the members' eroded means weighted by ``n_voxels`` too. The members' interior
      voxel counts are not in the table, so this equals the eroded mean of the union only where the
      members have the same share of interior voxels (left and right of a pair nearly do); it is an
      approximation.
    - ``hu_median``: NaN. A median of a union cannot be computed from the members' medians.
    - ``n_voxels``: the sum of the members' voxel counts (an absent member counts 0, as its own row says).
    - ``complete``: every member complete (NA where a member is absent).

    A measure is defined only when every member has a finite value for it; otherwise it is NaN and
    the row's ``exclusion_reason`` is MEMBER_MISSING (it is "" where all of COMBINED_MEASURES are
    numbers). So a combination with a member cut off by the field of view has no volume, and its HU
    measures where the members' are kept. ``label`` is NaN (no label id), ``group`` the members'
    group where they share one, else "". A combination with a member that the structure table does not
    list at all is skipped with a warning; a name that is already a structure is an error.
    """
    known = set(measurements["structure"])
    clash = sorted(set(combined) & known)
    if clash:
        raise ValueError(f"combined structure name(s) {clash} are structures of the table already; choose other names")
    covariates = [c for c in measurements.columns if c not in (MODEL_COLUMN, *MEASURE_COLUMNS)]
    subjects = measurements.drop_duplicates("subject")[covariates].reset_index(drop=True)
    frames = []
    for name, members in combined.items():
        members = list(members)
        unknown = [m for m in members if m not in known]
        if unknown:
            log.warning("combined structure %s left out: member(s) %s not in the measurements", name, unknown)
            continue
        rows = measurements[measurements["structure"].isin(members)]
        wide = rows.set_index(["subject", "structure"])

        def values(column, wide=wide, members=members):
            return wide[column].unstack().reindex(index=subjects["subject"], columns=members).to_numpy(dtype=float)

        total, out = _pooled_measures(values)
        complete = wide["complete"].astype("boolean").unstack().reindex(index=subjects["subject"], columns=members)
        groups = set(rows["group"].fillna("").astype(str))
        models = set(rows[MODEL_COLUMN].astype(str)) if MODEL_COLUMN in rows.columns else set()
        model = {MODEL_COLUMN: models.pop() if len(models) == 1 else ""} if models else {}  # the members' one
        frame = subjects.assign(
            **model,
            structure=name,
            label=np.nan,
            group=groups.pop() if len(groups) == 1 else "",
            n_voxels=total,
            volume_ml=out["volume_ml"],
            hu_mean=out["hu_mean"],
            hu_median=np.nan,
            hu_std=out["hu_std"],
            hu_mean_eroded=out["hu_mean_eroded"],
            complete=pd.array(
                np.where(complete.isna().any(axis=1), pd.NA, complete.fillna(True).all(axis=1)), dtype="boolean"
            ),
            exclusion_reason=np.where(np.isnan(np.column_stack(list(out.values()))).any(axis=1), MEMBER_MISSING, ""),
        )
        frames.append(frame[list(measurements.columns)])
    if not frames:
        return measurements.iloc[:0].copy()
    return pd.concat(frames, ignore_index=True)


def _pooled_measures(values) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The members' total voxel count and the combined measures (see ``combine_structures``), per subject, from
    ``values(column)``: a subject x member array of each measure."""
    n = values("n_voxels")
    with np.errstate(invalid="ignore", divide="ignore"):
        total = n.sum(axis=1)
        volume, mean, std, eroded = (values(c) for c in ("volume_ml", "hu_mean", "hu_std", "hu_mean_eroded"))
        combined_mean = (n * mean).sum(axis=1) / total
        pooled = (n * (std**2 + (mean - combined_mean[:, None]) ** 2)).sum(axis=1) / total
        out = {
            "volume_ml": np.where(np.isfinite(volume).all(axis=1), volume.sum(axis=1), np.nan),
            "hu_mean": np.where(np.isfinite(mean).all(axis=1), combined_mean, np.nan),
            "hu_std": np.where(np.isfinite(mean).all(axis=1) & np.isfinite(std).all(axis=1), np.sqrt(pooled), np.nan),
            "hu_mean_eroded": np.where(np.isfinite(eroded).all(axis=1), (n * eroded).sum(axis=1) / total, np.nan),
        }
    return total, out


def add_combined(measurements: pd.DataFrame, combined: Mapping[str, Sequence[str]]) -> pd.DataFrame:
    """``measurements`` followed by the rows of ``combine_structures``, which the statistics then treat
    like any structure."""
    rows = combine_structures(measurements, combined)
    if rows.empty:
        return measurements
    return pd.concat([measurements, rows], ignore_index=True)


def qc_summary(measurements: pd.DataFrame) -> pd.DataFrame:
    """Per structure: scans measured, and how many were excluded for each reason."""
    counts = pd.crosstab(
        [measurements["structure"], measurements["group"]],
        measurements["exclusion_reason"].replace("", "measured"),
    )
    for column in ("measured", *EXCLUSION_REASONS):
        if column not in counts.columns:
            counts[column] = 0
    counts = counts[["measured", *EXCLUSION_REASONS]].reset_index()
    counts.insert(2, "n_scans", counts[["measured", *EXCLUSION_REASONS]].sum(axis=1))
    order = measurements.drop_duplicates("structure")["structure"]
    return counts.set_index("structure").loc[order].reset_index()


def measurement_summary(measurements: pd.DataFrame, measures=SUMMARY_MEASURES) -> pd.DataFrame:
    """Per structure and measure: n (finite values), mean, SD, quartiles. What the report shows in place
    of the full table, which at thousands of scans is too big to embed and carries every covariate."""
    long = measurements.melt(id_vars=["structure", "group"], value_vars=list(measures), var_name="measure")
    long = long[pd.to_numeric(long["value"], errors="coerce").notna()].astype({"value": float})
    if long.empty:
        return pd.DataFrame(columns=SUMMARY_COLUMNS)
    stats = (
        long.groupby(["structure", "group", "measure"], sort=False, dropna=False)["value"]
        .agg(
            n="count",
            mean="mean",
            sd="std",
            q25=lambda v: v.quantile(0.25),
            median="median",
            q75=lambda v: v.quantile(0.75),
        )
        .reset_index()
    )
    return stats[SUMMARY_COLUMNS]


def exclusion_counts(n_scans: int, failures: pd.DataFrame, measurements: pd.DataFrame) -> pd.DataFrame:
    """How many scans were measured or failed (by stage), and how many structure measurements were
    excluded (by reason): the counts a reader of the report checks first."""
    rows = [("scans", "in the sheet", n_scans), ("scans", "measured", n_scans - failures["subject"].nunique())]
    # rows dropped as the same scan as an earlier row (duplicate_scans.py) were never processed: "dropped"
    rows += [
        ("scans", f"{'dropped' if stage == 'duplicate' else 'failed'}: {stage}", int(count))
        for stage, count in failures["stage"].value_counts().items()
    ]
    # a sheet may leave age or sex blank (de-identified exports): such scans are measured and left out of
    # the analyses that need the value
    scans = measurements.drop_duplicates("subject")
    rows += [
        ("scans", f"measured, no {column}", int(scans[column].isna().sum()))
        for column in ("age", "sex")
        if column in scans.columns
    ]
    whole_scan = (measurements["exclusion_reason"] == REVIEWER_EXCLUDED).groupby(measurements["subject"]).all()
    rows.append(("scans", f"measured, {REVIEWER_EXCLUDED}", int(whole_scan.sum())))
    reasons = measurements["exclusion_reason"].fillna("").replace("", "measured").value_counts()
    rows += [("structures", reason, int(reasons.get(reason, 0))) for reason in ("measured", *EXCLUSION_REASONS)]
    rows += [
        ("structures", reason, int(count))
        for reason, count in reasons.items()
        if reason not in ("measured", *EXCLUSION_REASONS)
    ]
    return pd.DataFrame(rows, columns=["level", "kind", "count"])


def failure_summary(failures: pd.DataFrame, n_scans: int, table_path: str | Path) -> str | None:
    """One line for the console at the end of a run that left scans out (None when none failed)."""
    if failures.empty:
        return None
    stages = ", ".join(f"{stage}: {count}" for stage, count in failures["stage"].value_counts().items())
    return (
        f"ctcohort: {failures['subject'].nunique()} of {n_scans} scans failed and are left out of the study "
        f"({stages}); the causes are in {table_path}"
    )


def read_failures(path: str | Path) -> pd.DataFrame:
    return read_tsv(path, NOTHING_MISSING, dtype=str)


def cohort_qc(
    measured: pd.DataFrame,
    checked: pd.DataFrame,
    qc_paths: dict[str, str | Path],
    settings: QCSettings = QCSettings(),
    decisions: pd.DataFrame | None = None,
    contrast: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """One row per subject x structure of the cohort (QC_TABLE_COLUMNS): the values as measured, the
    faces that cut the structure (qc.cut_faces), the plausibility flags and final exclusion reason of
    ``checked`` (``qc.apply_plausibility`` of ``measured``, then the reviewer's decisions), the scan's
    vertebral coverage, the geometry of each structure and the sanity checks made from it
    (``review.sanity_flags``, with the sheet's age and sex), and the reviewer's decision; with ``contrast``
    (``contrast_phase.resolve_contrast``'s table, where some scan has a phase estimate) also each scan's
    CONTRAST_QC_COLUMNS, after the others."""
    subjects = set(measured["subject"])
    frames = [read_qc(path).assign(subject=subject) for subject, path in qc_paths.items() if subject in subjects]
    covariates = [c for c in ("age", "sex") if c in checked.columns]
    model = [MODEL_COLUMN] if MODEL_COLUMN in checked.columns else []
    table = checked[
        [
            "subject",
            *model,
            "structure",
            "label",
            "group",
            "n_voxels",
            "complete",
            "volume_implausible",
            "hu_implausible",
            "exclusion_reason",
            *covariates,
        ]
    ].copy()
    table["volume_ml_measured"] = measured["volume_ml"].to_numpy()
    table["hu_mean_measured"] = measured["hu_mean"].to_numpy()
    if frames:
        qc = pd.concat(frames, ignore_index=True).drop(columns="label")
        table = table.merge(qc, on=["subject", "structure"], how="left", validate="one_to_one")
    else:
        table = table.assign(
            cut_faces="",
            cranial_vertebra="",
            caudal_vertebra="",
            sform_qform_mm=np.nan,
            **{column: np.nan for column in GEOMETRY_COLUMNS},
        )
    table = pd.concat([table, sanity_flags(table, settings)], axis=1)
    table["review"] = review_column(table, decisions)
    table = table[["subject", *model, *QC_TABLE_COLUMNS[1:]]]
    if contrast is None:
        return table
    scans = contrast[["subject", *CONTRAST_QC_COLUMNS]]
    return table.merge(scans, on="subject", how="left", validate="many_to_one")


def read_cohort_qc(path: str | Path) -> pd.DataFrame:
    """qc.tsv as ``cohort_qc`` wrote it: ids and text as text ("007" is an id), "NaN" a missing number."""
    text = [
        "subject",
        MODEL_COLUMN,
        "structure",
        "group",
        "cut_faces",
        "exclusion_reason",
        "cranial_vertebra",
        "caudal_vertebra",
        "review",
        "contrast_source",
    ]
    numbers = [c for c in [*QC_TABLE_COLUMNS, *CONTRAST_QC_COLUMNS] if c not in text]
    return read_tsv(path, {c: [MISSING] for c in numbers}, dtype={c: str for c in text})


def read_contrast_record(path: str | Path) -> pd.DataFrame | None:
    """Per scan of qc.tsv its CONTRAST_QC_COLUMNS (subject first); None where the table has none (no scan had
    a phase estimate). Reads those columns alone: at 10,000 scans qc.tsv holds over a million rows."""
    header = pd.read_csv(path, sep="\t", nrows=0).columns
    if not set(CONTRAST_QC_COLUMNS) <= set(header):
        return None
    columns = ["subject", *CONTRAST_QC_COLUMNS]
    return pd.read_csv(path, sep="\t", usecols=columns, dtype=str).drop_duplicates("subject")[columns]


def value_exclusions(checked: pd.DataFrame, measure: str) -> pd.Series:
    """Per row of ``checked`` (measurements after ``qc.apply_plausibility``): why ``measure`` is NaN, one of
    EXCLUSION_REASONS or "other" (e.g. an eroded mean of a structure without interior voxels); "" where
    it is a number. The row's exclusion_reason names one cause; a value can be NaN for another one (a
    cut-off structure whose HU is implausible: reason implausible_hu, volume NaN as cut_off)."""
    reason = checked["exclusion_reason"].fillna("")
    missing = pd.to_numeric(checked[measure], errors="coerce").isna()
    if measure == "volume_ml":
        cause = reason.where(reason.isin(["absent", "too_small", REVIEWER_EXCLUDED]), "other")
        cause = cause.mask((cause == "other") & checked["complete"].eq(False).fillna(False), "cut_off")
        cause = cause.mask((cause == "other") & checked["volume_implausible"].astype(bool), "implausible_volume")
    elif measure.startswith("hu_"):
        cause = reason.where(reason.isin(HU_REASONS), "other")
    else:
        cause = reason.where(reason.isin(["absent", "too_small", REVIEWER_EXCLUDED]), "other")
    return cause.where(missing, "")


def exclusion_flow(n_scans: int, failures: pd.DataFrame, checked: pd.DataFrame, measures) -> pd.DataFrame:
    """Per structure and measure, what happened to every scan of the sheet: scans in, failed (by stage),
    measured, excluded (by reason: the value is NaN), measured without an age, analysed (a finite value
    and an age: the n of the age correlation). Each row adds up: scans_in = failed + measured, and
    measured = excluded + no_age + analysed."""
    stages = [*STAGES, *sorted(set(failures["stage"]) - set(STAGES))]
    failed = failures.drop_duplicates("subject")["stage"].value_counts()
    head = {"scans_in": n_scans, **{f"failed_{stage}": int(failed.get(stage, 0)) for stage in stages}}
    head["measured"] = n_scans - int(failed.sum())
    reasons = [*EXCLUSION_REASONS, "other"]
    age = checked["age"] if "age" in checked else pd.Series(np.nan, checked.index)
    has_age = pd.to_numeric(age, errors="coerce").notna()
    rows = []
    for measure in measures:
        cause = value_exclusions(checked, measure)
        frame = pd.DataFrame(
            {
                "structure": checked["structure"],
                "group": checked["group"],
                "cause": cause,
                "no_age": (cause == "") & ~has_age,
                "analysed": (cause == "") & has_age,
            }
        )
        for (structure, group), block in frame.groupby(["structure", "group"], sort=False, dropna=False):
            counts = block["cause"].value_counts()
            rows.append(
                {
                    "structure": structure,
                    "group": group,
                    "measure": measure,
                    **head,
                    **{f"excluded_{r}": int(counts.get(r, 0)) for r in reasons},
                    "no_age": int(block["no_age"].sum()),
                    "analysed": int(block["analysed"].sum()),
                }
            )
    columns = [
        "structure",
        "group",
        "measure",
        "scans_in",
        *[f"failed_{s}" for s in stages],
        "measured",
        *[f"excluded_{r}" for r in reasons],
        "no_age",
        "analysed",
    ]
    return pd.DataFrame(rows, columns=columns)
