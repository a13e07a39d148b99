"""The one TSV writer and reader: the bytes each kind of table has always had, and what reads back."""

import io

import numpy as np
import pandas as pd

from ctcohort.tables import (
    ANY_MISSING,
    BLANK,
    MEASUREMENT_DIGITS,
    NOTHING_MISSING,
    REVIEW_DIGITS,
    STATS_DIGITS,
    read_statistics,
    read_tsv,
    write_tsv,
)


def test_each_float_format_writes_the_digits_its_tables_have_always_had():
    table = pd.DataFrame({"subject": ["007"], "x": [1 / 3], "big": [123456789.125], "gap": [np.nan]})
    assert write_tsv(table, None, STATS_DIGITS) == "subject\tx\tbig\tgap\n007\t0.333333\t1.23457e+08\tNaN\n"
    assert write_tsv(table, None, MEASUREMENT_DIGITS) == "subject\tx\tbig\tgap\n007\t0.3333333333\t123456789.1\tNaN\n"
    assert write_tsv(table, None, REVIEW_DIGITS) == "subject\tx\tbig\tgap\n007\t0.3333\t1.235e+08\tNaN\n"
    assert write_tsv(table, None) == "subject\tx\tbig\tgap\n007\t0.3333333333333333\t123456789.125\tNaN\n"
    assert write_tsv(table, None, missing=BLANK).endswith("\t\n")


def test_a_path_and_an_open_file_get_the_same_bytes(tmp_path):
    table = pd.DataFrame({"structure": ["liver", "spleen"], "volume_ml": [1500.5, np.nan]})
    write_tsv(table, tmp_path / "t.tsv", STATS_DIGITS)
    handle = io.StringIO()
    write_tsv(table, handle, STATS_DIGITS)
    assert (tmp_path / "t.tsv").read_text() == handle.getvalue() == "structure\tvolume_ml\nliver\t1500.5\nspleen\tNaN\n"


def test_only_nan_is_missing_by_default_and_ids_stay_text_where_asked():
    text = "subject\tsex\tnote\tvalue\n007\t\tNA\tNaN\n010\tF\tnull\t2.5\n"
    table = read_tsv(io.StringIO(text), dtype={"subject": str})
    assert table["subject"].tolist() == ["007", "010"]
    assert table["sex"].tolist() == ["", "F"]  # a blank text cell is "", not NaN
    assert table["note"].tolist() == ["NA", "null"]
    assert np.isnan(table["value"].iloc[0]) and table["value"].iloc[1] == 2.5


def test_pandas_list_of_missing_cells_where_asked_and_none_where_asked():
    text = "subject\tsex\tnote\n007\t\tNA\n"
    anything = read_tsv(io.StringIO(text), ANY_MISSING, dtype={"subject": str})
    assert anything["subject"].iloc[0] == "007" and anything[["sex", "note"]].isna().all(axis=None)
    nothing = read_tsv(io.StringIO("a\tb\nNaN\t\n"), NOTHING_MISSING, dtype=str)
    assert nothing.iloc[0].tolist() == ["NaN", ""]
    per_column = read_tsv(io.StringIO("a\tb\nNaN\tNaN\n"), {"a": ["NaN"]}, dtype={"b": str})
    assert np.isnan(per_column["a"].iloc[0]) and per_column["b"].iloc[0] == "NaN"


def test_a_statistics_table_reads_back_a_missing_note_as_empty_text(tmp_path):
    table = pd.DataFrame(
        {
            "structure": ["liver", "aorta"],
            "rs": [0.25, np.nan],
            "note": [None, "too few scans"],
            "group": ["organ", None],
        }
    )
    write_tsv(table, tmp_path / "s.tsv", STATS_DIGITS)
    assert (tmp_path / "s.tsv").read_text().splitlines()[1] == "liver\t0.25\tNaN\torgan"
    back = read_statistics(tmp_path / "s.tsv")
    assert back["note"].tolist() == ["", "too few scans"] and back["group"].tolist() == ["organ", ""]
    assert back["rs"].iloc[0] == 0.25 and np.isnan(back["rs"].iloc[1])
