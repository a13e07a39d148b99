"""Structure tables: label id -> structure name and anatomical group.

Measurements always carry the structure name; a bare label id means nothing
outside the model that produced it.
"""

from pathlib import Path

import pandas as pd

from ctcohort.resources import resources_dir

BUILTIN_TABLES = {"total_v1": "total_v1_classes.csv", "total_v2": "total_v2_classes.csv"}
GROUPS = ("organ", "bone", "muscle", "vessel")
# a study of several models names a later model's structure that an earlier one also has model:name
MODEL_SEPARATOR = ":"


def model_structure_name(model: str, name: str) -> str:
    return f"{model}{MODEL_SEPARATOR}{name}"


def own_names(structures: pd.Series) -> pd.Series:
    """The structures' names in their model's table (``model_structure_name`` undone): what other tables,
    such as the plausible volumes, know them by."""
    return structures.astype(str).str.rsplit(MODEL_SEPARATOR, n=1).str[-1]


def load_structure_table(spec: str | Path) -> pd.DataFrame:
    """Load a built-in table (``total_v1``, ``total_v2``) or a CSV with label,name[,group].

    Returns a frame with columns label (int), name, group, sorted by label.
    """
    spec = str(spec)
    path = resources_dir() / "structures" / BUILTIN_TABLES[spec] if spec in BUILTIN_TABLES else Path(spec)
    if not path.is_file():
        raise FileNotFoundError(
            f"structure table {spec!r}: not a built-in table ({', '.join(BUILTIN_TABLES)}) and no such file {path}"
        )
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise ValueError(f"structure table {path}: not a readable CSV ({err})") from err
    table.columns = [str(c).strip() for c in table.columns]
    missing = {"label", "name"} - set(table.columns)
    if missing:
        raise ValueError(f"structure table {path}: missing column(s) {sorted(missing)} (found {list(table.columns)})")
    if "group" not in table.columns:
        table["group"] = ""
    table = table[["label", "name", "group"]].apply(lambda column: column.str.strip())
    if table.empty:
        raise ValueError(f"structure table {path}: no rows")
    labels = pd.to_numeric(table["label"], errors="coerce")
    bad = table.loc[labels.isna() | (labels % 1 != 0), "label"].tolist()
    if bad:
        raise ValueError(f"structure table {path}: labels must be integers, not {bad[:5]}")
    if (labels <= 0).any():
        raise ValueError(f"structure table {path}: labels must be positive (0 is background)")
    if (table["name"] == "").any():
        raise ValueError(
            f"structure table {path}: every label needs a name (rows {list(table.index[table['name'] == ''] + 2)})"
        )
    table["label"] = labels.astype(int)
    for column in ("label", "name"):
        dupes = table[column][table[column].duplicated()].tolist()
        if dupes:
            raise ValueError(f"structure table {path}: duplicate {column} {dupes}")
    return table.sort_values("label").reset_index(drop=True)
