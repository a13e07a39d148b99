"""ctcohort sheet: a cohort sheet from a tree of real DICOM files with planted headers.

The tree is built from copies of the shared real CT series (20 axial slices, JPEG 2000, blank UIDs, slices
2 mm apart with SliceThickness 3 mm): two reconstructions and a localizer in one folder with blank UIDs,
series with UIDs in folders of their own, a thinner series with a missing slice, a series with slices
twice over, ages as D/W/M/Y, a bare number, birth dates and blanks, sexes, contrast. Only headers are
edited; the pixel data are the real ones. The tree is built by tests/dicom_edits.py (build_export_tree).
"""

import hmac
import os
import stat
from hashlib import sha256
from pathlib import Path

import pandas as pd
import pytest
import yaml
from conftest import SHEET_SCHEMA, require_shared_data

from ctcohort import dicom_series
from ctcohort.cli import main
from ctcohort.sheet import load_cohort_sheet

pydicom = pytest.importorskip("pydicom")
from dicom_edits import (  # noqa: E402 (needs pydicom)
    ACCESSION,
    EXPORT_UID_ROOT,
    PATIENTS,
    STUDY_DATES,
    build_export_tree,
    export_phi,
)

SECRET = "test secret: not for real data"
UID_ROOT = EXPORT_UID_ROOT


def shared_series() -> list[Path]:
    return sorted((require_shared_data() / "totalseg-example" / "dicom").glob("*.dcm"))


def original_positions() -> list[tuple[float, float, float]]:
    return [
        tuple(float(v) for v in pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient)
        for f in shared_series()
    ]


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    return build_export_tree(tmp_path_factory.mktemp("export") / "dicom", require_shared_data())


def run_sheet(tree: Path, out: Path, secret: str = SECRET, **options) -> dicom_series.Inventory:
    settings = dicom_series.InventorySettings(secret=secret, progress=False, **options)
    return dicom_series.write_inventory(tree, out / "cohort.tsv", series_table=out / "series.tsv", settings=settings)


def read(path: Path) -> pd.DataFrame:
    return pd.read_csv(
        path,
        sep="\t",
        dtype={"subject": str, "sex": str, "study": str, "reason": str},
        keep_default_na=False,
        na_values=[""],
    )


def expected_pseudonym(patient_id: str, study_key: str, secret: str = SECRET) -> tuple[str, str]:
    """The documented scheme, computed here from its description."""
    key = secret.encode()
    patient = "p" + hmac.new(key, b"patient\0" + patient_id.encode(), sha256).hexdigest()[:12]
    study = hmac.new(key, b"study\0" + patient_id.encode() + b"\0" + study_key.encode(), sha256).hexdigest()[:8]
    return f"{patient}_{study}", patient


def test_one_series_chosen_per_study_with_age_sex_and_contrast(tree, tmp_path):
    inventory = run_sheet(tree, tmp_path, processes=2)
    sheet, series = read(tmp_path / "cohort.tsv"), read(tmp_path / "series.tsv")
    assert inventory.files == 20 + 20 + 1 + 20 + 19 + 20 + 10 + 4 * 12 + 24 + 1  # README.txt is a file too
    assert inventory.images == inventory.files - 1

    # one row per study with a usable series: A twice, B-F; G has none
    assert len(sheet) == 7 and sheet["subject"].is_unique
    assert set(series["study"]) == set(sheet["subject"]) | {expected_pseudonym("PHIG-5005", f"uid\0{UID_ROOT}.8")[0]}
    assert (
        series.groupby("study")["chosen"].sum().drop(expected_pseudonym("PHIG-5005", f"uid\0{UID_ROOT}.8")[0]) == 1
    ).all()

    a1, a1_patient = expected_pseudonym("PHIA-4711", "date\0" + "\0".join(["20221208", "000000", "", ACCESSION]))
    a2, _ = expected_pseudonym("PHIA-4711", f"uid\0{UID_ROOT}.2")
    b, b_patient = expected_pseudonym("PHIB-0815", f"uid\0{UID_ROOT}.3")
    sheet = sheet.set_index("subject")
    assert {a1, a2, b} <= set(sheet.index)
    assert sheet.at[a1, "patient"] == sheet.at[a2, "patient"] == a1_patient and sheet.at[b, "patient"] == b_patient
    # years since the patient's first study, from the study dates (never the dates themselves), by hand
    from datetime import date

    first, second = sorted(date(int(d[:4]), int(d[4:6]), int(d[6:])) for d in STUDY_DATES.values())
    later, earlier = (a1, a2) if STUDY_DATES["A1"] > STUDY_DATES["A2"] else (a2, a1)
    assert sheet.at[earlier, "years"] == 0
    assert sheet.at[later, "years"] == pytest.approx((second - first).days / 365.2425, abs=1e-4)
    assert not any(str(d) in (tmp_path / "cohort.tsv").read_text() for d in STUDY_DATES.values())

    # study A1: the soft-tissue 2 mm reconstruction, not the thinner bone one, not the localizer
    spacing = sorted(-p[2] for p in original_positions())
    by_hand = spacing[1] - spacing[0]
    assert by_hand == pytest.approx(2.0) and all(b - a == pytest.approx(by_hand) for a, b in zip(spacing, spacing[1:]))
    row = sheet.loc[a1]
    assert (row["kernel"], row["kernel_class"], row["slices"]) == ("Br38f/3", "soft", 20)
    assert row["slice_spacing"] == pytest.approx(by_hand) and row["slice_thickness"] == 3  # positions, not the tag
    study_a1 = series[series["study"] == a1].set_index("series")
    assert len(study_a1) == 3 and study_a1["chosen"].sum() == 1
    bone = study_a1[study_a1["kernel"] == "Br64f"].iloc[0]
    assert bone["slice_spacing"] == pytest.approx(1.0) and bone["eligible"] == 1 and bone["chosen"] == 0
    assert "sharp kernel" in bone["reason"]
    localizer = study_a1[study_a1["slices"] == 0].iloc[0]
    assert (localizer["files"], localizer["dropped_files"], localizer["reason"]) == (1, "1 localizer", "localizer")
    # the chosen series shares its folder with the others: a list of its 20 files, in slice order
    listing = tmp_path / row["ct"]
    assert listing.suffix == ".txt" and listing.parent == tmp_path / f"cohort{dicom_series.LIST_FOLDER_SUFFIX}"
    files = listing.read_text().splitlines()
    # along the slice normal (increasing z): the shared series runs from head to feet, so backwards
    assert [p[2] for p in original_positions()] == sorted((p[2] for p in original_positions()), reverse=True)
    assert [Path(f).name for f in files] == [f"soft{i:03d}.dcm" for i in reversed(range(20))]
    assert all(Path(f).is_absolute() and Path(f).parent == tree / "A" / "1" for f in files)
    # age from the dates, counted by hand: 62 years from 1960-03-15 to 2022-03-15, then 268 days to 2022-12-08
    assert row["age"] == pytest.approx(62 + 268 / 365, abs=0.01) and row["age_source"] == "birth_date"
    assert (row["sex"], row["contrast"], row["study_year"]) == ("F", 1, 2022)
    assert (row["manufacturer"], row["model"], row["kvp"]) == ("SIEMENS", "Biograph40_mCT 4R", 120)

    # study A2: the complete 2 mm series, alone in its folder; the 1 mm one misses a slice
    row = sheet.loc[a2]
    assert Path(tmp_path / row["ct"]).resolve() == (tree / "A" / "2" / "ct").resolve()
    assert (row["slices"], row["slice_spacing"], row["contrast"], row["sex"]) == (20, 2, 0, "F")
    assert (row["age"], row["age_source"]) == (62, "age_tag")  # the age tag before the dates
    thin = series[(series["study"] == a2) & (series["chosen"] == 0)].iloc[0]
    assert (thin["slices"], thin["complete"], thin["eligible"]) == (19, 0, 0)
    assert "uneven slice spacing" in thin["reason"]

    # B: 2 mm before 4 mm
    row = sheet.loc[b]
    assert Path(row["ct"]).name == "s2" and row["age"] == pytest.approx(1.5) and row["sex"] == "M"
    other = series[(series["study"] == b) & (series["chosen"] == 0)].iloc[0]
    assert other["slice_spacing"] == 4 and "slice spacing 4 mm" in other["reason"]

    # ages by unit, by hand; a bare number flagged (and preferred to the birth date); unknowns blank
    by_patient = sheet.set_index("patient")

    def age(patient_id):
        return by_patient.loc[expected_pseudonym(patient_id, "")[1], ["age", "age_source", "sex"]].tolist()

    assert age("PHIC-1001")[0] == pytest.approx(21 / 365.2425, abs=1e-4)
    assert age("PHIC-1001")[1] == "age_tag" and pd.isna(age("PHIC-1001")[2])  # sex O: blank
    assert age("PHID-2002")[0] == pytest.approx(10 / 365.2425, abs=1e-4) and age("PHID-2002")[2] == "M"
    assert age("PHIE-3003")[:2] == [45, "age_tag_bare_number"]
    f_age, f_source, f_sex = age("PHIF-4004")
    assert pd.isna(f_age) and pd.isna(f_source) and pd.isna(f_sex)

    # G: the slices twice over, never a volume
    g = series[series["study"] == expected_pseudonym("PHIG-5005", f"uid\0{UID_ROOT}.8")[0]].iloc[0]
    assert (g["files"], g["chosen"], g["eligible"]) == (24, 0, 0) and "same position" in g["reason"]


def test_sheet_loads_with_blank_age_and_sex(tree, tmp_path):
    run_sheet(tree, tmp_path)
    # blank age/sex (as after de-identification) are allowed in a sheet
    sheet = load_cohort_sheet(tmp_path / "cohort.tsv", SHEET_SCHEMA)  # every ct path exists
    assert len(sheet) == 7
    assert sheet["age"].isna().sum() == 1 and sheet["sex"].isna().sum() == 2
    assert sheet["contrast"].tolist().count(0) == 1
    assert all(Path(ct).is_dir() or ct.endswith(".txt") for ct in sheet["ct"])


def test_pseudonyms_stable_with_the_secret_and_no_phi_out(tree, tmp_path, monkeypatch, capsys):
    first, again, other = tmp_path / "first", tmp_path / "again", tmp_path / "other"
    run_sheet(tree, first)
    monkeypatch.setenv(dicom_series.SECRET_VARIABLE, SECRET)  # the command takes the secret from the environment
    key = tmp_path / "private" / "key.tsv"
    assert (
        main(
            [
                "sheet",
                str(tree),
                "-o",
                str(again / "cohort.tsv"),
                "--series-table",
                str(again / "series.tsv"),
                "--key-out",
                str(key),
                "--processes",
                "1",
            ]
        )
        == 0
    )
    assert "a CT series chosen for 7" in capsys.readouterr().out
    run_sheet(tree, other, secret="another secret")

    for name in ("cohort.tsv", "series.tsv"):
        assert (first / name).read_bytes() == (again / name).read_bytes()
    subjects = read(first / "cohort.tsv")["subject"]
    assert set(subjects).isdisjoint(read(other / "cohort.tsv")["subject"])
    assert len(read(other / "cohort.tsv")) == len(subjects)
    schema = yaml.safe_load(SHEET_SCHEMA.read_text())
    assert subjects.str.fullmatch(schema["properties"]["subject"]["pattern"].strip("^$")).all()

    # the key, readable by its owner only, maps every pseudonym to its PatientID
    assert stat.S_IMODE(os.stat(key).st_mode) == 0o600
    mapping = read(key)
    assert set(mapping["subject"]) == set(read(first / "series.tsv")["study"])
    for subject, patient_id in zip(mapping["subject"], mapping["PatientID"]):
        assert patient_id in PATIENTS and subject.startswith(expected_pseudonym(patient_id, "")[1] + "_")
    assert set(mapping["PatientID"]) == set(PATIENTS)

    # no planted PHI in any byte of what is written beside the sheet
    phi = export_phi()
    written = [p for p in first.rglob("*") if p.is_file()]
    assert {p.suffix for p in written} == {".tsv", ".txt"}
    for path in written:
        data = path.read_bytes()
        leaked = [s for s in phi if s.encode() in data or s.upper().encode() in data.upper()]
        assert not leaked, f"{path.name} holds {leaked}"
    assert b"PHIA-4711" in key.read_bytes()  # the search finds what is there


def test_series_uid_named_by_the_user_and_refusals(tree, tmp_path, monkeypatch):
    b, _ = expected_pseudonym("PHIB-0815", f"uid\0{UID_ROOT}.3")
    run_sheet(tree, tmp_path, series_uids=[f"{UID_ROOT}.3.2"])
    row = read(tmp_path / "cohort.tsv").set_index("subject").loc[b]
    assert Path(row["ct"]).name == "s4" and (row["slices"], row["slice_spacing"]) == (10, 4)
    series = read(tmp_path / "series.tsv")
    assert series[(series["study"] == b) & (series["chosen"] == 1)]["reason"].tolist() == ["named by --series-uid"]
    # --file-lists: the sheet names no folder of the export; the named series' 10 files listed
    assert (
        main(
            [
                "sheet",
                str(tree),
                "-o",
                str(tmp_path / "lists.tsv"),
                "--secret",
                SECRET,
                "--file-lists",
                "--series-uid",
                f"{UID_ROOT}.3.2",
                "--processes",
                "1",
            ]
        )
        == 0
    )
    cts = read(tmp_path / "lists.tsv").set_index("subject")["ct"]
    assert all(ct.startswith(f"lists{dicom_series.LIST_FOLDER_SUFFIX}/") and ct.endswith(".txt") for ct in cts)
    assert [Path(f).parent.name for f in (tmp_path / cts[b]).read_text().splitlines()] == ["s4"] * 10
    # a study named twice, a UID not in the tree, no secret, a key under results/
    with pytest.raises(ValueError, match="same study"):
        run_sheet(tree, tmp_path, series_uids=[f"{UID_ROOT}.3.1", f"{UID_ROOT}.3.2"])
    with pytest.raises(ValueError, match="no series with SeriesInstanceUID 1.2.3.4"):
        run_sheet(tree, tmp_path, series_uids=["1.2.3.4"])
    monkeypatch.delenv(dicom_series.SECRET_VARIABLE, raising=False)
    assert main(["sheet", str(tree), "-o", str(tmp_path / "x.tsv")]) == 1
    assert (
        main(
            [
                "sheet",
                str(tree),
                "-o",
                str(tmp_path / "x.tsv"),
                "--secret",
                "s",
                "--key-out",
                str(tmp_path / "results" / "key.tsv"),
            ]
        )
        == 1
    )
    assert not (tmp_path / "x.tsv").exists() and not (tmp_path / "results").exists()


def test_age_parsing_by_hand():
    assert dicom_series.age_years("045Y") == (45, "age_tag")
    assert dicom_series.age_years("006M") == (0.5, "age_tag")
    assert dicom_series.age_years("052W")[0] == pytest.approx(364 / 365.2425, abs=1e-4)
    assert dicom_series.age_years("100D")[0] == pytest.approx(100 / 365.2425, abs=1e-4)
    assert dicom_series.age_years("67") == (67, "age_tag_bare_number")
    # the dates where the age tag is blank or unusable; full years counted by hand
    assert dicom_series.age_years("", "20200229", "19800229")[0] == pytest.approx(40, abs=0.01)
    assert dicom_series.age_years("UNKNOWN", "20200101", "19500701")[0] == pytest.approx(69.5, abs=0.01)
    assert dicom_series.age_years("", "20200101", "") == (None, "")
    assert dicom_series.age_years("200Y") == (None, "")  # out of range: unknown, not a number
    assert dicom_series.age_years("", "20200101", "20210101") == (None, "")
    assert [dicom_series.sex_code(s) for s in ("M", "f ", "O", "", "X")] == ["M", "F", "", "", ""]


def test_kernel_classes():
    soft = ["Br38f", "B30f", "I40f/3", "FC13", "STANDARD", "SOFT", "B", "Qr40d"]
    sharp = ["Br64f", "B70f", "FC52", "BONE", "LUNG", "BONEPLUS", "YA", "Hr68", "D"]
    assert [dicom_series.kernel_class(k) for k in soft] == ["soft"] * len(soft)
    assert [dicom_series.kernel_class(k) for k in sharp] == ["sharp"] * len(sharp)
    assert dicom_series.kernel_class("") == dicom_series.kernel_class("XQ-7") == "unknown"


def test_free_text_and_folder_names_carry_no_identifying_value(tmp_path):
    """A series description typed with the patient's name, ID, study date and a record number, in an export folder
    named after the patient and the study: the series table keeps the description without them, and the sheet
    names a file list (a pseudonym), not the folder."""
    from dicom_edits import plant_patient

    sources = shared_series()
    folder = tmp_path / "export" / "DOE_JANETTA_PHIA-4711" / "STUDY_20221208" / "SER3"
    plant_patient(
        sources,
        folder,
        "im",
        "PHIA-4711",
        SeriesDescription="Doe^Janetta abdomen PHIA-4711 2022-12-08 MRN123456 portal venous",
    )
    out = tmp_path / "out"
    run_sheet(tmp_path / "export", out)
    series = read(out / "series.tsv")
    assert series["description"].tolist() == ["[removed] abdomen [removed] [removed] MRN[removed] portal venous"]
    sheet = read(out / "cohort.tsv")
    assert Path(sheet.at[0, "ct"]).suffix == ".txt" and Path(sheet.at[0, "ct"]).stem == sheet.at[0, "subject"]
    for path in (out / "cohort.tsv", out / "series.tsv"):
        text = path.read_text().lower()
        assert not any(value in text for value in ("doe", "janetta", "phia-4711", "20221208", "2022-12-08", "123456"))
