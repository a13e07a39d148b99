"""Structure tables: label id -> structure name and anatomical group.

Measurements always carry the structure name; a bare label id means nothing
outside the model that produced it.
"""

from pathlib import Path

import pandas as pd

from ctcohort.resources import resources_dir

BUILTIN_TABLES = {"total_v1": "total_v1_classes.csv", "total_v2": "total_v2_classes.csv"}
GROUPS = ("organ", "bone", "muscle", "vessel")


def load_structure_table(spec: str | Path) -> pd.DataFrame:
    """Load a built-in table (``total_v1``, ``total_v2``) or a CSV with label,name[,group].

    Returns a frame with columns label (int), name, group, sorted by label.
    """
    spec = str(spec)
    path = resources_dir() / "structures" / BUILTIN_TABLES[spec] if spec in BUILTIN_TABLES else Path(spec)
    if not path.is_file():
        raise FileNotFoundError(
            f"structure table {spec!r}: not a built-in table ({', '.join(BUILTIN_TABLES)}) "
            f"and no such file {path}"
        )
    table = pd.read_csv(path)
    missing = {"label", "name"} - set(table.columns)
    if missing:
        raise ValueError(f"structure table {path}: missing column(s) {sorted(missing)}")
    if "group" not in table.columns:
        table["group"] = ""
    table = table[["label", "name", "group"]].copy()
    table["group"] = table["group"].fillna("").astype(str)
    if (table["label"] <= 0).any():
        raise ValueError(f"structure table {path}: labels must be positive (0 is background)")
    for column in ("label", "name"):
        dupes = table[column][table[column].duplicated()].tolist()
        if dupes:
            raise ValueError(f"structure table {path}: duplicate {column} {dupes}")
    table["label"] = table["label"].astype(int)
    return table.sort_values("label").reset_index(drop=True)
