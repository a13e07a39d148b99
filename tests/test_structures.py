import pandas as pd
import pytest

from ctcohort.structures import GROUPS, load_structure_table


def test_v1_table_has_the_papers_104_structures_and_group_counts():
    table = load_structure_table("total_v1")
    assert len(table) == 104 and list(table["label"]) == list(range(1, 105))
    assert table["group"].value_counts().to_dict() == {"bone": 59, "organ": 27, "muscle": 10, "vessel": 8}


def test_v2_table_has_117_structures_each_in_a_group():
    table = load_structure_table("total_v2")
    assert len(table) == 117
    assert set(table["group"]) <= set(GROUPS)


def test_custom_csv_without_group(tmp_path):
    path = tmp_path / "mine.csv"
    pd.DataFrame({"label": [2, 1], "name": ["b", "a"]}).to_csv(path, index=False)
    table = load_structure_table(path)
    assert list(table["name"]) == ["a", "b"] and list(table["group"]) == ["", ""]


@pytest.mark.parametrize(
    "rows, message",
    [
        ({"label": [1, 1], "name": ["a", "b"]}, "duplicate label"),
        ({"label": [0, 1], "name": ["a", "b"]}, "positive"),
        ({"name": ["a"]}, "missing column"),
    ],
)
def test_bad_tables_are_rejected(tmp_path, rows, message):
    path = tmp_path / "bad.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    with pytest.raises(ValueError, match=message):
        load_structure_table(path)


def test_unknown_table_name():
    with pytest.raises(FileNotFoundError, match="total_v1"):
        load_structure_table("total_v9")


@pytest.mark.parametrize(
    "text, message",
    [
        ("label,name\nx,a\n", "integers"),
        ("label,name\n1.5,a\n", "integers"),
        ("label,name\n1,\n", "needs a name"),
        ("label,name\n", "no rows"),
        ("label,name,group\n1,a,organ\n2,a,organ\n", "duplicate name"),
    ],
)
def test_malformed_tables_are_clear_errors(tmp_path, text, message):
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        load_structure_table(path)


def test_group_may_be_left_blank_per_row(tmp_path):
    path = tmp_path / "mine.csv"
    path.write_text("label,name,group\n1,a,organ\n2,b,\n")
    assert load_structure_table(path)["group"].tolist() == ["organ", ""]
