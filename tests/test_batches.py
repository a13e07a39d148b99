"""Per-scan steps run a batch per job: each scan keeps its table and status, failures stay per scan."""

import json

import pytest

from ctcohort.batches import batch_outputs, in_batches, run_batch
from ctcohort.scan_status import ScanStatus


def test_batches_are_consecutive_and_cover_every_subject_once():
    subjects = [f"s{i:03d}" for i in range(45)]
    batches = in_batches(subjects, 20)
    assert [len(b) for b in batches] == [20, 20, 5]
    assert sum(batches, []) == subjects
    assert in_batches([], 20) == []
    with pytest.raises(ValueError, match="at least 1"):
        in_batches(subjects, 0)


def test_a_batch_needs_one_table_and_status_per_scan(tmp_path):
    with pytest.raises(ValueError, match="one table and status per scan"):
        batch_outputs(["a", "b"], [tmp_path / "a.tsv"], [tmp_path / "a.json", tmp_path / "b.json"])


def write_text(value, path):
    path.write_text(f"{value}\n")


def test_a_failing_scan_is_recorded_and_the_rest_of_the_batch_goes_on(tmp_path):
    subjects = ["a", "b", "c", "d"]
    upstream = [tmp_path / f"{s}.seg.json" for s in subjects]
    for subject, path in zip(subjects, upstream):
        ok = subject != "d"
        ScanStatus(subject, "segment", ok=ok, error="" if ok else "ValueError: no image").write(path)
    scans = batch_outputs(
        subjects, [tmp_path / f"{s}.tsv" for s in subjects], [tmp_path / f"{s}.json" for s in subjects], upstream
    )
    steps = []

    def step(i):
        steps.append(i)
        if subjects[i] == "b":
            raise ValueError("b.nii.gz: not a CT")
        return subjects[i] * 2

    statuses = run_batch("measure", scans, step, write_text, lambda: "empty")
    assert steps == [0, 1, 2]  # d failed upstream: not run
    assert [s.ok for s in statuses] == [True, False, True, False]
    read = [json.loads(scan.status.read_text()) for scan in scans]
    assert read[1] == {"subject": "b", "stage": "measure", "ok": False, "error": "ValueError: b.nii.gz: not a CT"}
    assert read[3] == {"subject": "d", "stage": "segment", "ok": False, "error": "ValueError: no image"}
    assert [scan.table.read_text() for scan in scans] == ["aa\n", "empty\n", "cc\n", "empty\n"]


def test_scans_without_an_earlier_stage_run_beside_those_whose_earlier_stage_failed(tmp_path):
    # a batch of NIfTI scans ("": no import stage) and DICOM scans (an import status each)
    imported = tmp_path / "b.import.json"
    ScanStatus("b", "import_ct", ok=False, error="DicomImportError: no CT image").write(imported)
    scans = batch_outputs(
        ["a", "b"], [tmp_path / "a.tsv", tmp_path / "b.tsv"], [tmp_path / "a.json", tmp_path / "b.json"], ["", imported]
    )
    assert [scan.upstream for scan in scans] == [(), [imported]]
    statuses = run_batch("measure", scans, lambda i: "measured", write_text, lambda: "empty")
    assert [(s.stage, s.ok) for s in statuses] == [("measure", True), ("import_ct", False)]
    assert [scan.table.read_text() for scan in scans] == ["measured\n", "empty\n"]


def test_policy_fail_stops_the_batch_and_resource_errors_always_do(tmp_path):
    scans = batch_outputs(
        ["a", "b"], [tmp_path / "a.tsv", tmp_path / "b.tsv"], [tmp_path / "a.json", tmp_path / "b.json"]
    )

    def broken(i):
        raise ValueError("broken")

    with pytest.raises(ValueError, match="broken"):
        run_batch("evaluate", scans, broken, write_text, lambda: "", on_error="fail")

    def out_of_memory(i):
        raise MemoryError()

    with pytest.raises(MemoryError):  # the job fails and can be retried with more memory
        run_batch("evaluate", scans, out_of_memory, write_text, lambda: "")
    assert not scans[0].status.exists()
