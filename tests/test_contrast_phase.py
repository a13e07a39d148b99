"""ctcohort.contrast_phase: the phase of the real example CT (and copies with planted enhancement) from
ctcohort's measurement against TotalSegmentator's own statistics and phase code on the same CT and
segmentation (tests/totalseg_phase_driver.py); scans whose tables cannot give the inputs."""

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from conftest import require_shared_data

from ctcohort import aggregate, contrast_phase
from ctcohort.measure import measure_structures, read_measurements, write_measurements
from ctcohort.qc import apply_plausibility
from ctcohort.review import review_flags
from ctcohort.structures import load_structure_table

DRIVER = Path(__file__).with_name("totalseg_phase_driver.py")
# HU added inside structures of the real (native) CT: the aorta alone bright (early arterial), the portal vein
# and liver beginning to enhance (late arterial), organs and veins enhanced (portal venous); TotalSegmentator's
# classifier puts them 3 s or more from a phase boundary
PLANTED = {
    "arterial_early": {"aorta": 250},
    "arterial_late": {"aorta": 250, "portal_vein_and_splenic_vein": 50, "liver": 20},
    "portal_venous": {"aorta": 150, "inferior_vena_cava": 30, "portal_vein_and_splenic_vein": 50, "liver": 60},
}


def _classifiers_or_skip() -> dict:
    try:
        return contrast_phase.load_classifiers()
    except contrast_phase.PhaseUnavailable as error:
        if os.environ.get("CI"):
            pytest.fail(f"{error}; CI installs it (.ci/run)")
        pytest.skip(str(error))


def _planted_cts(folder: Path, tmp_path: Path, v2: pd.DataFrame) -> dict[str, tuple[Path, np.ndarray]]:
    ct = nib.load(folder / "example_ct_sm.nii.gz")
    labels = np.asanyarray(nib.load(folder / "example_seg.nii.gz").dataobj).astype(np.uint8)
    ids = dict(zip(v2["name"], v2["label"]))
    cts = {}
    for name, added in {"native": {}, **PLANTED}.items():
        hu = np.asanyarray(ct.dataobj).astype(np.int16)
        for structure, offset in added.items():
            hu[labels == ids[structure]] += offset
        path = tmp_path / f"{name}.nii.gz"
        nib.save(nib.Nifti1Image(hu, ct.affine), path)
        cts[name] = (path, hu)
    return cts


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> tuple[dict[str, tuple[Path, np.ndarray]], dict[str, pd.DataFrame]]:
    """The real CT and its planted copies (path and HU, by phase), and ctcohort's measurement of each with the
    real v2 segmentation (measured once for the module's tests)."""
    folder = require_shared_data() / "totalseg-example"
    v2 = load_structure_table("total_v2")
    cts = _planted_cts(folder, tmp_path_factory.mktemp("planted"), v2)
    labels = np.asanyarray(nib.load(folder / "example_seg.nii.gz").dataobj).astype(np.uint8)
    return cts, {name: measure_structures(hu, labels, 0.027, v2) for name, (_, hu) in cts.items()}


def test_phase_equals_totalsegmentators_on_the_real_ct(planted):
    """pi time within 1 s of TotalSegmentator's and the same phase, for the real CT (native) and copies
    with planted arterial and portal venous enhancement."""
    classifiers = _classifiers_or_skip()
    pytest.importorskip("totalsegmentator.statistics")
    folder = require_shared_data() / "totalseg-example"
    cts, tables = planted
    ours = contrast_phase.contrast_phase_table(tables, classifiers).set_index("subject")
    command = [sys.executable, str(DRIVER), str(folder / "example_seg.nii.gz"), *(str(p) for p, _ in cts.values())]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    theirs = dict(zip(cts, json.loads(done.stdout.strip().splitlines()[-1])))
    for name, reference in theirs.items():
        assert abs(ours.at[name, "pi_time_s"] - reference["pi_time"]) <= 1.0, name
        assert ours.at[name, "phase"] == reference["phase"], name
        assert ours.at[name, "probability"] == reference["probability"], name
        assert abs(ours.at[name, "pi_time_sd"] - reference["stddev"]) <= 0.1, name
    assert list(ours["phase"]) == list(cts)  # each copy is in the phase it was planted for


def _table(hu_by_structure: dict, voxels: int = 100, voxel_ml: float = 0.002) -> pd.DataFrame:
    """A per-scan measurement table: each structure with ``voxels`` voxels and its median HU (None: absent)."""
    rows = []
    for name, hu in hu_by_structure.items():
        n = 0 if hu is None else voxels
        rows.append(
            {
                "structure": name,
                "n_voxels": n,
                "volume_ml": n * voxel_ml if n else np.nan,
                "hu_median": np.nan if hu is None else hu,
                "exclusion_reason": "absent" if hu is None else "",
            }
        )
    return pd.DataFrame(rows)


def test_a_table_without_the_classifiers_structures_lists_what_is_missing():
    v1 = load_structure_table("total_v1")
    table = _table(dict.fromkeys(v1["name"], 40.0))
    phases = contrast_phase.contrast_phase_table({"s1": table, "failed": table.iloc[:0]}, classifiers={})
    assert list(phases["phase"]) == [contrast_phase.NOT_AVAILABLE] * 2
    missing = set(contrast_phase.PHASE_STRUCTURES) - set(v1["name"])
    assert missing and all(name in phases.at[0, "note"] for name in missing)
    assert "liver" not in phases.at[0, "note"].split("lacks")[1]
    assert phases.at[1, "note"] == "scan not measured" and phases["pi_time_s"].isna().all()


def test_absent_structures_are_zero_and_a_brain_without_head_neck_vessels_is_noted():
    hu = dict.fromkeys(contrast_phase.PHASE_STRUCTURES, 30.0) | {"heart": None, "brain": 35.0}
    features = contrast_phase.scan_features(_table(hu))
    expected = [0.0 if value is None else value for value in hu.values()] + [0.0] * 4
    np.testing.assert_array_equal(features.values, expected)
    assert "brain in the scan" in features.note
    # a brain of 0.1 ml or less is not in the scan (TotalSegmentator's rule): the vessels are 0, nothing noted
    assert contrast_phase.scan_features(_table(hu, voxels=101, voxel_ml=0.001)).note
    assert contrast_phase.scan_features(_table(hu, voxels=100, voxel_ml=0.001)).note == ""
    # a head-neck model of the study gives the vessels
    with_vessels = _table(hu | dict(zip(contrast_phase.HEAD_NECK_VESSELS, (300.0, 310.0, None, 120.0))))
    features = contrast_phase.scan_features(with_vessels)
    np.testing.assert_array_equal(features.values[-4:], [300.0, 310.0, 0.0, 120.0])
    assert features.note == ""


def test_a_structure_too_small_to_measure_is_absent_and_named():
    table = _table(dict.fromkeys(contrast_phase.PHASE_STRUCTURES, 30.0))
    small = table["structure"] == "gallbladder"
    table.loc[small, ["hu_median", "exclusion_reason", "n_voxels"]] = [np.nan, "too_small", 3]
    features = contrast_phase.scan_features(table)
    assert features.values[3] == 0.0 and "gallbladder" in features.note
    table.loc[small, "exclusion_reason"] = "hu_nonfinite"
    assert contrast_phase.scan_features(table).values is None


@pytest.mark.parametrize(
    "pi_time, phase, probability",
    [
        (4.99, "native", 1.0),
        (5.0, "native", 0.7),
        (9.996, "arterial_early", 0.7),  # rounded to 10.0 first, as TotalSegmentator does
        (29.99, "arterial_early", 1.0),
        (45.0, "arterial_late", 1.0),
        (59.0, "arterial_late", 0.7),
        (60.0, "portal_venous", 1.0),
        (95.0, "portal_venous", 0.7),
        (140.0, "portal_venous", 0.3),
    ],
)
def test_phase_bands_are_totalsegmentators(pi_time, phase, probability):
    assert contrast_phase.phase_of(pi_time) == (phase, probability)


def test_without_the_classifier_every_row_says_what_to_install(monkeypatch):
    def unavailable():
        raise contrast_phase.PhaseUnavailable("xgboost not installed: " + contrast_phase.INSTALL_HINT)

    monkeypatch.setattr(contrast_phase, "load_classifiers", unavailable)
    table = _table(dict.fromkeys(contrast_phase.PHASE_STRUCTURES, 30.0))
    phases = contrast_phase.contrast_phase_table({"s1": table})
    assert phases.at[0, "phase"] == contrast_phase.NOT_AVAILABLE and "phase" in phases.at[0, "note"]
    estimate = contrast_phase.estimated_contrast(phases)
    assert estimate["contrast"].isna().all()


def test_estimated_contrast_is_one_for_every_phase_but_native():
    phases = pd.DataFrame({"subject": ["a", "b", "c"], "phase": ["native", "arterial_late", "not_available"]})
    estimate = contrast_phase.estimated_contrast(phases)
    assert estimate["contrast"].tolist()[:2] == [0, 1] and pd.isna(estimate["contrast"].iloc[2])


def test_the_fast_models_segmentation_gives_the_same_phase(tmp_path):
    """TotalSegmentator computes the features on its 3 mm fast model's segmentation; a study may use the
    1.5 mm model's. On the real CT (3 mm voxels) the two label maps' medians differ by up to 8 HU (colon)
    and the phases of the real and planted copies agree within 1 s (measured: equal)."""
    classifiers = _classifiers_or_skip()
    folder = require_shared_data() / "totalseg-example"
    v2 = load_structure_table("total_v2")
    fast = np.asanyarray(nib.load(folder / "example_seg_fast.nii.gz").dataobj).astype(np.uint8)
    full = np.asanyarray(nib.load(folder / "example_seg.nii.gz").dataobj).astype(np.uint8)
    tables = {}
    for name, (_, hu) in _planted_cts(folder, tmp_path, v2).items():
        tables[name] = measure_structures(hu, full, 0.027, v2)
        tables[f"{name} fast"] = measure_structures(hu, fast, 0.027, v2)
    phases = contrast_phase.contrast_phase_table(tables, classifiers).set_index("subject")
    for name in ("native", *PLANTED):
        assert abs(phases.at[name, "pi_time_s"] - phases.at[f"{name} fast", "pi_time_s"]) <= 1.0
        assert phases.at[name, "phase"] == phases.at[f"{name} fast", "phase"] == name
    differences = np.abs(tables["native"]["hu_median"] - tables["native fast"]["hu_median"])
    assert differences[tables["native"]["structure"].isin(contrast_phase.PHASE_STRUCTURES)].max() > 0


def test_a_sheet_value_that_contradicts_a_certain_estimate_is_flagged(planted, tmp_path):
    """A cohort of the real measurements of the planted copies: the native scan marked contrast 1 and the early
    arterial one marked 0 are flagged contrast_disagrees in the cohort QC table and on the review page, once per
    scan, and keep the sheet's value; scans whose sheet agrees, or is blank (estimated), are not flagged."""
    classifiers = _classifiers_or_skip()
    _, tables = planted
    cohort = {  # subject: (the planted phase, the sheet's contrast; NaN: blank)
        "native_marked_1": ("native", 1),
        "arterial_marked_0": ("arterial_early", 0),
        "native_marked_0": ("native", 0),
        "late_marked_1": ("arterial_late", 1),
        "portal_blank": ("portal_venous", np.nan),
    }
    paths = {subject: tmp_path / f"{subject}.tsv" for subject in cohort}
    for subject, (phase, _) in cohort.items():
        write_measurements(tables[phase], paths[subject])
    phases = contrast_phase.contrast_phase_table({s: read_measurements(p) for s, p in paths.items()}, classifiers)
    assert (phases["probability"] == contrast_phase.CERTAIN).all()
    sheet = pd.DataFrame(
        {"subject": list(cohort), "age": 60.0, "sex": "F", "contrast": [c for _, c in cohort.values()]}
    )
    joined, resolved = contrast_phase.resolved_sheet(sheet, phases)
    measured = aggregate.cohort_measurements(joined, paths, set())
    qc = aggregate.cohort_qc(measured, apply_plausibility(measured, None, None), {}, contrast=resolved)

    flags = review_flags(qc)
    disagreeing = flags[flags["flag"] == "contrast_disagrees"]
    assert sorted(disagreeing["subject"]) == ["arterial_marked_0", "native_marked_1"]
    assert (disagreeing["structure"] == "").all()
    scans = measured.drop_duplicates("subject").set_index("subject")
    assert scans["contrast"].to_dict() == {subject: 0.0 if "marked_0" in subject else 1.0 for subject in cohort}
    assert scans["phase"].to_dict() == {subject: phase for subject, (phase, _) in cohort.items()}
    sources = qc.drop_duplicates("subject").set_index("subject")["contrast_source"]
    assert sources.to_dict() == {subject: "estimated" if subject == "portal_blank" else "sheet" for subject in cohort}
