"""The cohort sheet: one row per scan, validated before anything runs.

Every problem is reported with the sheet's line number and the subject id, all
at once, so a user fixes a 5,000-row sheet in one pass instead of fifty runs.

What a spreadsheet or an editor writes is accepted where it is unambiguous: UTF-8 with or without a byte-order
mark, UTF-16 with one (Excel's "Unicode text"), Windows (CRLF) or old Mac (CR) line ends, blank lines, spaces
around cells, empty columns at the end of the header. A sheet separated by commas or semicolons is refused with
the separator named: paths and covariates may hold those characters, and quoting rules differ between
programs, so such a sheet cannot be read the same way everywhere.
"""

import codecs
import csv
import io
import math
import os
from collections import Counter
from pathlib import Path

import jsonschema
import pandas as pd
import yaml

from ctcohort.columns import MEASURE_COLUMNS, MODEL_COLUMN, is_nifti

PATH_COLUMNS = ("ct", "seg", "reference")
# Columns of the measurement table: a covariate of the same name would be ambiguous there.
RESERVED_COLUMNS = (*MEASURE_COLUMNS, MODEL_COLUMN)
MAX_REPORTED_PROBLEMS = 30
# Separators a header written by a spreadsheet's "CSV" export may hold instead of tabs.
OTHER_SEPARATORS = {",": "commas", ";": "semicolons", "|": "vertical bars"}
# What each enumerated column accepts, said in the message when a cell holds something else.
ACCEPTED_VALUES = {
    "age": "a number of years from 0 to 130, or a blank cell where unknown",
    "sex": "M or F, or a blank cell where unknown",
    "contrast": "1 or 0, or a blank cell where unknown",
}
# Columns every sheet has, though a cell may be blank (de-identified exports blank age and sex): the scan is
# measured and left out of the analyses that need the value.
COVARIATE_COLUMNS = ("age", "sex")


class CohortSheetError(ValueError):
    """The cohort sheet cannot be used; the message lists every problem found."""


def _convert(value: str, kind: str | list):
    """Sheet cells are text; give numbers to the schema as numbers (or leave text for it to reject)."""
    kinds = [kind] if isinstance(kind, str) else kind
    for target in ("integer", "number"):
        if target in kinds:
            try:
                number = float(value)
            except ValueError:
                return value
            if not math.isfinite(number):
                return value  # "nan", "inf": text, so the schema rejects it
            if target == "integer" and number.is_integer():
                return int(number)
            return number
    return value


def _resolve(path: str, base: Path) -> str:
    """The path relative to the working directory where it lies below it (jobs run there, and tables and
    reports then name no folders of the machine), absolute otherwise."""
    absolute = os.path.abspath(path if os.path.isabs(path) else base / path)
    relative = os.path.relpath(absolute)
    return absolute if relative.split(os.sep)[0] == os.pardir else relative


def load_cohort_sheet(
    path: str | Path, schema_path: str | Path, required_files: tuple[str, ...] = ("ct",), check_files: bool = True
) -> pd.DataFrame:
    """Read and validate a cohort sheet; return it with paths resolved, indexed by subject.

    ``required_files``: path columns that must be filled in on every row; every
    path given (required or not) must exist, unless ``check_files`` is False (cluster jobs re-parse
    the workflow: the main process has checked the files once, thousands of stats per job are waste).
    """
    path = Path(path)
    if not path.is_file():
        problem = "is a folder, not a file" if path.is_dir() else "does not exist"
        raise CohortSheetError(f"cohort sheet {path} {problem}")
    schema = yaml.safe_load(Path(schema_path).read_text())
    header, records = _read_tsv(path)
    _check_header(path, header, schema, required_files)
    if not records:
        raise CohortSheetError(f"cohort sheet {path} has no rows")
    validator = jsonschema.Draft202012Validator(schema)
    kinds = {name: spec.get("type", "string") for name, spec in schema["properties"].items()}
    problems, rows, first_line = [], [], {}
    for line, cells in records:
        if len(cells) != len(header):
            problems.append(f"line {line}: {len(cells)} cells, but the header has {len(header)} columns")
            continue
        record = dict(zip(header, cells))
        where = f"line {line} (subject {record.get('subject', '')!r})"
        row = {k: _convert(v, kinds.get(k, "string")) for k, v in record.items() if v != ""}
        problems += [
            f"{where}: column {column!r} is empty"
            for column in required_files
            if column not in row and column not in schema.get("required", [])
        ]
        problems += [f"{where}: {problem}" for problem in _cell_problems(validator, row, record)]
        problems += [
            f"{where}: {problem}" for problem in _subject_problems(record.get("subject", ""), line, first_line)
        ]
        problems += [f"{where}: {problem}" for problem in _resolve_paths(row, path.parent, check_files)]
        rows.append(row)
    if problems:
        shown = problems[:MAX_REPORTED_PROBLEMS]
        more = len(problems) - len(shown)
        raise CohortSheetError(
            f"cohort sheet {path}: {len(problems)} problem(s), nothing was run:\n  "
            + "\n  ".join(shown)
            + (f"\n  ... and {more} more" if more else "")
        )
    return _sheet_frame(rows, header, schema)


def _check_header(path: Path, header: list[str], schema: dict, required_files: tuple[str, ...]) -> None:
    missing = [c for c in [*schema.get("required", []), *COVARIATE_COLUMNS, *required_files] if c not in header]
    if missing:
        raise CohortSheetError(
            f"cohort sheet {path}: missing column(s) {', '.join(dict.fromkeys(missing))} "
            f"(found: {', '.join(header)}); the sheet is tab-separated with a header line"
        )
    reserved = [c for c in header if c in RESERVED_COLUMNS]
    if reserved:
        raise CohortSheetError(
            f"cohort sheet {path}: column(s) {', '.join(reserved)} clash with the measurement table's "
            "columns; rename them"
        )


def _cell_problems(validator, row: dict, record: dict) -> list[str]:
    """The schema's complaints about a row, one per cell (a bad value may break several rules), in words."""
    problems, reported = [], set()
    for error in sorted(validator.iter_errors(row), key=lambda e: list(e.path)):
        column = error.path[0] if error.path else None
        if column in reported:
            continue
        reported.add(column)
        message = error.message
        if column == "subject" and error.validator == "pattern":
            message += " (letters, digits, '_', '.' and '-', starting with a letter or digit)"
        elif column in ACCEPTED_VALUES and error.validator in ("enum", "type", "minimum", "maximum"):
            message = f"{record[column]!r}: accepted values are {ACCEPTED_VALUES[column]}"
        problems.append((f"column {column!r}: " if column else "") + message)
    if ".." in record.get("subject", "") and "subject" not in reported:
        problems.append("column 'subject': '..' in an id (ids name files and folders)")
    return problems


def _subject_problems(subject: str, line: int, first_line: dict) -> list[str]:
    """A subject seen before; ``first_line`` (case-folded id -> (line, id)) remembers this one."""
    # ids that differ in case only name the same files on case-insensitive file systems (macOS, Windows)
    key = subject.casefold()
    problems = []
    if key in first_line:
        seen_line, seen = first_line[key]
        same = "duplicate subject" if seen == subject else f"subject differs from {seen!r} in case only"
        problems.append(f"{same}, first seen on line {seen_line}")
    first_line.setdefault(key, (line, subject))
    return problems


def _resolve_paths(row: dict, folder: Path, check_files: bool) -> list[str]:
    """Resolves the row's paths against the sheet's ``folder`` (in place); the problems of those that are missing
    or are folders where a file belongs."""
    problems = []
    for column in PATH_COLUMNS:
        if isinstance(row.get(column), str):
            row[column] = _resolve(row[column], folder)
            if check_files and not os.path.exists(row[column]):
                problems.append(f"column {column!r}: file not found: {row[column]}")
            elif check_files and os.path.isdir(row[column]) and (column != "ct" or is_nifti(row[column])):
                # a folder in ct is a DICOM series; a NIfTI, a segmentation or a reference is a file
                problems.append(f"column {column!r}: a folder, not a NIfTI file: {row[column]}")
    return problems


def _sheet_frame(rows: list[dict], header: list[str], schema: dict) -> pd.DataFrame:
    frame = pd.DataFrame(rows, columns=header)
    for column in set(frame.columns) - set(schema["properties"]):
        # extra covariates: numbers where every filled cell is a number, text otherwise
        try:
            frame[column] = pd.to_numeric(frame[column])
        except (ValueError, TypeError):
            pass
    return frame.set_index("subject", drop=False)


def _decode(path: Path) -> str:
    """The sheet's text: UTF-8 (a byte-order mark dropped), or UTF-16 where a byte-order mark says so."""
    raw = path.read_bytes()
    if raw[:4] == b"PK\x03\x04":
        raise CohortSheetError(
            f"cohort sheet {path}: a spreadsheet workbook (zip), not text: save the sheet as tab-separated text "
            "(a spreadsheet's 'Text (tab-delimited)' export)"
        )
    if raw[:2] in (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE):
        try:
            return raw.decode("utf-16")
        except UnicodeDecodeError as err:
            raise CohortSheetError(f"cohort sheet {path}: starts as UTF-16 text but is not ({err.reason})") from err
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise CohortSheetError(
            f"cohort sheet {path}: line {line}: byte 0x{raw[err.start]:02x} is not UTF-8 text; save the sheet as "
            "UTF-8 (a spreadsheet's 'UTF-8 text' or 'Unicode' export)"
        ) from err


def _read_tsv(path: Path) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """Header and (line number, stripped cells) of each non-blank row; line numbers as an editor shows them."""
    text = _decode(path)
    if "\x00" in text:
        raise CohortSheetError(f"cohort sheet {path}: holds NUL characters, not a tab-separated text file")
    # CRLF, CR and LF line ends alike (quoting is off: a quote is a character of its cell)
    rows = csv.reader(io.StringIO(text, newline=""), delimiter="\t", quoting=csv.QUOTE_NONE)
    try:
        lines = [
            (n, [c.strip() for c in cells]) for n, cells in enumerate(rows, start=1) if any(c.strip() for c in cells)
        ]
    except csv.Error as err:
        raise CohortSheetError(f"cohort sheet {path}: line {rows.line_num}: {err}") from err
    if not lines:
        raise CohortSheetError(f"cohort sheet {path} is empty: expected a header line and one row per scan")
    (header_line, header), records = lines[0], lines[1:]
    while len(header) > 1 and header[-1] == "":
        header = header[:-1]  # a spreadsheet's trailing empty columns; their cells must be blank (checked below)
    if len(header) == 1:
        used = [name for separator, name in OTHER_SEPARATORS.items() if separator in header[0]]
        if used:
            raise CohortSheetError(
                f"cohort sheet {path}: line {header_line}: the header is separated by {used[0]}, not tabs: "
                "save the sheet as tab-separated text (a spreadsheet's 'Text (tab-delimited)' export); a sheet "
                "separated by commas or semicolons is not read, because paths and values may hold them"
            )
    unnamed = [f"column {i} has no name" for i, name in enumerate(header, start=1) if not name]
    repeated = [f"column {name!r} appears {n} times" for name, n in Counter(header).items() if name and n > 1]
    if unnamed or repeated:
        raise CohortSheetError(f"cohort sheet {path}: line {header_line}: " + "; ".join(unnamed + repeated))
    width = len(header)
    records = [(n, cells[:width] if len(cells) > width and not any(cells[width:]) else cells) for n, cells in records]
    return header, records


def covariate_columns(sheet: pd.DataFrame) -> list[str]:
    """Columns that describe the subject (age, sex, contrast and any extra), not files."""
    return [c for c in sheet.columns if c not in ("subject", *PATH_COLUMNS)]
