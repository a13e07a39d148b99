"""The project's tab-separated tables: one writer and one reader.

Every table is written without an index, a missing number as "NaN", and floats in the format its kind has
always had (the named constants below), so that a table's bytes do not depend on which module wrote it.
The reader reads back only what the writer means as missing: a blank cell of a text column stays "" and an
id stays text where asked ("007" is an id, not the number 7).

pandas is imported where a table is read or written: `ctcohort measure` starts without it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING

if TYPE_CHECKING:
    import pandas as pd

# how a missing number is written, and the only cell the reader takes for one by default
MISSING = "NaN"
# missing cells written blank: text tables and the per-scan QC table have always been written so
BLANK = ""
# no cell is missing: every cell is read as the text it holds
NOTHING_MISSING: tuple[str, ...] = ()
# pandas' own list (a blank cell, "NA", "NaN", "null", ...): a scan table's blank covariate is missing
ANY_MISSING = None

# float formats (printf), per kind of table
STATS_DIGITS = "%.6g"  # statistics, summaries, evaluation metrics
MEASUREMENT_DIGITS = "%.10g"  # measurements and the cohort's QC table: values as measured
REVIEW_DIGITS = "%.4g"  # the review page's scan table

# text columns of the statistics tables: a missing cell (None, written "NaN") reads back as ""
STATISTICS_TEXT_COLUMNS = (
    "note",
    "group",
    "members",
    "family",
    "covariates",
    "note_partial",
    "primary",
    "note_M",
    "note_F",
    "random_slope_note",
)


def write_tsv(
    table: pd.DataFrame, path: str | Path | IO[str] | None, digits: str | None = None, missing: str = MISSING
) -> str | None:
    """Write ``table`` as TSV to a path or an open file, floats in the format ``digits`` (None: as many
    digits as it takes), missing cells as ``missing``. With ``path`` None, the text instead."""
    return table.to_csv(path, sep="\t", index=False, na_rep=missing, float_format=digits)


def read_tsv(
    path: str | Path | IO[str],
    missing: Sequence[str] | Mapping[str, Sequence[str]] | None = (MISSING,),
    text: Sequence[str] = (),
    **options,
) -> pd.DataFrame:
    """A TSV table. A cell is missing (NaN) only where it is one of ``missing`` (per column where a mapping;
    ANY_MISSING: pandas' list); columns of ``text`` present in the table read a missing cell as "" and every
    cell as text. Other options (dtype, comment) go to ``pandas.read_csv``."""
    import pandas as pd

    keep_default = missing is ANY_MISSING
    na_values = None if keep_default or not missing else missing if isinstance(missing, Mapping) else list(missing)
    table = pd.read_csv(path, sep="\t", keep_default_na=keep_default, na_values=na_values, **options)
    for column in text:
        if column in table.columns:
            table[column] = table[column].astype(object).where(table[column].notna(), "").astype(str)
    return table


def read_statistics(path: str | Path | IO[str]) -> pd.DataFrame:
    """A statistics table as written with STATS_DIGITS: "NaN" is a missing number, a text column's missing
    cell (notes, group, family, members, covariates, primary) is ""."""
    return read_tsv(path, text=STATISTICS_TEXT_COLUMNS)
