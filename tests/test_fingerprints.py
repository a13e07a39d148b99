"""Inputs that changed are measured again, whatever their modification time."""

import os
import shutil

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from conftest import require_shared_data, run_workflow

from ctcohort.fingerprints import source_files, source_fingerprint

OLD = (946_684_800, 946_684_800)  # 2000-01-01: older than any output


def test_a_file_replaced_with_an_older_time_changes_the_fingerprint(tmp_path):
    scan = tmp_path / "ct.nii.gz"
    scan.write_bytes(b"first scan")
    before = source_fingerprint([str(scan)])
    assert source_fingerprint([str(scan)]) == before  # nothing changed
    replacement = tmp_path / "elsewhere.nii.gz"
    replacement.write_bytes(b"other scan")
    os.utime(replacement, OLD)
    shutil.copy2(replacement, scan)  # cp -p: the content and the old time
    assert os.stat(scan).st_mtime_ns < os.stat(replacement).st_ctime_ns
    assert source_fingerprint([str(scan)]) != before


def test_dicom_files_rewritten_inside_a_folder_whose_time_is_kept(tmp_path):
    series = tmp_path / "series"
    (series / "sub").mkdir(parents=True)
    for name in ("a.dcm", "sub/b.dcm"):
        (series / name).write_bytes(b"slice")
    folder_times = (os.stat(series).st_atime_ns, os.stat(series).st_mtime_ns)
    before = source_fingerprint([str(series)])
    (series / "sub" / "b.dcm").write_bytes(b"other")
    os.utime(series / "sub" / "b.dcm", OLD)
    os.utime(series, ns=folder_times)
    assert source_fingerprint([str(series)]) != before
    assert source_files(str(series)) == [str(series / "a.dcm"), str(series / "sub" / "b.dcm")]


def test_a_file_list_is_its_files(tmp_path):
    (tmp_path / "a.dcm").write_bytes(b"slice")
    listing = tmp_path / "list.txt"
    listing.write_text("a.dcm\n")
    before = source_fingerprint([str(listing)])
    (tmp_path / "a.dcm").write_bytes(b"slice2")
    assert source_fingerprint([str(listing)]) != before
    os.remove(tmp_path / "a.dcm")
    assert source_fingerprint([str(listing)]) not in (before, "")


@pytest.mark.slow
def test_a_ct_replaced_with_an_older_copy_is_measured_again(tmp_path):
    folder = require_shared_data() / "totalseg-example"
    data = tmp_path / "data"
    data.mkdir()
    ct = nib.load(folder / "example_ct.nii.gz").slicer[:, :, 60:112]
    labels = np.rint(np.asanyarray(nib.load(folder / "example_seg_v1.nii.gz").slicer[:, :, 60:112].dataobj))
    hu = np.asanyarray(ct.dataobj).astype(np.int16)
    nib.save(nib.Nifti1Image(labels.astype(np.uint8), ct.affine), data / "seg.nii.gz")
    for subject, shift in (("s1", 0), ("s2", 7)):
        nib.save(nib.Nifti1Image((hu + shift).astype(np.int16), ct.affine), data / f"{subject}.nii.gz")
    pd.DataFrame(
        {"subject": ["s1", "s2"], "ct": ["s1.nii.gz", "s2.nii.gz"], "seg": "seg.nii.gz", "age": [50, 60], "sex": "F"}
    ).to_csv(data / "cohort.tsv", sep="\t", index=False)
    config = {"cohort": str(data / "cohort.tsv"), "segmentation": {"method": "precomputed"}}

    def liver_hu():
        table = pd.read_csv(tmp_path / "results" / "measure" / "s1.tsv", sep="\t").set_index("structure")
        return table.at["liver", "hu_mean"]

    # the measurements and the table made of them (the cohort rules after it add nothing to this check)
    target = "results/tables/measurements.tsv"
    run_workflow(tmp_path, config, target)
    before = liver_hu()
    # s1's CT replaced by a copy 200 HU lower that keeps an old modification time (cp -p, rsync -a, unzip)
    replacement = tmp_path / "lower.nii.gz"
    nib.save(nib.Nifti1Image((hu - 200).astype(np.int16), ct.affine), replacement)
    os.utime(replacement, OLD)
    shutil.copy2(replacement, data / "s1.nii.gz")
    run_workflow(tmp_path, config, target)
    assert liver_hu() == pytest.approx(before - 200, abs=1e-6)
    assert pd.read_csv(tmp_path / target, sep="\t").query("subject == 's1' and structure == 'liver'")["hu_mean"].iloc[
        0
    ] == pytest.approx(before - 200, abs=1e-6)
    again = run_workflow(tmp_path, config, "--dry-run", target)
    assert "Nothing to be done" in again.stdout + again.stderr
