"""Cohort tables from per-scan measurement files and status files; recording per-scan failures."""

import errno
import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from ctcohort.aggregate import (
    EXCLUSION_REASONS,
    FAILURE_COLUMNS,
    cohort_measurements,
    collect_failures,
    exclusion_counts,
    failure_summary,
    measurement_summary,
    qc_summary,
)
from ctcohort.columns import MEASURE_COLUMNS
from ctcohort.measure import empty_measurements, write_measurements
from ctcohort.scan_status import ScanStatus, read_status, recording_failure
from ctcohort.sheet import load_cohort_sheet

SCHEMA = Path(__file__).parents[1] / "workflow/schemas/sheet.schema.yaml"

# structure -> (label, group); the order is the structure table's order
STRUCTURES = {
    "liver": (5, "abdomen"),
    "spleen": (1, "abdomen"),
    "brain": (90, "head"),
    "aorta": (52, "vessels"),
}
# exclusion reason of every structure of every measured scan ("" = measured)
REASONS = {
    "s1": {"liver": "", "spleen": "absent", "brain": "cut_off", "aorta": ""},
    "s2": {"liver": "", "spleen": "", "brain": "", "aorta": "too_small"},
    "s3": {"liver": "", "spleen": "", "brain": "", "aorta": ""},  # fails; never in the cohort table
    "s4": {"liver": "cut_off", "spleen": "absent", "brain": "", "aorta": ""},
}
FAILED = "s3"
COVARIATES = {
    # subject: age, sex, contrast, bmi
    "s1": (34.0, "F", 1, 22.5),
    "s2": (71.5, "M", 0, 30.1),
    "s3": (58.0, "F", 0, 27.0),
    "s4": (45.0, "M", 1, 24.0),
    "s5": (62.0, "F", 0, 25.5),  # in the sheet, never measured
}


def volume_of(subject: str, structure: str) -> float:
    """A distinct, non-zero volume for every measured structure of every scan."""
    return 100.0 * (1 + list(REASONS).index(subject)) + STRUCTURES[structure][0] + 0.25


def scan_frame(subject: str) -> pd.DataFrame:
    """One scan's measurement table as measure_structures would write it."""
    rows = []
    for structure, (label, group) in STRUCTURES.items():
        reason = REASONS[subject][structure]
        n_voxels = 0 if reason == "absent" else (3 if reason == "too_small" else 1000 + label)
        hu = np.nan if reason in ("absent", "too_small") else 40.0 + label
        rows.append(
            {
                "structure": structure,
                "label": label,
                "group": group,
                "n_voxels": n_voxels,
                "volume_ml": volume_of(subject, structure) if reason == "" else np.nan,
                "hu_mean": hu,
                "hu_median": hu,
                "hu_std": np.nan if np.isnan(hu) else 5.0,
                "hu_mean_eroded": hu,
                "complete": pd.NA if reason == "absent" else reason != "cut_off",
                "exclusion_reason": reason,
            }
        )
    frame = pd.DataFrame(rows, columns=MEASURE_COLUMNS)
    frame["complete"] = frame["complete"].astype("boolean")
    return frame


@pytest.fixture
def cohort(tmp_path):
    """Measurement TSVs and status JSONs for s1..s4 (s3 failed), and a sheet with s1..s5."""
    measurements, statuses = {}, []
    for subject in REASONS:
        tsv = tmp_path / f"{subject}.measurements.tsv"
        status = tmp_path / f"{subject}.status.json"
        if subject == FAILED:
            write_measurements(empty_measurements(), tsv)
            ScanStatus(subject, "measure", ok=False, error="RuntimeError: cannot read CT header").write(status)
        else:
            write_measurements(scan_frame(subject), tsv)
            ScanStatus(subject, "measure").write(status)
        measurements[subject] = tsv
        statuses.append(status)
    return {"measurements": measurements, "statuses": statuses, "folder": tmp_path}


def frame_sheet() -> pd.DataFrame:
    """A sheet as a plain DataFrame: subject, ct, seg, age, sex (+contrast, bmi), indexed by subject."""
    sheet = pd.DataFrame(
        [
            {
                "subject": s,
                "ct": f"/data/{s}.nii.gz",
                "seg": f"/data/{s}_seg.nii.gz",
                "age": age,
                "sex": sex,
                "contrast": contrast,
                "bmi": bmi,
            }
            for s, (age, sex, contrast, bmi) in COVARIATES.items()
        ]
    )
    return sheet.set_index("subject", drop=False)


def loaded_sheet(folder: Path) -> pd.DataFrame:
    """The same sheet, written as TSV and read back by load_cohort_sheet."""
    images = folder / "images"
    images.mkdir(exist_ok=True)
    lines = ["subject\tct\tseg\tage\tsex\tcontrast\tbmi"]
    for s, (age, sex, contrast, bmi) in COVARIATES.items():
        (images / f"{s}.nii.gz").write_bytes(b"")
        (images / f"{s}_seg.nii.gz").write_bytes(b"")
        lines.append(f"{s}\timages/{s}.nii.gz\timages/{s}_seg.nii.gz\t{age}\t{sex}\t{contrast}\t{bmi}")
    path = folder / "cohort.tsv"
    path.write_text("\n".join(lines) + "\n")
    return load_cohort_sheet(path, SCHEMA, required_files=("ct", "seg"))


# --- collect_failures --------------------------------------------------------------------------


def test_collect_failures_lists_exactly_the_failed_scan(cohort):
    failures = collect_failures(cohort["statuses"])
    assert list(failures.columns) == FAILURE_COLUMNS
    assert failures.to_dict("records") == [
        {"subject": FAILED, "stage": "measure", "error": "RuntimeError: cannot read CT header"}
    ]


def test_collect_failures_several_and_none(tmp_path):
    paths = []
    for subject, ok, stage in [("a", False, "segment"), ("b", True, "measure"), ("c", False, "measure")]:
        path = tmp_path / f"{subject}.json"
        ScanStatus(subject, stage, ok=ok, error="" if ok else f"OSError: {subject} unreadable").write(path)
        paths.append(path)
    failures = collect_failures(paths)
    assert failures["subject"].tolist() == ["a", "c"]
    assert failures["stage"].tolist() == ["segment", "measure"]
    assert failures["error"].tolist() == ["OSError: a unreadable", "OSError: c unreadable"]

    none = collect_failures([paths[1]])
    assert list(none.columns) == FAILURE_COLUMNS
    assert none.empty
    assert collect_failures([]).empty


def test_status_round_trip(tmp_path):
    status = ScanStatus("sub-01", "measure", ok=False, error="ValueError: shapes differ")
    path = tmp_path / "status.json"
    status.write(path)
    assert json.loads(path.read_text()) == {
        "subject": "sub-01",
        "stage": "measure",
        "ok": False,
        "error": "ValueError: shapes differ",
    }
    assert read_status(path) == status


# --- cohort_measurements -------------------------------------------------------------------------


@pytest.fixture(params=["dataframe", "load_cohort_sheet"])
def sheet(request, tmp_path):
    return frame_sheet() if request.param == "dataframe" else loaded_sheet(tmp_path)


def test_cohort_measurements_leaves_failed_scans_out(cohort, sheet):
    failed = set(collect_failures(cohort["statuses"])["subject"])
    table = cohort_measurements(sheet, cohort["measurements"], failed)
    measured = [s for s in REASONS if s != FAILED]
    assert sorted(table["subject"].unique()) == sorted(measured)
    assert len(table) == len(measured) * len(STRUCTURES)
    # each (subject, structure) exactly once
    assert not table.duplicated(["subject", "structure"]).any()


def test_failed_subject_left_out_even_with_a_measurement_file(cohort, sheet):
    """It is the failure list, not the file's content, that decides: s2's file has rows."""
    table = cohort_measurements(sheet, cohort["measurements"], {"s2", FAILED})
    assert sorted(table["subject"].unique()) == ["s1", "s4"]


def test_cohort_measurements_columns_covariates_first(cohort, sheet):
    table = cohort_measurements(sheet, cohort["measurements"], {FAILED})
    assert list(table.columns) == ["subject", "age", "sex", "contrast", "bmi", *MEASURE_COLUMNS]
    # file columns of the sheet are not covariates
    assert "ct" not in table.columns and "seg" not in table.columns


def test_cohort_measurements_joins_the_right_covariates(cohort, sheet):
    table = cohort_measurements(sheet, cohort["measurements"], {FAILED})
    for _, row in table.iterrows():
        age, sex, contrast, bmi = COVARIATES[row["subject"]]
        assert row["age"] == age
        assert row["sex"] == sex
        assert row["contrast"] == contrast
        assert row["bmi"] == pytest.approx(bmi)
    assert pd.api.types.is_numeric_dtype(table["age"])
    assert pd.api.types.is_numeric_dtype(table["bmi"])


def test_cohort_measurements_keeps_measures_and_nan_volumes(cohort, sheet):
    table = cohort_measurements(sheet, cohort["measurements"], {FAILED})
    assert pd.api.types.is_float_dtype(table["volume_ml"])
    for _, row in table.iterrows():
        subject, structure = row["subject"], row["structure"]
        reason = REASONS[subject][structure]
        label, group = STRUCTURES[structure]
        assert row["label"] == label
        assert row["group"] == group
        assert row["exclusion_reason"] == reason  # "" stays "", not NaN
        if reason:
            assert np.isnan(row["volume_ml"]), (subject, structure)
        else:
            assert row["volume_ml"] == pytest.approx(volume_of(subject, structure))
        if reason == "absent":
            assert pd.isna(row["complete"])
        else:
            assert row["complete"] == (reason != "cut_off")
    assert not (table["volume_ml"] == 0).any()
    n_excluded = sum(r != "" for s, rs in REASONS.items() if s != FAILED for r in rs.values())
    assert table["volume_ml"].isna().sum() == n_excluded
    # HU of a too-small or absent structure is NaN too; cut-off structures keep theirs
    hu_nan = table["hu_mean"].isna()
    assert (hu_nan == table["exclusion_reason"].isin(["absent", "too_small"])).all()


def test_cohort_measurements_only_subjects_in_both(cohort):
    """Subjects of the sheet without measurements (s5) and measurements without a sheet row drop out."""
    sheet = frame_sheet().drop(index="s4")
    table = cohort_measurements(sheet, cohort["measurements"], {FAILED})
    assert sorted(table["subject"].unique()) == ["s1", "s2"]


def test_cohort_measurements_when_every_scan_failed(cohort, sheet):
    table = cohort_measurements(sheet, cohort["measurements"], set(REASONS))
    assert table.empty
    assert list(table.columns) == ["subject", "age", "sex", "contrast", "bmi", *MEASURE_COLUMNS]
    summary = qc_summary(table)
    assert summary.empty
    assert list(summary.columns) == ["structure", "group", "n_scans", "measured", *EXCLUSION_REASONS]


# --- qc_summary ------------------------------------------------------------------------------


def expected_counts(subjects) -> dict[str, dict[str, int]]:
    counts = {s: dict.fromkeys(["measured", *EXCLUSION_REASONS], 0) for s in STRUCTURES}
    for subject in subjects:
        for structure, reason in REASONS[subject].items():
            counts[structure][reason or "measured"] += 1
    return counts


def test_qc_summary_counts(cohort, sheet):
    table = cohort_measurements(sheet, cohort["measurements"], {FAILED})
    summary = qc_summary(table)
    assert list(summary.columns) == ["structure", "group", "n_scans", "measured", *EXCLUSION_REASONS]
    assert summary["structure"].tolist() == list(STRUCTURES)  # the structure table's order
    assert summary["group"].tolist() == [group for _, group in STRUCTURES.values()]
    want = expected_counts([s for s in REASONS if s != FAILED])
    for _, row in summary.iterrows():
        for column, count in want[row["structure"]].items():
            assert row[column] == count, (row["structure"], column)
        assert row["n_scans"] == sum(want[row["structure"]].values()) == 3
        assert row["n_scans"] == row[["measured", *EXCLUSION_REASONS]].sum()


def test_qc_summary_reasons_that_never_occur_are_zero(cohort, sheet):
    # s2 alone: only "too_small" (aorta) and measured
    table = cohort_measurements(sheet, {"s2": cohort["measurements"]["s2"]}, set())
    summary = qc_summary(table).set_index("structure")
    assert (summary["absent"] == 0).all() and (summary["cut_off"] == 0).all()
    assert summary.loc["aorta", "too_small"] == 1 and summary.loc["aorta", "measured"] == 0
    assert summary.loc[["liver", "spleen", "brain"], "measured"].tolist() == [1, 1, 1]
    assert (summary["n_scans"] == 1).all()


def test_qc_summary_on_a_hand_made_table():
    table = pd.DataFrame(
        {
            "structure": ["b", "a", "b", "a", "b", "a", "b"],
            "group": ["g2", "g1", "g2", "g1", "g2", "g1", "g2"],
            "exclusion_reason": ["", "absent", "cut_off", "", "too_small", "absent", ""],
        }
    )
    summary = qc_summary(table)
    assert summary["structure"].tolist() == ["b", "a"]  # order of first appearance
    b = summary.iloc[0]
    a = summary.iloc[1]
    assert (b["n_scans"], b["measured"], b["absent"], b["cut_off"], b["too_small"]) == (4, 2, 0, 1, 1)
    assert (a["n_scans"], a["measured"], a["absent"], a["cut_off"], a["too_small"]) == (3, 1, 2, 0, 0)


# --- summaries for the report and the console ------------------------------------------------


def test_measurement_summary_against_numpy(cohort, sheet):
    table = cohort_measurements(sheet, cohort["measurements"], {FAILED})
    summary = measurement_summary(table).set_index(["structure", "measure"])
    for structure in STRUCTURES:
        for measure in ("volume_ml", "hu_mean"):
            values = np.array(
                [
                    volume_of(s, structure) if measure == "volume_ml" else 40.0 + STRUCTURES[structure][0]
                    for s in REASONS
                    if s != FAILED
                    and (
                        REASONS[s][structure] == ""
                        if measure == "volume_ml"
                        else REASONS[s][structure] in ("", "cut_off")
                    )
                ]
            )
            row = summary.loc[(structure, measure)]
            assert row["n"] == len(values)
            assert row["mean"] == pytest.approx(values.mean())
            assert row["median"] == pytest.approx(np.median(values))
            assert row["q25"] == pytest.approx(np.percentile(values, 25))
            if len(values) > 1:
                assert row["sd"] == pytest.approx(values.std(ddof=1))


def test_measurement_summary_has_no_subject_level_data(cohort, sheet):
    summary = measurement_summary(cohort_measurements(sheet, cohort["measurements"], {FAILED}))
    assert not {"subject", "age", "sex", "bmi", "ct"} & set(summary.columns)
    assert len(summary) <= len(STRUCTURES) * 5


def test_exclusion_counts_add_up(cohort, sheet):
    failures = collect_failures(cohort["statuses"])
    table = cohort_measurements(sheet, cohort["measurements"], set(failures["subject"]))
    counts = exclusion_counts(len(REASONS), failures, table).set_index(["level", "kind"])["count"]
    assert counts[("scans", "in the sheet")] == 4
    assert counts[("scans", "measured")] == 3
    assert counts[("scans", "failed: measure")] == 1
    measured_scans = [s for s in REASONS if s != FAILED]
    for reason in ("", *EXCLUSION_REASONS):
        expected = sum(r == reason for s in measured_scans for r in REASONS[s].values())
        assert counts[("structures", reason or "measured")] == expected
    assert counts.loc["structures"].sum() == 3 * len(STRUCTURES)
    assert counts[("scans", "measured, no age")] == 0 and counts[("scans", "measured, no sex")] == 0
    # a measured scan whose sheet row leaves age blank is counted (one scan, whatever its rows)
    blank_age = table.assign(age=table["age"].where(table["subject"] != measured_scans[0]))
    counts = exclusion_counts(len(REASONS), failures, blank_age).set_index(["level", "kind"])["count"]
    assert counts[("scans", "measured, no age")] == 1 and counts[("scans", "measured, no sex")] == 0


def test_failure_summary_names_the_count_stages_and_table(cohort):
    failures = pd.concat(
        [
            collect_failures(cohort["statuses"]),
            pd.DataFrame([("s9", "segment", "x"), ("s8", "segment", "y")], columns=FAILURE_COLUMNS),
        ]
    )
    line = failure_summary(failures, 10, "results/tables/failures.tsv")
    assert line.startswith("ctcohort: 3 of 10 scans failed")
    assert "segment: 2" in line and "measure: 1" in line and "results/tables/failures.tsv" in line
    assert failure_summary(failures.iloc[:0], 10, "f.tsv") is None


# --- recording_failure ---------------------------------------------------------------------------


def test_recording_failure_success_writes_ok_status(tmp_path):
    path = tmp_path / "status.json"
    with recording_failure("s1", "measure", path, policy="record") as status:
        pass
    assert status.ok and status.error == ""
    assert read_status(path) == ScanStatus("s1", "measure", ok=True, error="")


@pytest.mark.parametrize("policy", ["record", "fail"])
def test_recording_failure_success_with_either_policy(tmp_path, policy):
    path = tmp_path / "status.json"
    with recording_failure("s9", "segment", path, policy=policy):
        pass
    assert read_status(path).ok


def test_recording_failure_record_swallows_and_writes(tmp_path, caplog):
    path = tmp_path / "status.json"
    with caplog.at_level(logging.ERROR):
        with recording_failure("sub-07", "measure", path, policy="record") as status:
            raise ValueError("CT shape (2, 2, 2) and label map shape (3, 3, 3) differ")
    assert status.ok is False
    assert status.error == "ValueError: CT shape (2, 2, 2) and label map shape (3, 3, 3) differ"
    written = json.loads(path.read_text())
    assert written == {
        "subject": "sub-07",
        "stage": "measure",
        "ok": False,
        "error": "ValueError: CT shape (2, 2, 2) and label map shape (3, 3, 3) differ",
    }
    # the failure shows up in the cohort's failure list
    assert collect_failures([path]).to_dict("records") == [
        {"subject": "sub-07", "stage": "measure", "error": written["error"]}
    ]
    # and in the log, with the traceback
    assert "sub-07" in caplog.text and "Traceback" in caplog.text


def test_recording_failure_is_the_default_policy(tmp_path):
    path = tmp_path / "status.json"
    with recording_failure("s1", "measure", path):
        raise KeyError("liver")
    assert read_status(path).error == "KeyError: 'liver'"


def test_recording_failure_fail_reraises_without_status(tmp_path):
    path = tmp_path / "status.json"
    error = RuntimeError("segmentation crashed")
    with pytest.raises(RuntimeError) as info:
        with recording_failure("s1", "segment", path, policy="fail"):
            raise error
    assert info.value is error
    # the job fails as usual: no status file is left behind
    assert not path.exists()


def test_recording_failure_does_not_swallow_interrupts(tmp_path):
    path = tmp_path / "status.json"
    with pytest.raises(KeyboardInterrupt):
        with recording_failure("s1", "measure", path, policy="record"):
            raise KeyboardInterrupt
    assert not path.exists()


@pytest.mark.parametrize("policy", ["ignore", "Record", "", "raise"])
def test_recording_failure_unknown_policy(tmp_path, policy):
    path = tmp_path / "status.json"
    ran = []
    with pytest.raises(ValueError, match="policy"):
        with recording_failure("s1", "measure", path, policy=policy):
            ran.append(True)
    assert ran == []  # the step never runs
    assert not path.exists()


def test_recorded_errors_are_one_line(tmp_path):
    path = tmp_path / "status.json"
    with recording_failure("s1", "measure", path):
        raise ValueError("seg.nii.gz: grid does not match the CT, affine\n[[1. 0.]\n [0. 1.]]\nvs\n[[2. 0.]]")
    error = read_status(path).error
    assert "\n" not in error
    assert error == "ValueError: seg.nii.gz: grid does not match the CT, affine [[1. 0.] [0. 1.]] vs [[2. 0.]]"
    # and a failures table written and read back has one row per failed scan
    table_path = tmp_path / "failures.tsv"
    collect_failures([path]).to_csv(table_path, sep="\t", index=False)
    assert len(table_path.read_text().splitlines()) == 2


class OutOfMemoryError(RuntimeError):
    """Named like torch.cuda.OutOfMemoryError, which is what a CUDA allocation failure raises."""


@pytest.mark.parametrize(
    "error",
    [
        MemoryError(),
        OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
        RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory"),
        OSError(errno.ENOSPC, "No space left on device"),
    ],
)
def test_resource_errors_fail_the_job_instead_of_excluding_the_scan(tmp_path, error):
    path = tmp_path / "status.json"
    with pytest.raises(type(error)):
        with recording_failure("big-scan", "segment", path, policy="record"):
            raise error
    assert not path.exists()  # no status: the job fails and Snakemake may retry it


def test_a_missing_file_is_the_scans_fault_not_a_resource_error(tmp_path):
    path = tmp_path / "status.json"
    with recording_failure("s1", "measure", path, policy="record"):
        raise FileNotFoundError(errno.ENOENT, "No such file or directory", "ct.nii.gz")
    assert not read_status(path).ok
