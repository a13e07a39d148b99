"""Which scans to look at first, and what a reviewer decided about them.

The sanity checks run where the cohort is joined (the aggregate rule), on the geometry each scan's QC table
holds (``qc.structure_geometry``: centres of mass in RAS+ millimetres, the second piece of one-piece
structures) and on the cohort's volumes. Each flags a structure of a scan; none excludes anything:

- ``laterality``: a ``_left`` structure (any name with a ``left`` part: ``kidney_left``, ``rib_left_3``) whose
  centre of mass lies more than ``laterality_margin_mm`` on the subject's right of its ``_right`` twin's
  (RAS+ x grows to the subject's right); both twins are flagged. Swapped kidney labels are caught here. A pair on
  the wrong side in most scans is a mirrored cohort (images, headers, or a model trained on mirrored images), not a
  mislabel: it is warned about in the aggregate log, not flagged per scan.
- ``vertebra_order``: a vertebra whose centre lies more than ``vertebra_order_margin_mm`` below a more caudal
  vertebra's or above a more cranial one's (vertebrae with at least ``min_voxels`` voxels); every vertebra in
  such an inversion is flagged, so L1 and L3 swapped flag L1, L2 and L3.
- ``fragments``: a structure of ``qc.ONE_PIECE`` whose second-largest connected piece holds ``fragment_min_ml``
  or more.
- ``volume_outlier``: |robust z| above ``volume_outlier_z``, z of the log volume against the scans of the same
  structure, sex and age decade: (log v - median) / (1.4826 MAD); where that group has fewer than
  ``volume_outlier_min_scans`` volumes, the same structure and sex at any age; fewer still, no z. Only whole
  structures count (not cut off, not absent or too small). Scans, not patients: repeated scans of a patient
  move a median little.
- ``orientation``: the CT's sform and qform disagree (``sform_qform_mm``); flagged on every structure row of
  the scan, since every centre of mass depends on it.

``contrast_disagrees`` (``contrast_phase.resolve_contrast``: the sheet's contrast contradicts a certain phase
estimate) is a flag of the whole scan too, on the review page; it questions a covariate, not the segmentation,
so unlike the sanity checks it keeps the scan's structures in the normative charts.

A scan's review score orders the review page: the sum of FLAG_WEIGHTS over its flagged structures, plus its
largest |z| (at most 9) / 10, which orders scans with the same flags. Cut-off structures are listed on the
page (a filter) but weigh nothing: a partial field of view is expected and already excluded from volumes.

A reviewer's decisions (``qc.review_decisions``, the TSV the review page downloads: subject, structure -- blank
for the whole scan --, decision exclude|accept, reason) enter the study through ``apply_review_decisions``: an
excluded structure's measures become NaN with ``exclusion_reason`` REVIEW_REASON; a whole scan's exclusion
does so for all its structures. ``accept`` changes no number; both show in qc.tsv's ``review`` column.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import pandas as pd

from ctcohort.columns import HU_COLUMNS
from ctcohort.columns import REVIEWER_EXCLUDED as REVIEW_REASON
from ctcohort.qc import QCSettings, vertebra_rank
from ctcohort.review_page import FLAG_COLUMNS

SANITY_FLAGS = ("laterality", "vertebra_order", "fragments", "volume_outlier", "orientation")
# Flags that say the labels are wrong (a mix-up, a broken header) weigh more than ones that say a value is odd
FLAG_WEIGHTS = {
    "laterality": 3.0,
    "vertebra_order": 3.0,
    "orientation": 3.0,
    "fragments": 1.0,
    "volume_outlier": 1.0,
    "volume_implausible": 1.0,
    "hu_implausible": 1.0,
    "contrast_disagrees": 1.0,
    "cut_off": 0.0,
}
# flags of the whole scan: listed once, with the structure blank
SCAN_FLAGS = ("orientation", "contrast_disagrees")
MAD_SCALE = 1.482602218505602  # 1 / the normal 75th percentile: a normal sample's MAD -> its SD
MAX_Z_IN_SCORE = 9.0
# what the review page says of each flag, from the QC table's row
FLAG_DETAILS = {
    "volume_outlier": "robust z = {volume_z:.1f}",
    "fragments": "second piece {second_piece_ml:.1f} ml",
    "orientation": "sform and qform {sform_qform_mm:.1f} mm apart",
    "cut_off": "cut at {cut_faces}",
    "laterality": "centre at x = {centroid_x_mm:.0f} mm",
    "vertebra_order": "centre at z = {centroid_z_mm:.0f} mm",
    "contrast_disagrees": "the sheet's contrast against the estimated phase (contrast_phase.tsv)",
}
log = logging.getLogger(__name__)
RANKING_COLUMNS = ["subject", "score", "n_flags", "status"]


def twin_name(structure: str, side: str, other: str) -> str | None:
    """``structure`` with its ``side`` part ("left") replaced by ``other`` ("right"); None without one."""
    parts = str(structure).split("_")
    if side not in parts:
        return None
    return "_".join(other if part == side else part for part in parts)


def laterality_flags(qc: pd.DataFrame, margin_mm: float = 0.0) -> np.ndarray:
    """Per row of ``qc`` (subject, structure, centroid_x_mm): the structure or its twin lies on the wrong
    side (module docstring)."""
    x = qc.set_index(["subject", "structure"])["centroid_x_mm"]
    x = x[~x.index.duplicated()]
    flags = np.zeros(len(qc), dtype=bool)
    compared = np.zeros(len(qc), dtype=bool)
    for side, other, sign in (("left", "right", 1.0), ("right", "left", -1.0)):
        twins = qc["structure"].map(lambda s, side=side, other=other: twin_name(s, side, other))
        has_twin = twins.notna().to_numpy()
        keys = pd.MultiIndex.from_arrays([qc["subject"][has_twin], twins[has_twin]])
        twin_x = x.reindex(keys).to_numpy(dtype=float)
        own_x = qc["centroid_x_mm"].to_numpy(dtype=float)[has_twin]
        compared[has_twin] = np.isfinite(own_x - twin_x)
        with np.errstate(invalid="ignore"):
            # a left structure must lie on the subject's left (RAS+: smaller x) of its right twin, and vice versa
            flags[has_twin] = sign * (own_x - twin_x) > margin_mm
    return _unless_mirrored(qc["structure"], flags, compared)


def _unless_mirrored(structures: pd.Series, flags: np.ndarray, compared: np.ndarray) -> np.ndarray:
    """``flags`` less those of a structure on the wrong side in most scans that have both twins: that is a
    cohort whose left and right are mirrored (images written mirrored, or a model trained on mirrored images),
    not a scan's mislabel, and it is said once, loudly, in the log instead of flagging every scan."""
    table = pd.DataFrame({"structure": structures.to_numpy(), "flag": flags, "compared": compared})
    share = table[table["compared"]].groupby("structure")["flag"].mean()
    mirrored = share[share > 0.5]
    if len(mirrored):
        # one warning for the cohort: a mirrored cohort has every pair wrong, and a line each would bury the cause
        shares = ", ".join(f"{structure} {100 * fraction:.0f}%" for structure, fraction in mirrored.items())
        log.warning(
            "laterality: the cohort's left and right look mirrored (images, their orientation, or a model "
            "trained on mirrored images); not flagged per scan. Share of scans with the structure on the "
            "wrong side of its twin: %s",
            shares,
        )
    return flags & ~table["structure"].isin(mirrored.index).to_numpy()


def vertebra_order_flags(
    qc: pd.DataFrame, margin_mm: float = QCSettings.vertebra_order_margin_mm, min_voxels: int = QCSettings.min_voxels
) -> np.ndarray:
    """Per row of ``qc`` (subject, structure, n_voxels, centroid_z_mm): a vertebra in a cranio-caudal
    inversion with another vertebra of its scan (module docstring)."""
    rank = qc["structure"].map(vertebra_rank)
    z = qc["centroid_z_mm"].to_numpy(dtype=float)
    usable = rank.notna().to_numpy() & np.isfinite(z) & (qc["n_voxels"].to_numpy(dtype=float) >= min_voxels)
    spine = pd.DataFrame(
        {
            "subject": qc["subject"].to_numpy()[usable],
            "rank": rank[usable].astype(float),
            "z": z[usable],
            "row": np.flatnonzero(usable),
        }
    ).sort_values(["subject", "rank"])
    by_subject = spine.groupby("subject", sort=False)["z"]
    # the highest centre among the more caudal vertebrae, the lowest among the more cranial ones
    below = by_subject.transform(lambda v: v[::-1].cummax()[::-1].shift(-1))
    above = by_subject.transform(lambda v: v.cummin().shift(1))
    with np.errstate(invalid="ignore"):
        wrong = (below > spine["z"] + margin_mm) | (above < spine["z"] - margin_mm)
    flags = np.zeros(len(qc), dtype=bool)
    flags[spine["row"].to_numpy()[wrong.to_numpy()]] = True
    return flags


def _robust_z(values: pd.Series) -> pd.Series:
    """(v - median) / (MAD_SCALE x MAD) within one group; NaN where the MAD is 0."""
    centre = values.median()
    spread = MAD_SCALE * (values - centre).abs().median()
    return (values - centre) / spread if spread > 0 else values * np.nan


def volume_z(qc: pd.DataFrame, min_scans: int = 20) -> np.ndarray:
    """Per row of ``qc`` (structure, volume_ml_measured, complete, exclusion_reason, and the sheet's age
    and sex where it has them): the robust z of the log volume for age decade and sex (module docstring)."""
    volume = pd.to_numeric(qc["volume_ml_measured"], errors="coerce")
    whole = (
        (qc["complete"].astype(str).str.lower() == "true")
        & (volume > 0)
        & ~qc["exclusion_reason"].fillna("").isin(["absent", "too_small", "cut_off"])
    )
    frame = pd.DataFrame(
        {
            "structure": qc["structure"],
            "log_volume": np.log(volume.where(whole)),
            "sex": qc["sex"].fillna("").astype(str) if "sex" in qc else "",
            "decade": (pd.to_numeric(qc["age"], errors="coerce") // 10) if "age" in qc else np.nan,
        }
    )
    z = pd.Series(np.nan, index=qc.index)
    for keys in (["structure", "sex", "decade"], ["structure", "sex"]):
        groups = frame.groupby(keys, dropna=False)["log_volume"]
        enough = groups.transform("count") >= min_scans
        pending = z.isna() & frame["log_volume"].notna() & enough
        if pending.any():
            z[pending] = groups.transform(_robust_z)[pending]
    return z.to_numpy(dtype=float)


def sanity_flags(qc: pd.DataFrame, settings: QCSettings = QCSettings()) -> pd.DataFrame:
    """The columns the checks add to the cohort QC table, one row per row of ``qc``: SANITY_FLAGS and
    ``volume_z``."""
    z = volume_z(qc, settings.volume_outlier_min_scans)
    second = pd.to_numeric(qc["second_piece_ml"], errors="coerce").to_numpy(dtype=float)
    orientation = pd.to_numeric(qc["sform_qform_mm"], errors="coerce").to_numpy(dtype=float)
    with np.errstate(invalid="ignore"):
        return pd.DataFrame(
            {
                "laterality": laterality_flags(qc, settings.laterality_margin_mm),
                "vertebra_order": vertebra_order_flags(qc, settings.vertebra_order_margin_mm, settings.min_voxels),
                "fragments": second >= max(settings.fragment_min_ml, np.finfo(float).tiny),
                "volume_z": z,
                "volume_outlier": np.abs(z) > settings.volume_outlier_z,
                "orientation": orientation > 0,
            },
            index=qc.index,
        )


# --- the review page's tables -----------------------------------------------------------------------------


def _flag_detail(row, flag: str) -> str:
    return FLAG_DETAILS.get(flag, "").format(**row._asdict())


def review_flags(qc: pd.DataFrame) -> pd.DataFrame:
    """One row per flag of the cohort QC table (FLAG_COLUMNS); a flag of SCAN_FLAGS once, on the scan (structure
    blank). A flag column the table lacks flags nothing (contrast_disagrees exists where a phase was estimated)."""
    columns = {
        "cut_off": qc["cut_faces"].fillna("").astype(str) != "",
        **{
            flag: qc[flag].astype(str).str.lower() == "true" if flag in qc.columns else pd.Series(False, qc.index)
            for flag in FLAG_WEIGHTS
            if flag != "cut_off"
        },
    }
    frames = []
    for flag, flagged in columns.items():
        rows = qc[flagged.to_numpy()]
        if flag in SCAN_FLAGS:
            rows = rows.drop_duplicates("subject")
        frames.append(
            pd.DataFrame(
                {
                    "subject": rows["subject"].astype(str),
                    "structure": "" if flag in SCAN_FLAGS else rows["structure"].astype(str),
                    "flag": flag,
                    "detail": [_flag_detail(row, flag) for row in rows.itertuples()],
                }
            )
        )
    return pd.concat(frames, ignore_index=True)[FLAG_COLUMNS]


def review_scans(
    subjects: Sequence[str], qc: pd.DataFrame, flags: pd.DataFrame, failures: pd.DataFrame
) -> pd.DataFrame:
    """One row per subject (RANKING_COLUMNS), highest score first: the score of the module docstring (NaN for
    a scan that failed: nothing to review), its flag count but cut-offs, and the failure as status."""
    weights = flags["flag"].map(FLAG_WEIGHTS).fillna(0.0)
    score = weights.groupby(flags["subject"]).sum()
    counted = (weights > 0).groupby(flags["subject"]).sum()
    largest_z = pd.to_numeric(qc["volume_z"], errors="coerce").abs().groupby(qc["subject"].astype(str)).max()
    table = pd.DataFrame({"subject": [str(s) for s in subjects]})
    table["score"] = (
        table["subject"].map(score).fillna(0.0)
        + table["subject"].map(largest_z).fillna(0.0).clip(upper=MAX_Z_IN_SCORE) / 10
    )
    table["n_flags"] = table["subject"].map(counted).fillna(0).astype(int)
    failed = failures.drop_duplicates("subject").set_index("subject")
    status = table["subject"].map(failed["stage"].astype(str) + ": " + failed["error"].astype(str))
    table["status"] = status.fillna("")
    table.loc[table["status"] != "", "score"] = np.nan
    return table.sort_values(
        ["score", "subject"], ascending=[False, True], na_position="last", kind="stable"
    ).reset_index(drop=True)[RANKING_COLUMNS]


# --- the reviewer's decisions -----------------------------------------------------------------------------


def check_decisions(decisions: pd.DataFrame, subjects: set[str], structures: set[str], source: str) -> None:
    """A ValueError naming each decision (``review_page.read_decisions``' table) about a subject or a structure
    that the cohort does not have."""
    problems = [
        f"subject {subject!r} is not a scan of the cohort"
        for subject in dict.fromkeys(decisions["subject"])
        if subject not in subjects
    ]
    problems += [
        f"structure {structure!r} (subject {subject!r}) is not a structure of the table"
        for subject, structure in zip(decisions["subject"], decisions["structure"])
        if structure and structure not in structures
    ]
    if problems:
        raise ValueError(f"review decisions {source}: " + "; ".join(problems))


def check_decision_subjects(path: str, subjects: Sequence[str]) -> None:
    """Before any job: the decisions file reads, and names scans of the sheet only (ValueError)."""
    from ctcohort.review_page import read_decisions

    decisions = read_decisions(path)
    # the structures are checked where the cohort is joined: here every structure named passes
    check_decisions(decisions, set(subjects), set(decisions["structure"]), path)


def load_decisions(path: str | None, measurements: pd.DataFrame) -> pd.DataFrame | None:
    """The decisions of ``qc.review_decisions`` (None where unset), checked against the cohort's scans and
    structures (``measurements``: one row per subject x structure)."""
    if not path:
        return None
    from ctcohort.review_page import read_decisions

    decisions = read_decisions(path)
    check_decisions(decisions, set(measurements["subject"].astype(str)), set(measurements["structure"]), str(path))
    return decisions


def excluded_rows(measurements: pd.DataFrame, decisions: pd.DataFrame) -> np.ndarray:
    """Per row of ``measurements`` (subject, structure): a decision excludes it, for the structure or the
    whole scan."""
    exclude = decisions[decisions["decision"] == "exclude"]
    scans = set(exclude.loc[exclude["structure"] == "", "subject"])
    pairs = set(zip(exclude["subject"], exclude["structure"]))
    subject = measurements["subject"].astype(str)
    return (
        subject.isin(scans)
        | pd.Series(list(zip(subject, measurements["structure"].astype(str))), index=measurements.index).isin(pairs)
    ).to_numpy()


def apply_review_decisions(measurements: pd.DataFrame, decisions: pd.DataFrame | None) -> pd.DataFrame:
    """A copy of ``measurements`` whose rows a decision excludes hold no measure (NaN) and the reason
    REVIEW_REASON, whatever reason they had."""
    out = measurements.copy()
    if decisions is None or decisions.empty:
        return out
    excluded = excluded_rows(out, decisions)
    out.loc[excluded, ["volume_ml", *HU_COLUMNS]] = np.nan
    out.loc[excluded, "exclusion_reason"] = REVIEW_REASON
    return out


def review_column(qc: pd.DataFrame, decisions: pd.DataFrame | None) -> pd.Series:
    """Per row of ``qc``: the reviewer's decision about the structure, else about the scan, else ""."""
    if decisions is None or decisions.empty:
        return pd.Series("", index=qc.index)
    by_pair = decisions.set_index(["subject", "structure"])["decision"]
    keys = pd.MultiIndex.from_arrays([qc["subject"].astype(str), qc["structure"].astype(str)])
    scan_keys = pd.MultiIndex.from_arrays([qc["subject"].astype(str), [""] * len(qc)])
    own = pd.Series(by_pair.reindex(keys).to_numpy(), index=qc.index)
    return own.fillna(pd.Series(by_pair.reindex(scan_keys).to_numpy(), index=qc.index)).fillna("")


def count_sentence(decisions: pd.DataFrame | None) -> str:
    """How many scans and structures a reviewer excluded, for the log and Methods ("" for none)."""
    if decisions is None:
        return ""
    exclude = decisions[decisions["decision"] == "exclude"]
    scans = int((exclude["structure"] == "").sum())
    structures = int((exclude["structure"] != "").sum())
    if not scans and not structures:
        return ""
    return (
        f"A reviewer excluded {scans} scan{'s' * (scans != 1)} and {structures} further structure "
        f"measurement{'s' * (structures != 1)} after looking at the QC review page ({REVIEW_REASON})."
    )
