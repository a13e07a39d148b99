"""Sheet rows that are the same scan (ctcohort.duplicate_scans): found before any job; config duplicates
stops the run (error) or drops the later rows into failures.tsv (drop_later)."""

import os
import shutil

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from conftest import run_workflow
from dicom_edits import series_files, write_copies

from ctcohort import duplicate_scans
from ctcohort.duplicate_scans import (
    IDENTICAL_CONTENT,
    SAME_FILE,
    duplicate_failures,
    duplicates_message,
    duplicates_table,
    find_duplicate_scans,
    read_duplicates,
    sheet_lines,
    write_table_if_changed,
)


def sheet_of(rows: dict) -> pd.DataFrame:
    return pd.DataFrame({"subject": list(rows), "ct": [str(p) for p in rows.values()]}).set_index("subject", drop=False)


def later(groups) -> list[tuple[str, str, str]]:
    return [(d.subject, d.duplicate_of, d.reason) for g in groups for d in g.later]


def test_distinct_files_are_no_duplicates(tmp_path):
    rows = {}
    for i in range(5):
        (tmp_path / f"s{i}.nii.gz").write_bytes(bytes([i]) * (100 + i))
        rows[f"s{i}"] = tmp_path / f"s{i}.nii.gz"
    assert find_duplicate_scans(sheet_of(rows)) == []


def test_the_same_file_through_a_link_or_dotdot(tmp_path):
    (tmp_path / "sub").mkdir()
    scan = tmp_path / "a.nii.gz"
    scan.write_bytes(b"scan a" * 100)
    (tmp_path / "link.nii.gz").symlink_to(scan)
    (tmp_path / "other.nii.gz").write_bytes(b"scan b" * 100)
    rows = {
        "s1": scan,
        "s2": tmp_path / "other.nii.gz",
        "s3": tmp_path / "link.nii.gz",
        "s4": f"{tmp_path}/sub/../a.nii.gz",
    }
    groups = find_duplicate_scans(sheet_of(rows))
    assert len(groups) == 1 and groups[0].first == "s1" and groups[0].path == str(scan)
    assert later(groups) == [("s3", "s1", SAME_FILE), ("s4", "s1", SAME_FILE)]


def test_a_byte_copy_under_another_name(tmp_path):
    payload = os.urandom(300_000)  # larger than three blocks: the block hash reads parts only
    (tmp_path / "a.nii.gz").write_bytes(payload)
    (tmp_path / "copy.nii.gz").write_bytes(payload)
    groups = find_duplicate_scans(sheet_of({"first": tmp_path / "a.nii.gz", "again": tmp_path / "copy.nii.gz"}))
    assert later(groups) == [("again", "first", IDENTICAL_CONTENT)]


# a byte in the start, middle or end block, or outside every block (only the full hash tells them apart)
@pytest.mark.parametrize("where", [10, 150_000, 220_000, 299_990])
def test_the_same_size_with_other_bytes_is_no_duplicate(tmp_path, where):
    payload = bytearray(os.urandom(300_000))
    (tmp_path / "a.nii.gz").write_bytes(payload)
    payload[where] ^= 0xFF
    (tmp_path / "b.nii.gz").write_bytes(payload)
    assert find_duplicate_scans(sheet_of({"a": tmp_path / "a.nii.gz", "b": tmp_path / "b.nii.gz"})) == []


def write_series(folder, names, contents):
    folder.mkdir(parents=True)
    for name, content in zip(names, contents):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(content)


def test_a_dicom_folder_exported_again_with_other_file_names(tmp_path):
    slices = [os.urandom(2000) for _ in range(4)] + [b"\0" * 2000]  # equal sizes: the names cannot pair them
    write_series(tmp_path / "export1", [f"IM{i:04d}.dcm" for i in range(5)], slices)
    write_series(tmp_path / "export2", [f"sub/{i:08d}" for i in reversed(range(5))], slices)  # renamed, nested
    other = [*slices[:4], b"\1" * 2000]  # one slice differs, same sizes
    write_series(tmp_path / "other", [f"IM{i:04d}.dcm" for i in range(5)], other)
    (tmp_path / "list.txt").write_text("\n".join(f"export1/IM{i:04d}.dcm" for i in (4, 2, 0, 1, 3)) + "\n")
    rows = {
        "a": tmp_path / "export1",
        "b": tmp_path / "other",
        "c": tmp_path / "export2",
        "d": tmp_path / "list.txt",
        "e": tmp_path / "export1/",
    }
    groups = find_duplicate_scans(sheet_of(rows))
    assert later(groups) == [("c", "a", IDENTICAL_CONTENT), ("d", "a", IDENTICAL_CONTENT), ("e", "a", SAME_FILE)]


def test_empty_or_missing_sources_are_never_duplicates(tmp_path):
    (tmp_path / "empty1").mkdir()
    (tmp_path / "empty2").mkdir()
    (tmp_path / "zero1.nii.gz").write_bytes(b"")
    (tmp_path / "zero2.nii.gz").write_bytes(b"")
    rows = {
        "a": tmp_path / "empty1",
        "b": tmp_path / "empty2",
        "c": tmp_path / "zero1.nii.gz",
        "d": tmp_path / "zero2.nii.gz",
        "e": tmp_path / "gone1.nii.gz",
        "f": tmp_path / "gone2.nii.gz",
    }
    assert find_duplicate_scans(sheet_of(rows)) == []


def test_groups_in_sheet_order_and_what_drop_later_drops(tmp_path):
    for name in ("x", "y"):
        (tmp_path / f"{name}.nii.gz").write_bytes(name.encode() * 1000)
    for name in ("x2", "y2"):
        shutil.copy(tmp_path / f"{name[0]}.nii.gz", tmp_path / f"{name}.nii.gz")
    rows = {
        "s1": tmp_path / "y2.nii.gz",
        "s2": tmp_path / "x.nii.gz",
        "s3": tmp_path / "y.nii.gz",
        "s4": tmp_path / "x2.nii.gz",
        "s5": tmp_path / "y2.nii.gz",
    }
    groups = find_duplicate_scans(sheet_of(rows))
    assert [g.first for g in groups] == ["s1", "s2"]
    table = duplicates_table(groups)
    assert table.values.tolist() == [
        ["s3", "s1", IDENTICAL_CONTENT],
        ["s5", "s1", SAME_FILE],
        ["s4", "s2", IDENTICAL_CONTENT],
    ]
    assert duplicate_scans.dropped_subjects(groups) == ["s3", "s5", "s4"]
    failures = duplicate_failures(table)
    assert failures.values.tolist()[0] == ["s3", "duplicate", "duplicate_of:s1 (identical content)"]
    message = duplicates_message(groups, "cohort.tsv", {"s1": 2, "s3": 4})
    for words in (
        "line 2 (subject 's1')",
        "line 4 (subject 's3')",
        "subject 's5'",
        "same file",
        str(tmp_path / "x2.nii.gz"),
        "drop_later",
    ):
        assert words in message


def test_the_table_is_written_only_when_it_changes(tmp_path):
    table = pd.DataFrame([["s2", "s1", SAME_FILE]], columns=duplicate_scans.TABLE_COLUMNS)
    path = tmp_path / "results" / "duplicates.tsv"
    assert write_table_if_changed(table, path)
    os.utime(path, (1, 1))
    assert not write_table_if_changed(table, path)
    assert path.stat().st_mtime == 1
    assert read_duplicates(path).values.tolist() == [["s2", "s1", SAME_FILE]]
    assert write_table_if_changed(table.iloc[:0], path)
    assert read_duplicates(path).empty


def test_sheet_lines(tmp_path):
    (tmp_path / "cohort.tsv").write_text("subject\tct\n\nA\ta.nii\nB\tb.nii\n")
    assert sheet_lines(tmp_path / "cohort.tsv") == {"A": 3, "B": 4}
    assert sheet_lines(tmp_path / "missing.tsv") == {}


def test_identical_images_after_import(tmp_path):
    rng = np.random.default_rng(1)
    voxels = rng.integers(-1000, 1000, (6, 5, 4)).astype(np.int16)
    affine = np.diag([0.8, 0.8, 2.5, 1.0])
    moved = affine.copy()
    moved[2, 3] = 10.0  # the same voxels at another place
    changed = voxels.copy()
    changed[1, 1, 1] += 1
    images = {"a": (voxels, affine), "b": (changed, affine), "c": (voxels, moved), "d": (voxels, affine)}
    cts = {}
    for subject, (data, grid) in images.items():
        img = nib.Nifti1Image(data, grid)
        img.header["descrip"] = subject.encode()  # other header bytes, as two exports give
        nib.save(img, tmp_path / f"{subject}.nii.gz")
        cts[subject] = tmp_path / f"{subject}.nii.gz"
    (tmp_path / "broken.nii.gz").write_bytes(b"not a NIfTI")
    cts["broken"] = tmp_path / "broken.nii.gz"
    groups = duplicate_scans.identical_images(cts, {"a": "dicom/a", "d": "dicom/d"})
    assert later(groups) == [("d", "a", duplicate_scans.IDENTICAL_IMAGE)]
    assert groups[0].path == "dicom/a" and groups[0].later[0].path == "dicom/d"
    message = duplicates_message(groups, "cohort.tsv", after_import=True)
    assert "identical voxels and geometry" in message and "dicom/d" in message


# --- the real workflow, with copies of the real example CT ---------------------------------------------------

# the small real CT (30 slices) and its TotalSegmentator v2 segmentation, whose labels the imported DICOM
# series' segmentation shares (as tests/test_no_phi.py)
STUDY = {"segmentation": {"method": "precomputed"}, "structures": "total_v2"}


def duplicate_cohort(workdir, dicom=False):
    """Three distinct copies of the real CT (a voxel changed), and three rows that repeat the first one: the
    same file through a link, through '..', and a byte copy; with ``dicom``, the real DICOM series twice (the
    second export with another SeriesDescription: the same image once imported)."""
    from conftest import require_shared_data

    folder = require_shared_data() / "totalseg-example"
    data = workdir / "data"
    (data / "sub").mkdir(parents=True)
    ct = nib.load(folder / "example_ct_sm.nii.gz")
    hu = np.asanyarray(ct.dataobj).astype(np.int16)
    for i, name in enumerate(("a", "b", "c")):
        changed = hu.copy()
        changed[0, 0, 0] += i
        nib.save(nib.Nifti1Image(changed, ct.affine), data / f"{name}_ct.nii.gz")
    shutil.copy(data / "a_ct.nii.gz", data / "a_copy.nii.gz")
    (data / "a_link.nii.gz").symlink_to(data / "a_ct.nii.gz")
    seg = str(folder / "example_seg.nii.gz")
    rows = [
        ("s1", "a_ct.nii.gz", 40, "M"),
        ("s2", "b_ct.nii.gz", 50, "F"),
        ("s3", "a_link.nii.gz", 60, "M"),
        ("s4", "c_ct.nii.gz", 70, "F"),
        ("s5", "sub/../a_ct.nii.gz", 45, "M"),
        ("s6", "a_copy.nii.gz", 55, "F"),
    ]
    rows = [(s, ct, seg, age, sex) for s, ct, age, sex in rows]
    if dicom:  # the real DICOM series exported twice, with another header value: other bytes, the same image
        files = series_files(folder.parent)
        write_copies(files, data / "dicom" / "export1")
        write_copies(files, data / "dicom" / "export2", lambda ds, i: setattr(ds, "SeriesDescription", "again"))
        dicom_seg = str(folder / "example_seg_dicom.nii.gz")
        rows += [("d1", "dicom/export1", dicom_seg, 65, "F"), ("d2", "dicom/export2", dicom_seg, 66, "F")]
    sheet = pd.DataFrame([(*row, 0) for row in rows], columns=["subject", "ct", "seg", "age", "sex", "contrast"])
    sheet.to_csv(data / "cohort.tsv", sep="\t", index=False)
    return data / "cohort.tsv"


@pytest.mark.slow
def test_duplicates_stop_the_run_before_any_job(tmp_path):
    sheet = duplicate_cohort(tmp_path)
    result = run_workflow(tmp_path, {**STUDY, "cohort": str(sheet)}, check=False)
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert not (tmp_path / "results").exists()
    for words in (
        "3 row(s) name a scan that an earlier row names already",
        "line 2 (subject 's1')",
        "line 4 (subject 's3')",
        "a_link.nii.gz (same file)",
        "line 6 (subject 's5')",
        "line 7 (subject 's6')",
        "a_copy.nii.gz (identical content)",
        "duplicates: drop_later",
    ):
        assert words in output, (words, output[-3000:])
    assert "subject 's2'" not in output and "subject 's4'" not in output


AGGREGATED = "results/tables/measurements.tsv"


@pytest.fixture(scope="module")
def dropped_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("duplicates")
    sheet = duplicate_cohort(workdir, dicom=True)
    config = {**STUDY, "cohort": str(sheet), "duplicates": "drop_later"}
    # up to the aggregation, where duplicates are dropped and listed (the rules after it add nothing here)
    result = run_workflow(workdir, config, AGGREGATED)
    return workdir, config, result


@pytest.mark.slow
def test_drop_later_keeps_the_first_row_and_lists_the_others(dropped_run):
    workdir, _, result = dropped_run
    tables = workdir / "results" / "tables"
    failures = pd.read_csv(tables / "failures.tsv", sep="\t")
    assert failures.values.tolist() == [
        ["s3", "duplicate", "duplicate_of:s1 (same file)"],
        ["s5", "duplicate", "duplicate_of:s1 (same file)"],
        ["s6", "duplicate", "duplicate_of:s1 (identical content)"],
        ["d2", "duplicate", "duplicate_of:d1 (identical voxels and geometry after import)"],
    ]
    measurements = pd.read_csv(tables / "measurements.tsv", sep="\t")
    assert sorted(measurements["subject"].unique()) == ["d1", "s1", "s2", "s4"]
    assert not any((workdir / "results" / "measure").glob("s[356].*"))  # nothing computed for them
    counts = pd.read_csv(tables / "exclusion_counts.tsv", sep="\t")
    scans = dict(zip(counts.loc[counts["level"] == "scans", "kind"], counts.loc[counts["level"] == "scans", "count"]))
    assert scans["in the sheet"] == 8 and scans["measured"] == 4 and scans["dropped: duplicate"] == 4
    assert "4 of 8 scans failed" in result.stderr


@pytest.mark.slow
def test_drop_later_a_second_run_has_nothing_to_do(dropped_run):
    workdir, config, _ = dropped_run
    again = run_workflow(workdir, config, "--dry-run", AGGREGATED)
    assert "Nothing to be done" in again.stdout + again.stderr, again.stdout[-3000:]


@pytest.mark.slow
def test_the_same_image_after_import_stops_the_aggregation(tmp_path):
    sheet = duplicate_cohort(tmp_path, dicom=True)
    rows = pd.read_csv(sheet, sep="\t")
    rows[~rows["subject"].isin(["s3", "s5", "s6"])].to_csv(sheet, sep="\t", index=False)  # no file duplicates
    result = run_workflow(tmp_path, {**STUDY, "cohort": str(sheet)}, check=False)
    assert result.returncode != 0
    output = result.stdout + result.stderr
    for words in (
        "1 row(s) hold the same image as an earlier row once imported",
        "line 5 (subject 'd1')",
        "line 6 (subject 'd2')",
        "export2 (identical voxels and geometry after import)",
        "drop_later",
    ):
        assert words in output, (words, output[-3000:])
    assert not (tmp_path / "results" / "tables" / "failures.tsv").exists()
