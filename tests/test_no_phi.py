"""A study on DICOM input: copies of the real CT series of the test data with identifying values planted in their
headers (names, IDs, birth date, institution, physician, accession number, UIDs), imported and measured by the
real workflow beside a NIfTI row and a broken series. The DICOM scans are measured on the reference grid with
the HU of an independent pydicom conversion; the broken one is listed at stage import_ct; and no planted value
reaches any byte of any file under results/ (decompressed NIfTIs, tables, logs and the report included).

And the whole path from a PACS export: `ctcohort sheet` on a tree of planted copies (two patients, a localizer
and a second kernel beside the chosen series, blank UIDs), the sheet it writes run as a study: one series per
study, age and sex from the headers in the measurement table, no planted value under results/."""

import base64
import binascii
import contextlib
import gzip
import io
import logging
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pydicom
import pytest

pytest.importorskip("pylibjpeg", reason="the reference conversion decodes JPEG 2000 with pylibjpeg (test extra)")

from conftest import require_shared_data, run_workflow  # noqa: E402
from dicom_edits import (  # noqa: E402
    B_FOLDER,
    build_export_tree,
    export_phi,
    reference_volume,
    series_files,
    write_copies,
)

from ctcohort.cli import main  # noqa: E402
from ctcohort.dicom_import import DicomImportError, _read_image_header, _warnings, convert_series  # noqa: E402

UID_ROOT = "1.2.826.0.1.3680043.9.7139"
PLANTED = {
    "PatientName": "Quixotic^Zebulon^Marmaduke",
    "PatientID": "PID7Q4X9ZCTC",
    "PatientBirthDate": "19370412",
    "InstitutionName": "Saint Xylophone Memorial Infirmary",
    "ReferringPhysicianName": "Brightwater-Quill^Wolfgang",
    "AccessionNumber": "ACC88X21QZ",
    "StudyInstanceUID": f"{UID_ROOT}.1.20240101.5551234",
    "SeriesInstanceUID": f"{UID_ROOT}.2.20240101.5551234",
    "FrameOfReferenceUID": f"{UID_ROOT}.4.20240101.5551234",
}
# every piece a person could be found by, on its own
NEEDLES = sorted(
    {*PLANTED.values(), "Quixotic", "Zebulon", "Marmaduke", "Xylophone", "Brightwater", "Wolfgang", UID_ROOT}
)
STUDY = {"segmentation": {"method": "precomputed"}, "structures": "total_v2"}


def plant(ds, index):
    for name, value in PLANTED.items():
        setattr(ds, name, value)
    ds.SOPInstanceUID = f"{UID_ROOT}.3.20240101.{5551234 + index}"
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID


def one_pixel_changed(path, data) -> None:
    """Raise the top-left pixel of a DICOM file by one, stored in the file's transfer syntax (the shared series:
    JPEG 2000 lossless): a series of its own (the sheet may not name one scan twice: duplicates, compared by
    file content and, once imported, by voxels), measured as the unchanged one. The pixel is in air, outside
    every structure of the reference labels (the in-plane corners of every slice are label 0)."""
    seg = np.asanyarray(nib.load(data / "totalseg-example" / "example_seg_dicom.nii.gz").dataobj)
    assert not seg[[0, 0, -1, -1], [0, -1, 0, -1], :].any()
    ds = pydicom.dcmread(path)
    pixels = ds.pixel_array.copy()
    pixels[0, 0] += 1
    ds.compress(ds.file_meta.TransferSyntaxUID, pixels)
    ds.save_as(path)


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """Folders of planted copies: the whole series, and the series without its 10th slice."""
    data = require_shared_data()
    files = series_files(data)
    root = tmp_path_factory.mktemp("dicom_input")
    whole = write_copies(files, root / "whole", plant)
    write_copies(files[:9] + files[10:], root / "missing_slice", plant)
    return data, files, whole, root


@pytest.fixture(scope="module")
def study(planted, tmp_path_factory):
    data, files, whole, root = planted
    example = data / "totalseg-example"
    # the series as a file list, relative to the list's folder: a planted copy of its own with one pixel of one
    # slice changed in air (the same files twice would be one scan under two subjects), measured as the folder
    listed = write_copies(files, root / "listed", plant)
    one_pixel_changed(listed[10], data)
    listing = root / "lists" / "listed.txt"
    listing.parent.mkdir()
    listing.write_text("".join(f"../listed/{p.name}\n" for p in listed))
    rows = [
        ("dicom", root / "whole", example / "example_seg_dicom.nii.gz", 61, "F", 1),
        ("listed", listing, example / "example_seg_dicom.nii.gz", 62, "M", 1),
        ("nifti", example / "example_ct_sm.nii.gz", example / "example_seg.nii.gz", 45, "M", 0),
        ("broken", root / "missing_slice", example / "example_seg_dicom.nii.gz", 70, "M", 1),
    ]
    sheet = root / "cohort.tsv"
    pd.DataFrame(rows, columns=["subject", "ct", "seg", "age", "sex", "contrast"]).to_csv(sheet, sep="\t", index=False)
    workdir = tmp_path_factory.mktemp("dicom_study")
    config = {**STUDY, "cohort": str(sheet)}
    run = run_workflow(workdir, config, "--report", "results/report.html", "--report-after-run")
    again = run_workflow(workdir, config, "--dry-run")
    return workdir / "results", run, again


@pytest.mark.slow
def test_dicom_scans_are_measured_on_the_reference_grid_with_independent_hu(study, planted):
    results, run, _ = study
    data, files, _, _ = planted
    reference_seg = nib.load(data / "totalseg-example" / "example_seg_dicom.nii.gz")
    imported = nib.load(results / "ct" / "dicom.nii.gz")
    np.testing.assert_array_equal(imported.affine, reference_seg.affine)
    assert imported.shape == reference_seg.shape and imported.get_data_dtype() == np.int16
    assert not (results / "ct" / "nifti.nii.gz").exists()  # a NIfTI row is read where it is

    # the measurements against labels and HU computed here: the reference labels on a pydicom conversion
    hu, affine = reference_volume(files)
    hu = np.asanyarray(nib.as_closest_canonical(nib.Nifti1Image(hu, affine)).dataobj)
    labels = np.rint(np.asanyarray(nib.as_closest_canonical(reference_seg).dataobj)).astype(int)
    table = pd.read_csv(results / "tables" / "measurements.tsv", sep="\t")
    assert set(table["subject"]) == {"dicom", "listed", "nifti"}
    dicom = table[table["subject"] == "dicom"].set_index("label")
    voxels = np.bincount(labels.ravel())
    present = [label for label in np.flatnonzero(voxels) if label > 0]
    assert len(present) > 10
    for label in present:
        assert dicom.at[label, "n_voxels"] == voxels[label]
        if np.isfinite(dicom.at[label, "hu_mean"]):
            assert dicom.at[label, "hu_mean"] == pytest.approx(hu[labels == label].mean(), rel=1e-9, abs=1e-9)
    assert dicom["hu_mean"].notna().sum() >= 10
    # anatomy where the labels put it (v2 ids): contrast-enhanced liver and aorta, bone, muscle
    assert 50 < dicom.at[5, "hu_mean"] < 150 and dicom.at[52, "hu_mean"] > 150
    assert dicom.at[32, "hu_mean"] > 200 and -20 < dicom.at[86, "hu_mean"] < 80
    listed = table[table["subject"] == "listed"].set_index("label")
    pd.testing.assert_series_equal(listed["hu_mean"], dicom["hu_mean"])


@pytest.mark.slow
def test_the_broken_series_is_listed_at_stage_import_ct_and_the_import_table_says_what_was_done(study, planted):
    results, run, _ = study
    root = planted[3]
    failures = pd.read_csv(results / "tables" / "failures.tsv", sep="\t")
    assert failures["subject"].tolist() == ["broken"]
    assert failures.loc[0, "stage"] == "import_ct"
    assert f"DICOM series {root / 'missing_slice'}: uneven slice spacing" in failures.loc[0, "error"]
    imports = pd.read_csv(results / "tables" / "ct_import.tsv", sep="\t", keep_default_na=False)
    assert imports["subject"].tolist() == ["dicom", "listed", "broken"]
    assert imports["imported"].tolist() == [True, True, False]
    assert imports["shape"].tolist()[:2] == ["512x512x20"] * 2 and imports["correction"].tolist()[:2] == ["none"] * 2
    # the end of the run says a scan was left out, and where
    assert "ctcohort: 1 of 4 scans failed and are left out of the study (import_ct: 1)" in run.stderr


@pytest.mark.slow
def test_a_second_run_has_nothing_to_do(study):
    again = study[2]
    assert "Nothing to be done" in again.stdout + again.stderr, again.stdout[-3000:]


def searchable(path) -> list[bytes]:
    """The bytes of a file as stored, and as a reader sees them: gzip inflated, parquet as text, base64 blobs
    of the report decoded."""
    raw = path.read_bytes()
    views = [raw]
    if raw[:2] == b"\x1f\x8b":
        views.append(gzip.decompress(raw))
    if path.suffix == ".parquet":
        views.append(pd.read_parquet(path).to_csv().encode())
    if path.suffix == ".html":
        for blob in re.findall(rb"[A-Za-z0-9+/=]{40,}", raw):
            try:
                decoded = base64.b64decode(blob + b"=" * (-len(blob) % 4))
            except (binascii.Error, ValueError):
                continue
            views.append(decoded)
            if decoded[:2] == b"\x1f\x8b":
                views.append(gzip.decompress(decoded))
    return views


@pytest.mark.slow
def test_no_planted_value_reaches_any_file_under_results(study):
    results, run, _ = study
    files = [p for p in results.rglob("*") if p.is_file()]
    assert (results / "report.html").is_file() and (results / "ct" / "dicom.nii.gz").is_file()
    assert any(p.parts[-2] == "import_ct" for p in files)  # the import's logs are searched too
    # the report's embedded tables are decoded: the failure table is found in it
    assert any(b"uneven slice spacing" in view for view in searchable(results / "report.html")[1:])
    found = []
    for path in files:
        for view in searchable(path):
            for needle in NEEDLES:
                if needle.encode() in view or needle.upper().encode() in view:
                    found.append((str(path.relative_to(results)), needle))
    assert not found
    console = run.stdout + run.stderr
    assert not [needle for needle in NEEDLES if needle in console]


def test_the_needles_would_be_found(planted):
    """The search finds a planted value where one is: the planted copies themselves."""
    whole = planted[2]
    assert all(any(n.encode() in view for view in searchable(whole[0])) for n in PLANTED.values())


def localizer(ds, index):
    plant(ds, index)
    ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]


def second_series(ds, index):
    plant(ds, index)
    ds.SeriesInstanceUID = f"{UID_ROOT}.2.20240101.5559999"
    ds.SeriesNumber = 7


def not_ct(ds, index):
    plant(ds, index)
    ds.Modality = "MR"


@pytest.mark.parametrize(
    "edit, cause",
    [(localizer, "localizer"), (second_series, "2 series"), (not_ct, "more than one modality: CT (5), MR (2)")],
)
def test_import_errors_and_logs_name_no_header_value(planted, tmp_path, caplog, edit, cause):
    _, files, whole, _ = planted
    folder = tmp_path / "series"
    write_copies(files[:5], folder, plant)
    write_copies(files[5:7], folder, edit, prefix="other")
    caplog.set_level(logging.DEBUG)
    with pytest.raises(DicomImportError) as failure:
        convert_series(folder, allow_corrected=True)
    text = str(failure.value) + caplog.text
    assert cause in text
    assert not [needle for needle in NEEDLES if needle in text]


def test_dcm2niix_messages_are_passed_on_without_header_values(planted, tmp_path):
    values = set()  # what the import reads from a planted copy's header to blank it
    assert _read_image_header(planted[2][0], values) is not None
    output = io.StringIO()
    output.write(f"Warning: unexpected value {PLANTED['PatientName']} in {tmp_path}/series/000001\n")
    output.write(f"Error: series {PLANTED['SeriesInstanceUID']} and 1.3.12.2.1107.5.1.4.60064.3000002 differ\n")
    output.write("Found 20 DICOM file(s)\n")
    output.write("Warning: name Zebulon Quixotic\n")
    output.write(f"Warning: {PLANTED['InstitutionName']}, accession {PLANTED['AccessionNumber']}\n")
    lines = _warnings(output.getvalue(), values, tmp_path)
    assert lines == [
        "Warning: unexpected value <header value> in <series>/series/000001",
        "Error: series <uid> and <uid> differ",
        "Warning: name <header value> <header value>",
        "Warning: <header value>, accession <header value>",
    ]


@pytest.fixture(scope="module")
def export_study(tmp_path_factory):
    """`ctcohort sheet` on a planted export tree (B's series in a folder named after B and the study, with B's
    name and record numbers typed into its descriptions), a seg column added to the sheet it writes (the reference
    labels of the shared series: every chosen series is on its grid), and one study run on that sheet."""
    data = require_shared_data()
    tree = build_export_tree(tmp_path_factory.mktemp("pacs") / "dicom", data, everything=False, named_folders=True)
    # A's and B's series are planted copies of the same slices: one pixel of B's changed in air, so that the two
    # patients are two scans, not one image imported twice (duplicates), and measured alike
    one_pixel_changed(sorted((tree / B_FOLDER[True]).glob("*.dcm"))[10], data)
    out = tmp_path_factory.mktemp("pacs_sheet")
    console = io.StringIO()
    with contextlib.redirect_stdout(console), contextlib.redirect_stderr(console):
        code = main(
            [
                "sheet",
                str(tree),
                "-o",
                str(out / "cohort.tsv"),
                "--series-table",
                str(out / "series.tsv"),
                "--secret",
                "test secret: not for real data",
                "--processes",
                "1",
            ]
        )
    assert code == 0, console.getvalue()
    written = pd.read_csv(out / "cohort.tsv", sep="\t", dtype=str, keep_default_na=False)
    written["seg"] = str(data / "totalseg-example" / "example_seg_dicom.nii.gz")
    written.to_csv(out / "cohort.tsv", sep="\t", index=False)
    workdir = tmp_path_factory.mktemp("pacs_study")
    run = run_workflow(workdir, {**STUDY, "cohort": str(out / "cohort.tsv")})
    return workdir, out, console.getvalue() + run.stdout + run.stderr, tree


@pytest.mark.slow
def test_a_sheet_from_a_planted_export_runs_with_header_age_and_sex_and_no_phi(export_study):
    workdir, out, console, tree = export_study
    results = workdir / "results"
    sheet = pd.read_csv(out / "cohort.tsv", sep="\t")
    series = pd.read_csv(out / "series.tsv", sep="\t")
    # one series per study: of A's soft and bone reconstructions and localizer (one folder, blank UIDs) the soft one
    assert len(sheet) == 2 and (series.groupby("study")["chosen"].sum() == 1).all()
    assert len(series) == 4 and sorted(sheet["kernel"]) == ["Br38f/3", "Br38f/3"]
    assert sorted(sheet["slices"]) == [20, 20]

    # measured, each with the age and sex of its headers: A by birth and study date, B by PatientAge 018M
    assert pd.read_csv(results / "tables" / "failures.tsv", sep="\t").empty
    table = pd.read_csv(results / "tables" / "measurements.tsv", sep="\t")
    assert set(table["subject"]) == set(sheet["subject"])
    assert table["n_voxels"].groupby(table["subject"]).sum().gt(0).all()
    carried = table.groupby("subject")[["age", "sex"]].agg(set)
    assert (carried["age"].map(len) == 1).all() and (carried["sex"].map(len) == 1).all()
    people = sorted((next(iter(age)), next(iter(sex))) for age, sex in zip(carried["age"], carried["sex"]))
    assert people[0] == (1.5, "M")
    assert people[1][0] == pytest.approx(62 + 268 / 365, abs=0.01) and people[1][1] == "F"

    # no planted value in any byte of the sheet and the series table, under results/ or in Snakemake's records
    # (.snakemake: job metadata, logs), nor on the console; B's folder is named by a file list, the only file that
    # names the export's files (and with them its folders)
    assert Path(sheet.set_index("age").at[1.5, "ct"]).suffix == ".txt"
    assert "[removed] abdomen [removed] MRN[removed] portal venous" in set(series["description"])
    needles = export_phi()
    files = [
        out / "cohort.tsv",
        out / "series.tsv",
        *(p for folder in (results, workdir / ".snakemake") for p in folder.rglob("*") if p.is_file()),
    ]
    assert sum(p.parent.name == "ct" and p.name.endswith(".nii.gz") for p in files) == 2
    assert any(p.parent.name == "metadata" for p in files)
    found = [
        (str(path), needle)
        for path in files
        for view in searchable(path)
        for needle in needles
        if needle.encode() in view or needle.upper().encode() in view
    ]
    assert not found
    assert not [needle for needle in needles if needle in console or needle.upper() in console.upper()]
    # where they are, they are found: patient A's values in a file of the export, B's folder in B's file list
    planted = searchable(tree / "A" / "1" / "soft000.dcm")
    assert all(any(n.encode() in view for view in planted) for n in ["PHIA-4711", "Doe^Janetta", "19600315"])
    listed = (out / sheet.set_index("age").at[1.5, "ct"]).read_bytes()
    assert all(n.upper().encode() in listed for n in ["Richardo", "PHIB-0815", "MRN123456"])
