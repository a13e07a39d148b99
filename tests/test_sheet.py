"""load_cohort_sheet: validation of the cohort sheet, every problem with its line and subject."""

import os
import re
import zipfile
from pathlib import Path

import pandas as pd
import pytest

from ctcohort.sheet import MAX_REPORTED_PROBLEMS, CohortSheetError, covariate_columns, load_cohort_sheet

SCHEMA = Path(__file__).parents[1] / "workflow/schemas/sheet.schema.yaml"
HEADER = ("subject", "ct", "age", "sex")


def touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


def write_sheet(folder: Path, rows, header=HEADER, name="cohort.tsv") -> Path:
    """A TSV sheet; ``rows`` are sequences of cells in ``header`` order."""
    lines = ["\t".join(header), *("\t".join(str(cell) for cell in row) for row in rows)]
    path = folder / name
    path.write_text("\n".join(lines) + "\n")
    return path


def load(path, required_files=("ct",)):
    return load_cohort_sheet(path, SCHEMA, required_files=required_files)


def problems(error: pytest.ExceptionInfo) -> list[str]:
    """The per-row problem lines of a CohortSheetError (not the heading, which names the sheet's path)."""
    return [line.strip() for line in str(error.value).splitlines() if line.startswith("  line ")]


@pytest.fixture
def scans(tmp_path):
    """Two CT files next to the sheet (relative paths ct/s1.nii.gz, ct/s2.nii.gz)."""
    touch(tmp_path / "ct" / "s1.nii.gz")
    touch(tmp_path / "ct" / "s2.nii.gz")
    return tmp_path


# --- a valid sheet ---------------------------------------------------------------------------


def test_valid_sheet_resolves_paths_and_types(tmp_path):
    sheet_dir = tmp_path / "study"
    rel_ct = touch(sheet_dir / "images" / "s1.nii.gz")
    rel_seg = touch(sheet_dir / "segs" / "s1.nii.gz")
    abs_ct = touch(tmp_path / "elsewhere" / "s2.nii.gz")  # outside the sheet's folder
    rel_seg2 = touch(sheet_dir / "segs" / "s2.nii.gz")
    header = ("subject", "ct", "seg", "age", "sex", "contrast", "bmi", "site")
    path = write_sheet(
        sheet_dir,
        [
            ("s1", "images/s1.nii.gz", "./segs/s1.nii.gz", "42", "M", "1", "23.5", "north"),
            ("s2", str(abs_ct), "segs/../segs/s2.nii.gz", "67.5", "F", "0", "31", "south"),
        ],
        header=header,
    )
    sheet = load(path, required_files=("ct", "seg"))

    assert list(sheet.index) == ["s1", "s2"]
    assert sheet.index.name == "subject"
    assert list(sheet["subject"]) == ["s1", "s2"]  # subject also kept as a column
    assert list(sheet.columns) == list(header)

    # relative paths resolved against the sheet's folder, absolute paths kept as given
    assert Path(sheet.at["s1", "ct"]) == rel_ct
    assert Path(sheet.at["s1", "seg"]) == rel_seg
    assert sheet.at["s2", "ct"] == str(abs_ct)
    assert Path(sheet.at["s2", "seg"]) == rel_seg2
    assert ".." not in sheet.at["s2", "seg"]
    for column in ("ct", "seg"):
        assert all(os.path.isabs(p) and os.path.exists(p) for p in sheet[column])

    assert pd.api.types.is_numeric_dtype(sheet["age"])
    assert sheet["age"].tolist() == [42.0, 67.5]
    assert pd.api.types.is_integer_dtype(sheet["contrast"])
    assert sheet["contrast"].tolist() == [1, 0]
    assert list(sheet["sex"]) == ["M", "F"]

    # extra covariates: numbers where every cell is a number, text otherwise
    assert pd.api.types.is_numeric_dtype(sheet["bmi"])
    assert sheet["bmi"].tolist() == [23.5, 31.0]
    assert not pd.api.types.is_numeric_dtype(sheet["site"])
    assert list(sheet["site"]) == ["north", "south"]

    assert covariate_columns(sheet) == ["age", "sex", "contrast", "bmi", "site"]


def test_valid_sheet_with_blank_optional_cells(scans):
    path = write_sheet(
        scans,
        [("s1", "ct/s1.nii.gz", "30", "M", "", "7"), ("s2", "ct/s2.nii.gz", "40", "F", "", "")],
        header=(*HEADER, "seg", "score"),
    )
    sheet = load(path)  # seg is optional by default
    assert sheet["seg"].isna().all()
    assert pd.api.types.is_numeric_dtype(sheet["score"])
    assert sheet.at["s1", "score"] == 7
    assert pd.isna(sheet.at["s2", "score"])


def test_blank_age_and_sex_load_as_missing_but_a_bad_age_is_an_error(scans):
    """De-identified exports blank age and sex: the scan stays in the sheet, its value missing."""
    path = write_sheet(scans, [("s1", "ct/s1.nii.gz", "", ""), ("s2", "ct/s2.nii.gz", "40", "F")])
    sheet = load(path)
    assert pd.isna(sheet.at["s1", "age"]) and pd.isna(sheet.at["s1", "sex"])
    assert sheet.at["s2", "age"] == 40
    path = write_sheet(scans, [("s1", "ct/s1.nii.gz", "forty", "")])
    with pytest.raises(CohortSheetError, match="line 2 .*age"):
        load(path)


def test_cells_and_header_are_stripped(scans):
    path = scans / "cohort.tsv"
    path.write_text(" subject \tct\t age\tsex\n s1 \t ct/s1.nii.gz \t 50 \t F \n")
    sheet = load(path)
    assert list(sheet.index) == ["s1"]
    assert sheet.at["s1", "age"] == 50
    assert sheet.at["s1", "sex"] == "F"
    assert Path(sheet.at["s1", "ct"]) == scans / "ct" / "s1.nii.gz"


@pytest.mark.parametrize("subject", ["S-01", "a.b_c", "7", "x_1.2-3"])
def test_accepted_subject_ids(scans, subject):
    path = write_sheet(scans, [(subject, "ct/s1.nii.gz", "30", "M")])
    assert list(load(path).index) == [subject]


@pytest.mark.parametrize("age", ["0", "130", "0.5"])
def test_age_bounds_accepted(scans, age):
    path = write_sheet(scans, [("s1", "ct/s1.nii.gz", age, "M")])
    assert load(path).at["s1", "age"] == float(age)


# --- single problems -------------------------------------------------------------------------


def test_duplicate_subject(scans):
    path = write_sheet(
        scans,
        [
            ("s1", "ct/s1.nii.gz", "30", "M"),
            ("s2", "ct/s2.nii.gz", "31", "F"),
            ("s1", "ct/s2.nii.gz", "32", "F"),
        ],
    )
    with pytest.raises(CohortSheetError) as info:
        load(path)
    # the duplicate is on line 4 (header is line 1), first seen on line 2
    (problem,) = problems(info)
    assert problem.startswith("line 4 ")
    assert "duplicate" in problem
    assert "line 2" in problem
    assert "'s1'" in problem


def test_repeated_duplicates_point_to_the_first_line(scans):
    rows = [("s1", "ct/s1.nii.gz", str(30 + i), "M") for i in range(3)]
    path = write_sheet(scans, rows)
    with pytest.raises(CohortSheetError) as info:
        load(path)
    assert "2 problem(s)" in str(info.value)
    found = problems(info)
    assert [p.split(" (")[0] for p in found] == ["line 3", "line 4"]
    assert all(p.endswith("first seen on line 2") for p in found)


@pytest.mark.parametrize("subject", ["a b", "-x", ".hidden", "x/y", "é1", "_a"])
def test_bad_subject_ids(scans, subject):
    path = write_sheet(scans, [("ok1", "ct/s1.nii.gz", "30", "M"), (subject, "ct/s2.nii.gz", "40", "F")])
    with pytest.raises(CohortSheetError) as info:
        load(path)
    assert "1 problem" in str(info.value)
    (problem,) = problems(info)
    assert problem.startswith(f"line 3 (subject {subject!r})")
    assert "'subject'" in problem


@pytest.mark.parametrize("column", ["subject", "ct", "age", "sex"])
def test_missing_required_column(scans, column):
    header = tuple(c for c in HEADER if c != column)
    values = {"subject": "s1", "ct": "ct/s1.nii.gz", "age": "30", "sex": "M"}
    path = write_sheet(scans, [tuple(values[c] for c in header)], header=header)
    with pytest.raises(CohortSheetError) as info:
        load(path)
    assert re.search(rf"missing column\(s\) {column}\b", str(info.value))


def test_missing_required_file_column(scans):
    path = write_sheet(scans, [("s1", "ct/s1.nii.gz", "30", "M")])
    with pytest.raises(CohortSheetError, match=r"missing column\(s\) seg"):
        load(path, required_files=("ct", "seg"))


@pytest.mark.parametrize("age", ["forty", "40 years", "-1", "131", "1e3"])
def test_bad_age(scans, age):
    path = write_sheet(scans, [("s1", "ct/s1.nii.gz", "30", "M"), ("s2", "ct/s2.nii.gz", age, "F")])
    with pytest.raises(CohortSheetError) as info:
        load(path)
    assert "1 problem" in str(info.value)
    (problem,) = problems(info)
    assert problem.startswith("line 3 (subject 's2')")
    assert "'age'" in problem


def test_non_numeric_age_message_shows_value(scans):
    path = write_sheet(scans, [("s1", "ct/s1.nii.gz", "forty", "M")])
    with pytest.raises(CohortSheetError) as info:
        load(path)
    (problem,) = problems(info)
    assert problem.startswith("line 2 (subject 's1')")
    assert "'age'" in problem and "forty" in problem


@pytest.mark.parametrize("sex", ["m", "male", "X", "MF"])
def test_bad_sex(scans, sex):
    path = write_sheet(scans, [("s1", "ct/s1.nii.gz", "30", sex)])
    with pytest.raises(CohortSheetError) as info:
        load(path)
    (problem,) = problems(info)
    assert problem.startswith("line 2 (subject 's1')")
    assert "'sex'" in problem and repr(sex) in problem


@pytest.mark.parametrize("contrast", ["2", "yes", "0.5"])
def test_bad_contrast(scans, contrast):
    path = write_sheet(scans, [("s1", "ct/s1.nii.gz", "30", "M", contrast)], header=(*HEADER, "contrast"))
    with pytest.raises(CohortSheetError) as info:
        load(path)
    found = problems(info)  # the schema may object twice (type and enum): both on this cell
    assert found
    assert all(p.startswith("line 2 (subject 's1')") and "'contrast'" in p for p in found)


def test_missing_file(scans):
    path = write_sheet(scans, [("s1", "ct/s1.nii.gz", "30", "M"), ("s2", "ct/nothere.nii.gz", "40", "F")])
    with pytest.raises(CohortSheetError) as info:
        load(path)
    (problem,) = problems(info)
    assert problem.startswith("line 3 (subject 's2')")
    assert "'ct'" in problem and "not found" in problem
    # the path is reported as resolved against the sheet's folder
    assert problem.endswith(str(scans / "ct" / "nothere.nii.gz"))


def test_cluster_jobs_skip_the_file_checks_but_not_the_values(scans):
    """A cluster job re-parses the workflow: the main process has checked the files already."""
    path = write_sheet(scans, [("s1", "ct/s1.nii.gz", "30", "M"), ("s2", "ct/nothere.nii.gz", "40", "F")])
    sheet = load_cohort_sheet(path, SCHEMA, check_files=False)
    assert sheet.at["s2", "ct"] == str(scans / "ct" / "nothere.nii.gz")
    bad_age = write_sheet(scans, [("s1", "ct/s1.nii.gz", "old", "M")], name="bad.tsv")
    with pytest.raises(CohortSheetError, match="'age'"):
        load_cohort_sheet(bad_age, SCHEMA, check_files=False)


def test_missing_optional_file_is_checked_too(scans):
    path = write_sheet(scans, [("s1", "ct/s1.nii.gz", "30", "M", "ref/s1.nii.gz")], header=(*HEADER, "reference"))
    with pytest.raises(CohortSheetError) as info:
        load(path)
    (problem,) = problems(info)
    assert problem.startswith("line 2 (subject 's1')")
    assert "'reference'" in problem and problem.endswith(str(scans / "ref" / "s1.nii.gz"))


def test_missing_absolute_file_reported_as_given(scans, tmp_path):
    missing = tmp_path / "gone" / "s1.nii.gz"
    path = write_sheet(scans, [("s1", str(missing), "30", "M")])
    with pytest.raises(CohortSheetError, match=re.escape(str(missing))):
        load(path)


def test_required_seg_empty(scans):
    touch(scans / "seg" / "s1.nii.gz")
    path = write_sheet(
        scans,
        [("s1", "ct/s1.nii.gz", "30", "M", "seg/s1.nii.gz"), ("s2", "ct/s2.nii.gz", "40", "F", "")],
        header=(*HEADER, "seg"),
    )
    assert load(path)["seg"].isna().tolist() == [False, True]  # optional: fine
    with pytest.raises(CohortSheetError) as info:
        load(path, required_files=("ct", "seg"))
    assert "1 problem" in str(info.value)
    (problem,) = problems(info)
    assert problem.startswith("line 3 ")
    assert "'s2'" in problem and "'seg'" in problem and "empty" in problem


def test_required_ct_empty(scans):
    path = write_sheet(scans, [("s1", "", "30", "M")])
    with pytest.raises(CohortSheetError) as info:
        load(path)
    found = problems(info)
    assert found
    assert all(p.startswith("line 2 (subject 's1')") and "'ct'" in p for p in found)


# --- many problems at once ---------------------------------------------------------------------


def test_all_problems_reported_at_once(scans):
    path = write_sheet(
        scans,
        [
            ("s1", "ct/s1.nii.gz", "30", "M"),  # line 2: fine
            ("s2", "ct/s2.nii.gz", "forty", "M"),  # line 3: age
            ("s3", "ct/s2.nii.gz", "50", "Q"),  # line 4: sex
            ("s4", "ct/missing.nii.gz", "60", "F"),  # line 5: file
            ("s1", "ct/s1.nii.gz", "70", "F"),  # line 6: duplicate
            ("bad id", "ct/s1.nii.gz", "80", "M"),  # line 7: id
        ],
    )
    with pytest.raises(CohortSheetError) as info:
        load(path)
    message = str(info.value)
    assert "5 problem(s)" in message
    expected = {
        3: ("'s2'", "'age'"),
        4: ("'s3'", "'sex'"),
        5: ("'s4'", "'ct'"),
        6: ("'s1'", "duplicate"),
        7: ("'bad id'", "'subject'"),
    }
    found = problems(info)
    assert len(found) == len(expected)
    for line, words in expected.items():
        matching = [m for m in found if m.startswith(f"line {line} ")]
        assert len(matching) == 1, (line, message)
        for word in words:
            assert word in matching[0]


def test_problem_count_beyond_display_limit(scans):
    n_rows, shown = 40, MAX_REPORTED_PROBLEMS
    rows = [(f"s{i}", "ct/s1.nii.gz", "old", "M") for i in range(n_rows)]
    path = write_sheet(scans, rows)
    with pytest.raises(CohortSheetError) as info:
        load(path)
    message = str(info.value)
    assert f"{n_rows} problem(s)" in message
    reported = problems(info)
    assert len(reported) == shown
    assert "line 2 (subject 's0')" in reported[0]
    assert f"line {shown + 1} (subject 's{shown - 1}')" in reported[-1]
    assert f"and {n_rows - shown} more" in message


# --- unusable files ------------------------------------------------------------------------


def test_header_only_sheet(tmp_path):
    path = write_sheet(tmp_path, [])
    with pytest.raises(CohortSheetError, match="no rows"):
        load(path)


def test_nonexistent_sheet(tmp_path):
    with pytest.raises(CohortSheetError, match="does not exist"):
        load(tmp_path / "nope.tsv")


def test_sheet_path_is_a_folder(tmp_path):
    with pytest.raises(CohortSheetError):
        load(tmp_path)


# --- malformed files and values that slipped through once --------------------------------------


def test_nan_age_is_not_a_number(scans):
    path = write_sheet(scans, [("s1", "ct/s1.nii.gz", "nan", "M")])
    with pytest.raises(CohortSheetError) as error:
        load(path)
    assert problems(error) and problems(error)[0].startswith("line 2 (subject 's1'): column 'age'")


def test_line_numbers_count_blank_lines(scans):
    path = scans / "cohort.tsv"
    path.write_text("subject\tct\tage\tsex\ns1\tct/s1.nii.gz\t40\tM\n\ns2\tct/missing.nii.gz\t40\tM\n")
    with pytest.raises(CohortSheetError) as error:
        load(path)
    assert problems(error)[0].startswith("line 4 (subject 's2')")


@pytest.mark.parametrize("extra_cells", [1, 2])
def test_row_with_more_cells_than_the_header_is_named(scans, extra_cells):
    path = scans / "cohort.tsv"
    row = "\t".join(["s1", "ct/s1.nii.gz", "40", "M", *["x"] * extra_cells])
    path.write_text(f"subject\tct\tage\tsex\n{row}\ns2\tct/s2.nii.gz\t50\tF\n")
    with pytest.raises(CohortSheetError) as error:
        load(path)
    assert problems(error) == [f"line 2: {4 + extra_cells} cells, but the header has 4 columns"]


def test_empty_file_is_a_sheet_error(tmp_path):
    path = tmp_path / "cohort.tsv"
    path.write_bytes(b"")
    with pytest.raises(CohortSheetError, match="is empty"):
        load(path)


def test_covariate_named_like_a_measurement_column_is_rejected(scans):
    path = write_sheet(scans, [("s1", "ct/s1.nii.gz", "40", "M", "control")], header=(*HEADER, "group"))
    with pytest.raises(CohortSheetError, match="group clash"):
        load(path)


def test_one_problem_per_bad_cell(scans):
    path = write_sheet(scans, [("s1", "ct/s1.nii.gz", "40", "M", "yes")], header=(*HEADER, "contrast"))
    with pytest.raises(CohortSheetError) as error:
        load(path)
    assert len(problems(error)) == 1


def test_ct_may_name_a_dicom_series_but_a_nifti_or_segmentation_is_a_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # paths below the working directory are given relative to it
    (tmp_path / "dicom" / "s1").mkdir(parents=True)  # a DICOM series' folder
    touch(tmp_path / "s2.zip")
    touch(tmp_path / "lists" / "s3.txt")
    (tmp_path / "s4.nii.gz").mkdir()  # a folder named like a NIfTI
    (tmp_path / "segs").mkdir()
    header = ("subject", "ct", "seg", "age", "sex")
    rows = [
        ("s1", "dicom/s1", "s2.zip", 40, "M"),
        ("s2", "s2.zip", "", 41, "F"),
        ("s3", "lists/s3.txt", "", 42, "M"),
        ("s4", "s4.nii.gz", "segs", 43, "F"),
    ]
    with pytest.raises(CohortSheetError) as error:
        load(write_sheet(tmp_path, rows, header))
    assert problems(error) == [
        "line 5 (subject 's4'): column 'ct': a folder, not a NIfTI file: s4.nii.gz",
        "line 5 (subject 's4'): column 'seg': a folder, not a NIfTI file: segs",
    ]
    sheet = load(write_sheet(tmp_path, rows[:3], header))
    assert sheet["ct"].tolist() == ["dicom/s1", "s2.zip", "lists/s3.txt"]


# --- what spreadsheets and editors write -------------------------------------------------------

SHEET_TEXT = "subject\tct\tage\tsex\ns1\tct/s1.nii.gz\t40\tM\ns2\tct/s2.nii.gz\t\tF\n"


@pytest.mark.parametrize(
    "encode",
    [
        pytest.param(lambda text: text.replace("\n", "\r\n").encode(), id="crlf"),
        pytest.param(lambda text: text.replace("\n", "\r").encode(), id="cr"),
        pytest.param(lambda text: b"\xef\xbb\xbf" + text.encode(), id="utf8-bom"),
        pytest.param(lambda text: b"\xef\xbb\xbf" + text.replace("\n", "\r\n").encode(), id="utf8-bom-crlf"),
        pytest.param(
            lambda text: text.replace("\n", "\r\n").encode("utf-16"), id="utf16-bom"
        ),  # Excel's "Unicode text"
        pytest.param(lambda text: text.replace("\n", "\t\n").encode(), id="trailing-empty-column"),
    ],
)
def test_unambiguous_encodings_and_line_ends_read_as_plain_utf8(scans, encode):
    path = scans / "cohort.tsv"
    path.write_bytes(encode(SHEET_TEXT))
    sheet = load(path)
    assert list(sheet.columns) == list(HEADER)  # no BOM in the first name, no '\r' in the last, no empty column
    assert list(sheet.index) == ["s1", "s2"]
    assert sheet.at["s1", "sex"] == "M" and sheet.at["s2", "sex"] == "F"  # not 'M\r'
    assert sheet.at["s1", "age"] == 40 and pd.isna(sheet.at["s2", "age"])
    assert Path(sheet.at["s2", "ct"]) == scans / "ct" / "s2.nii.gz"


def test_crlf_line_numbers_are_those_an_editor_shows(scans):
    path = scans / "cohort.tsv"
    path.write_bytes(b"subject\tct\tage\tsex\r\ns1\tct/s1.nii.gz\t40\tM\r\n\r\ns2\tct/s2.nii.gz\t40\tQ\r\n")
    with pytest.raises(CohortSheetError) as error:
        load(path)
    assert problems(error) == [
        "line 4 (subject 's2'): column 'sex': 'Q': accepted values are M or F, or a blank cell where unknown"
    ]


@pytest.mark.parametrize("separator, name", [(",", "commas"), (";", "semicolons")])
def test_a_comma_or_semicolon_separated_sheet_is_refused_naming_the_separator(scans, separator, name):
    path = scans / "cohort.tsv"
    path.write_text("\r\n".join(separator.join(cells) for cells in [HEADER, ("s1", "ct/s1.nii.gz", "40", "M")]))
    with pytest.raises(CohortSheetError) as error:
        load(path)
    message = str(error.value)
    assert f"line 1: the header is separated by {name}, not tabs" in message and "tab-separated" in message


def test_a_cell_holding_a_comma_is_fine_in_a_tab_separated_sheet(scans):
    path = write_sheet(scans, [("s1", "ct/s1.nii.gz", "40", "M", "north, ward 3")], header=(*HEADER, "site"))
    assert load(path).at["s1", "site"] == "north, ward 3"


def test_text_not_in_utf8_is_named_by_its_line(scans):
    path = scans / "cohort.tsv"
    path.write_bytes("subject\tct\tage\tsex\tsite\ns1\tct/s1.nii.gz\t40\tM\tZ\u00fcrich\n".encode("latin-1"))
    with pytest.raises(CohortSheetError, match=r"line 2: byte 0xfc is not UTF-8 text; save the sheet as UTF-8"):
        load(path)


@pytest.mark.parametrize(
    "header, message",
    [
        ("subject\tct\tage\tsex\tage", "column 'age' appears 2 times"),
        ("subject\tct\t\tage\tsex", "column 3 has no name"),
    ],
)
def test_a_header_with_a_repeated_or_unnamed_column_is_refused(scans, header, message):
    path = scans / "cohort.tsv"
    path.write_text(f"{header}\ns1\tct/s1.nii.gz\t40\tM\t41\n")
    with pytest.raises(CohortSheetError, match=f"line 1: {message}"):
        load(path)


@pytest.mark.parametrize("subject", ["a b", "a;b", "x/y", "../x", "..", "a..b", "x\\y", "a*", "s1;rm", "a" * 101])
def test_ids_that_are_unsafe_as_file_names_are_refused_with_the_line(scans, subject):
    path = write_sheet(scans, [("ok1", "ct/s1.nii.gz", "30", "M"), (subject, "ct/s2.nii.gz", "40", "F")])
    with pytest.raises(CohortSheetError) as info:
        load(path)
    (problem,) = problems(info)
    assert problem.startswith(f"line 3 (subject {subject!r}): column 'subject': ")


def test_ids_that_differ_in_case_only_are_duplicates(scans):
    """On a case-insensitive file system results/ct/S1.nii.gz and results/ct/s1.nii.gz are one file."""
    path = write_sheet(scans, [("s1", "ct/s1.nii.gz", "30", "M"), ("S1", "ct/s2.nii.gz", "40", "F")])
    with pytest.raises(CohortSheetError) as info:
        load(path)
    assert problems(info) == ["line 3 (subject 'S1'): subject differs from 's1' in case only, first seen on line 2"]


@pytest.mark.parametrize("age", ["-1", "-0.5", "130.5", "131", "250", "inf", "45Y", "4O"])
def test_an_age_out_of_range_or_not_a_number_names_the_cell_and_the_range(scans, age):
    path = write_sheet(scans, [("s1", "ct/s1.nii.gz", age, "M")])
    with pytest.raises(CohortSheetError) as info:
        load(path)
    assert problems(info) == [
        f"line 2 (subject 's1'): column 'age': {age!r}: accepted values are a number of years "
        "from 0 to 130, or a blank cell where unknown"
    ]


@pytest.mark.parametrize("sex", ["m", "O", "U", "W", "male", "1", "M/F"])
def test_an_unknown_sex_code_names_the_accepted_values(scans, sex):
    path = write_sheet(scans, [("s1", "ct/s1.nii.gz", "30", sex)])
    with pytest.raises(CohortSheetError) as info:
        load(path)
    assert problems(info) == [
        f"line 2 (subject 's1'): column 'sex': {sex!r}: accepted values are M or F, or a blank cell where unknown"
    ]


def test_a_workbook_is_refused_with_what_to_save_instead(tmp_path):
    path = tmp_path / "cohort.tsv"
    with zipfile.ZipFile(path, "w") as workbook:  # what an .xlsx file is
        workbook.writestr("xl/workbook.xml", "<workbook/>")
    with pytest.raises(CohortSheetError, match=r"a spreadsheet workbook \(zip\), not text: save the sheet as tab-sep"):
        load(path)


@pytest.mark.slow
def test_sheet_problems_stop_the_workflow_before_any_job_naming_line_and_column(tmp_path):
    """Through the real workflow: a sheet as a Windows spreadsheet writes it (BOM, CRLF) is read, and its
    problems stop the run before any job, each with its line, subject and column."""
    from conftest import run_workflow

    for name in ("s1", "s2", "s3", "s4", "s5"):
        touch(tmp_path / "data" / f"{name}.nii.gz")
        touch(tmp_path / "data" / f"{name}_seg.nii.gz")
    rows = [("s1", 40, "M"), ("a;b", 41, "F"), ("s3", 131, "F"), ("s4", 42, "O"), ("S1", 43, "M")]
    lines = [
        "subject\tct\tseg\tage\tsex",
        *(f"{s}\ts{i}.nii.gz\ts{i}_seg.nii.gz\t{age}\t{sex}" for i, (s, age, sex) in enumerate(rows, start=1)),
    ]
    sheet = tmp_path / "data" / "cohort.tsv"
    sheet.write_bytes(b"\xef\xbb\xbf" + "\r\n".join(lines).encode() + b"\r\n")
    result = run_workflow(tmp_path, {"cohort": str(sheet), "segmentation": {"method": "precomputed"}}, check=False)
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "4 problem(s), nothing was run" in output
    assert "line 3 (subject 'a;b'): column 'subject'" in output
    assert "line 4 (subject 's3'): column 'age': '131': accepted values are a number of years from 0 to 130" in output
    assert "line 5 (subject 's4'): column 'sex': 'O': accepted values are M or F" in output
    assert "line 6 (subject 'S1'): subject differs from 's1' in case only, first seen on line 2" in output
    assert not (tmp_path / "results").exists()
