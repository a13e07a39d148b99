"""The paper's reported age correlations beside the study's own (``results/stats/paper_comparison.tsv``).

The paper's table is ``resources/paper/aging_correlations.tsv`` (Wasserthal et al., TotalSegmentator,
Radiology: Artificial Intelligence 2023, doi:10.1148/ryai.230024). A row the study cannot give (the
structure or measure is not in ``age_correlations.tsv``: a structure the segmentation does not have, a
combined structure whose members are missing, a measure not in statistics.measures) or does not test
(too few scans, a constant measure) keeps the paper's value with rs, CI, P NaN and ``same_direction``
NA: never a value made up for it. ``note`` says which.
"""

from pathlib import Path

import numpy as np
import pandas as pd

from ctcohort.resources import resources_dir
from ctcohort.tables import ANY_MISSING, STATS_DIGITS, read_tsv, write_tsv

PAPER_COLUMNS = ["structure", "measure", "rs_paper", "paper_structure", "paper_measure"]
COMPARISON_COLUMNS = [
    "structure",
    "measure",
    "rs_paper",
    "rs",
    "ci_low",
    "ci_high",
    "p",
    "n",
    "primary",
    "same_direction",
    "paper_structure",
    "paper_measure",
    "note",
]
NOT_IN_STUDY = "not_in_study"


def paper_table_path() -> Path:
    return resources_dir() / "paper" / "aging_correlations.tsv"


def load_paper_correlations(path: str | Path | None = None) -> pd.DataFrame:
    """The paper's rows (PAPER_COLUMNS); ``#`` lines are the citation."""
    table = read_tsv(path or paper_table_path(), ANY_MISSING, comment="#", dtype={"rs_paper": float})
    missing = set(PAPER_COLUMNS) - set(table.columns)
    if missing:
        raise ValueError(f"{path or paper_table_path()}: missing column(s) {sorted(missing)}")
    return table[PAPER_COLUMNS]


def paper_comparison(correlations: pd.DataFrame, paper: pd.DataFrame) -> pd.DataFrame:
    """One row per row of ``paper``, in its order (COMPARISON_COLUMNS): the study's rs, 95% CI, P and n
    from ``correlations`` (``stats.age_correlations``' table, its primary analysis: ``primary`` says whether
    adjusted, while the paper's rs are not) for the same structure and measure.
    ``same_direction`` (boolean, NA where rs is NaN): rs and rs_paper have the same sign (an rs of
    exactly 0 agrees with no direction). ``note``: NOT_IN_STUDY where ``correlations`` has no such row,
    else its own note (e.g. too_few_scans; "" where tested)."""
    from ctcohort.stats import primary_view  # here: the workflow imports this module at start-up

    view = primary_view(correlations)
    if "primary" not in view.columns:
        view = view.assign(primary="unadjusted")
    ours = view[["structure", "measure", "n", "rs", "ci_low", "ci_high", "p", "primary", "note"]]
    ours = ours.drop_duplicates(["structure", "measure"])  # one group per structure
    table = paper.merge(ours, on=["structure", "measure"], how="left", validate="one_to_one", indicator=True)
    present = (table["_merge"] == "both").to_numpy()
    table["note"] = np.where(present, table["note"].fillna("").astype(str), NOT_IN_STUDY)
    table["n"] = table["n"].fillna(0).astype(int)
    table["primary"] = table["primary"].fillna("")
    rs = table["rs"].to_numpy(dtype=float)
    same = pd.array(np.sign(rs) == np.sign(table["rs_paper"].to_numpy(dtype=float)), dtype="boolean")
    same[~np.isfinite(rs)] = pd.NA
    table["same_direction"] = same
    return table[COMPARISON_COLUMNS]


def write_paper_comparison(table: pd.DataFrame, path: str | Path) -> None:
    """TSV; NaN numbers as NaN, an undecided same_direction as NA."""
    out = table.copy()
    out["same_direction"] = out["same_direction"].astype(object).where(out["same_direction"].notna(), "NA")
    write_tsv(out, path, STATS_DIGITS)
