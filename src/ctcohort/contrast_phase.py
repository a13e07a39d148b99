"""Contrast phase of each scan, estimated from its own measurement with TotalSegmentator's phase classifier.

TotalSegmentator 2.18.0 ships five gradient-boosted tree regressors (one per cross-validation fold, in
``totalsegmentator/resources/contrast_phase_classifiers_2024_07_19.pkl``) that predict the seconds since
contrast injection from 20 median HU values; its ``totalsegmentator/bin/totalseg_get_phase.py`` builds those
features and maps the mean over the folds to a phase. This module does the same arithmetic on ctcohort's
per-scan measurement table (results/measure/{subject}.tsv), so nothing is segmented twice:

- features: the median HU inside each of PHASE_STRUCTURES, structures cut by the image border included
  (TotalSegmentator computes these statistics with its border exclusion off, as ctcohort keeps a cut-off
  structure's HU), and 0 for a structure the scan does not contain;
- the four HEAD_NECK_VESSELS come from its head-neck model, and are 0 where the brain holds at most
  BRAIN_IN_SCAN_ML: with the brain in the scan they need a model of the study that segments them
  (study_models.py), else they are 0 and the row's note says so;
- where the structure table lacks one of PHASE_STRUCTURES (total_v1 names, the bundled demo model, a custom
  table) the phase is NOT_AVAILABLE and the note lists what is missing: never a guess from partial inputs.

One difference remains: a structure with fewer voxels than ``measure.min_voxels`` has no HU in ctcohort's
table; it is taken as absent (0), where TotalSegmentator would use the median of its few voxels (the note
names such structures). TotalSegmentator itself computes the features on its 3 mm "fast" segmentation;
ctcohort uses the study's segmentation at whatever resolution it has.
"""

from __future__ import annotations

import logging
import pickle
import warnings
from importlib import resources
from typing import NamedTuple

import numpy as np
import pandas as pd

# in the classifier's feature order (totalseg_get_phase.py's ``organs`` then ``organs_hn``); total_v2 names
PHASE_STRUCTURES = (
    "liver",
    "pancreas",
    "urinary_bladder",
    "gallbladder",
    "heart",
    "aorta",
    "inferior_vena_cava",
    "portal_vein_and_splenic_vein",
    "iliac_vena_left",
    "iliac_vena_right",
    "iliac_artery_left",
    "iliac_artery_right",
    "pulmonary_vein",
    "brain",
    "colon",
    "small_bowel",
)
HEAD_NECK_VESSELS = (
    "internal_carotid_artery_right",
    "internal_carotid_artery_left",
    "internal_jugular_vein_right",
    "internal_jugular_vein_left",
)
BRAIN_IN_SCAN_ML = 0.1  # TotalSegmentator's rule: brain volume > 100 mm3
CLASSIFIER_RESOURCE = "resources/contrast_phase_classifiers_2024_07_19.pkl"
INSTALL_HINT = "install the phase extra (pip install 'ctcohort[phase]') and totalsegmentator==2.18.0 (--no-deps)"
NOT_AVAILABLE = "not_available"
ESTIMATED = "estimated"
PHASE_COLUMNS = ["subject", "pi_time_s", "pi_time_sd", "phase", "probability", "phase_source", "note"]
NATIVE = "native"
# totalseg_get_phase.py's pi_time_to_phase: (pi time below which it applies, phase, probability); later
# than the last bound: portal venous with probability 0.3 (it has no delayed class)
PHASE_BANDS = (
    (5.0, NATIVE, 1.0),
    (10.0, NATIVE, 0.7),
    (20.0, "arterial_early", 0.7),
    (30.0, "arterial_early", 1.0),
    (50.0, "arterial_late", 1.0),
    (60.0, "arterial_late", 0.7),
    (90.0, "portal_venous", 1.0),
    (100.0, "portal_venous", 0.7),
)
LATE = ("portal_venous", 0.3)
log = logging.getLogger(__name__)


class PhaseUnavailable(RuntimeError):
    """The classifier cannot be loaded (totalsegmentator or xgboost missing)."""


class ScanFeatures(NamedTuple):
    """A scan's 20 classifier inputs (None: no estimate) and what the row's note says about them."""

    values: np.ndarray | None
    note: str


def phase_of(pi_time_s: float) -> tuple[str, float]:
    """The phase and its probability for a post-injection time, rounded to 0.01 s first as TotalSegmentator
    rounds its mean before the mapping."""
    rounded = round(float(pi_time_s), 2)
    for below, phase, probability in PHASE_BANDS:
        if rounded < below:
            return phase, probability
    return LATE


def _voxel_ml(measurements: pd.DataFrame) -> float:
    """The scan's voxel volume from its rows with a volume (NaN where none has one)."""
    measured = measurements[(measurements["n_voxels"] > 0) & measurements["volume_ml"].notna()]
    if measured.empty:
        return np.nan
    return float(np.median(measured["volume_ml"] / measured["n_voxels"]))


def _brain_in_scan(rows: pd.DataFrame, voxel_ml: float) -> bool:
    # with no complete structure the voxel size is unknown: any brain voxel counts (the note then says so)
    voxels = rows.at["brain", "n_voxels"]
    return bool(voxels > 0 and not voxels * voxel_ml <= BRAIN_IN_SCAN_ML)


def _medians(rows: pd.DataFrame, names) -> tuple[np.ndarray, list[str], list[str]]:
    """Median HU per name, 0 where absent or too small; and the names too small, and those with HU not finite."""
    picked = rows.loc[list(names)]
    present = picked["n_voxels"] > 0
    unmeasured = present & picked["hu_median"].isna()
    too_small = unmeasured & (picked["exclusion_reason"] == "too_small")
    values = picked["hu_median"].where(present & ~unmeasured, 0.0).to_numpy(dtype=np.float64)
    return values, list(picked.index[too_small]), list(picked.index[unmeasured & ~too_small])


def scan_features(measurements: pd.DataFrame) -> ScanFeatures:
    """The classifier's inputs from a scan's measurement table (columns.MEASURE_COLUMNS, one row per structure
    of the study's tables, before the cohort's plausibility exclusions)."""
    if measurements.empty:
        return ScanFeatures(None, "scan not measured")
    rows = measurements.set_index("structure")
    missing = [name for name in PHASE_STRUCTURES if name not in rows.index]
    if missing:
        return ScanFeatures(None, f"structure table lacks {', '.join(missing)} (the classifier needs total_v2 names)")
    values, too_small, unmeasured = _medians(rows, PHASE_STRUCTURES)
    notes = []
    vessels = np.zeros(len(HEAD_NECK_VESSELS))
    if _brain_in_scan(rows, _voxel_ml(measurements)):
        if all(name in rows.index for name in HEAD_NECK_VESSELS):
            vessels, vessels_small, vessels_unmeasured = _medians(rows, HEAD_NECK_VESSELS)
            too_small, unmeasured = too_small + vessels_small, unmeasured + vessels_unmeasured
        else:
            notes.append(f"brain in the scan but no model gives {', '.join(HEAD_NECK_VESSELS)}: their features are 0")
    if unmeasured:
        return ScanFeatures(None, f"HU not finite in {', '.join(unmeasured)}")
    if too_small:
        notes.append(f"too small to measure, taken as absent (0): {', '.join(too_small)}")
    return ScanFeatures(np.concatenate([values, vessels]), "; ".join(notes))


def load_classifiers() -> dict:
    """TotalSegmentator's fold -> regressor mapping, from the installed package (nothing downloaded)."""
    try:
        # before anything imports torch: TotalSegmentator notes that unpickling these models after torch can
        # crash on Apple Silicon
        import xgboost  # noqa: F401
    except ImportError as error:
        raise PhaseUnavailable(f"xgboost not installed: {INSTALL_HINT}") from error
    try:
        path = resources.files("totalsegmentator") / CLASSIFIER_RESOURCE
    except ModuleNotFoundError as error:
        raise PhaseUnavailable(f"totalsegmentator not installed: {INSTALL_HINT}") from error
    if not path.is_file():
        raise PhaseUnavailable(f"totalsegmentator has no {CLASSIFIER_RESOURCE}: {INSTALL_HINT}")
    with path.open("rb") as stream, warnings.catch_warnings():
        # xgboost warns that the pickle is of an older xgboost; TotalSegmentator loads it the same way
        warnings.filterwarnings("ignore", message="(?s).*older version of XGBoost", category=UserWarning)
        return pickle.load(stream)  # a file of the installed package, as trusted as its code


def predict_pi_times(classifiers: dict, features: np.ndarray) -> np.ndarray:
    """Seconds since injection per fold (columns) and scan (rows) of a scans x 20 feature matrix."""
    return np.column_stack([model.predict(features) for model in classifiers.values()])


def _row(subject, note, pi_times=None) -> dict:
    if pi_times is None:
        return dict(zip(PHASE_COLUMNS, (subject, np.nan, np.nan, NOT_AVAILABLE, np.nan, ESTIMATED, note)))
    mean = float(np.mean(pi_times))
    phase, probability = phase_of(mean)
    # the SD over the folds as TotalSegmentator reports it (population SD)
    return dict(zip(PHASE_COLUMNS, (subject, mean, float(np.std(pi_times)), phase, probability, ESTIMATED, note)))


def contrast_phase_table(measurements: dict[str, pd.DataFrame], classifiers: dict | None = None) -> pd.DataFrame:
    """One row per scan (columns PHASE_COLUMNS) from per-scan measurement tables by subject. The classifier
    loads only where some scan has its inputs; where it cannot, every row says what to install."""
    features = {subject: scan_features(table) for subject, table in measurements.items()}
    ready = [subject for subject, scan in features.items() if scan.values is not None]
    pi_times = {}
    if ready:
        try:
            classifiers = load_classifiers() if classifiers is None else classifiers
        except PhaseUnavailable as error:
            features = {subject: ScanFeatures(None, str(error)) for subject in features}
        else:
            matrix = np.vstack([features[subject].values for subject in ready])
            pi_times = dict(zip(ready, predict_pi_times(classifiers, matrix)))
    rows = [_row(subject, scan.note, pi_times.get(subject)) for subject, scan in features.items()]
    return pd.DataFrame(rows, columns=PHASE_COLUMNS)


def estimated_contrast(phases: pd.DataFrame) -> pd.DataFrame:
    """Per scan the estimated contrast (1: a phase other than native, 0: native, NA: no estimate) and phase,
    for the contrast covariate."""
    available = phases["phase"] != NOT_AVAILABLE
    contrast = pd.array(np.where(phases["phase"] == NATIVE, 0, 1), dtype="Int64")
    contrast[~available.to_numpy()] = pd.NA
    return pd.DataFrame({"subject": phases["subject"], "contrast": contrast, "phase": phases["phase"]})


# --- the contrast covariate: from the sheet, from the estimate, or both (statistics.contrast) ----------------

SHEET = "sheet"
NO_SOURCE = "none"
SHEET_ELSE_ESTIMATED = "sheet_else_estimated"
CONTRAST_SOURCES = (SHEET, ESTIMATED, SHEET_ELSE_ESTIMATED)
PHASES = tuple(dict.fromkeys(phase for _, phase, _ in PHASE_BANDS))  # native, arterial_early, ..., in order
PHASE_COLUMN = "phase"  # the estimated phase in the cohort tables, a covariate (statistics.phase_covariate)
# per scan, where the contrast covariate is resolved (aggregate): its value, where that came from, the check
CONTRAST_COLUMNS = ["subject", "contrast", "contrast_source", "contrast_disagrees", "phase"]
# the columns the cohort QC table gains where some scan has an estimate
CONTRAST_QC_COLUMNS = ["contrast_source", "contrast_disagrees"]
CERTAIN = 1.0  # TotalSegmentator's probability away from every cut-off: only such an estimate can contradict


def check_contrast_source(source: str) -> None:
    if source not in CONTRAST_SOURCES:
        raise ValueError(f"unknown contrast source {source!r}; choose one of {', '.join(CONTRAST_SOURCES)}")


def resolve_contrast(sheet: pd.DataFrame, phases: pd.DataFrame, source: str = SHEET_ELSE_ESTIMATED) -> pd.DataFrame:
    """Per row of the cohort ``sheet`` (CONTRAST_COLUMNS): ``contrast`` (1.0 / 0.0 / NaN) from the sheet's column,
    from the phase estimate (``estimated_contrast``), or from the sheet where it has a value and the estimate
    elsewhere, as ``source`` says; ``contrast_source`` (sheet, estimated or none); ``contrast_disagrees``: the
    sheet's value contradicts an estimate of probability CERTAIN, whatever ``source``; ``phase``: the estimated
    phase (NaN where none), the category ``statistics.phase_covariate`` adjusts for."""
    check_contrast_source(source)
    subjects = sheet["subject"].astype(str).reset_index(drop=True)
    estimates = phases.assign(subject=phases["subject"].astype(str)).set_index("subject")
    column = sheet["contrast"] if "contrast" in sheet.columns else pd.Series(np.nan, index=sheet.index)
    from_sheet = pd.to_numeric(column, errors="coerce").to_numpy(dtype=float)
    estimated = subjects.map(estimated_contrast(phases).set_index("subject")["contrast"].astype(float))
    estimated = estimated.to_numpy(dtype=float)
    use_sheet = (source != ESTIMATED) & ~np.isnan(from_sheet)
    use_estimate = ~use_sheet & (source != SHEET) & ~np.isnan(estimated)
    certain = subjects.map(estimates["probability"]).to_numpy(dtype=float) == CERTAIN
    with np.errstate(invalid="ignore"):
        disagrees = certain & (from_sheet != estimated) & ~np.isnan(from_sheet) & ~np.isnan(estimated)
    phase = subjects.map(estimates["phase"])
    return pd.DataFrame(
        {
            "subject": subjects,
            "contrast": np.where(use_sheet, from_sheet, np.where(use_estimate, estimated, np.nan)),
            "contrast_source": np.select([use_sheet, use_estimate], [SHEET, ESTIMATED], NO_SOURCE),
            "contrast_disagrees": disagrees,
            "phase": phase.where(phase.isin(PHASES)),
        }
    )


def any_estimate(resolved: pd.DataFrame) -> bool:
    """Whether some scan has a phase estimate: without one the sheet is the only source and nothing is added."""
    return bool(resolved["phase"].notna().any())


def with_resolved_contrast(sheet: pd.DataFrame, resolved: pd.DataFrame) -> pd.DataFrame:
    """The sheet with ``resolve_contrast``'s contrast in its ``contrast`` column (added where the sheet has none) and
    the estimated ``phase`` (where some scan has one and the sheet has no such column). A column whose values
    would not change is left as it is, so that a cohort without estimates keeps its tables byte for byte."""
    table = sheet.copy()
    contrast = resolved["contrast"].to_numpy(dtype=float)
    if "contrast" in sheet.columns:
        before = pd.to_numeric(sheet["contrast"], errors="coerce").to_numpy(dtype=float)
        if not np.array_equal(before, contrast, equal_nan=True):
            table["contrast"] = contrast
    elif not np.isnan(contrast).all():
        table["contrast"] = contrast
    if any_estimate(resolved) and PHASE_COLUMN not in sheet.columns:
        table[PHASE_COLUMN] = resolved["phase"].to_numpy(dtype=object)
    return table


def resolved_sheet(
    sheet: pd.DataFrame, phases: pd.DataFrame, source: str = SHEET_ELSE_ESTIMATED
) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """(``with_resolved_contrast``'s sheet, ``resolve_contrast``'s table for the QC table or None where no scan has
    an estimate): what the cohort is joined with."""
    resolved = resolve_contrast(sheet, phases, source)
    if not any_estimate(resolved):
        if source == ESTIMATED:
            log.warning("statistics.contrast estimated, but no scan has a phase estimate: no scan has a contrast")
        return with_resolved_contrast(sheet, resolved), None
    log.info("contrast (statistics.contrast %s): %s", source, contrast_counts(resolved))
    return with_resolved_contrast(sheet, resolved), resolved


def contrast_counts(record: pd.DataFrame) -> dict[str, int]:
    """Scans per contrast_source (sheet, estimated, none) and the scans flagged contrast_disagrees, of a per-scan
    record with CONTRAST_QC_COLUMNS."""
    sources = record["contrast_source"].value_counts()
    counts = {source: int(sources.get(source, 0)) for source in (SHEET, ESTIMATED, NO_SOURCE)}
    return counts | {"disagrees": int(record["contrast_disagrees"].astype(str).str.lower().eq("true").sum())}
