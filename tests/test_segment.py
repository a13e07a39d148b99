"""nnU-Net inference with real (tiny, barely trained) models: model folders, geometry, part merging."""

import json
import os

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

pytest.importorskip("nnunetv2", reason="segmentation needs the optional 'segment' dependencies")

from ctcohort import phantom  # noqa: E402
from ctcohort.cli import main  # noqa: E402
from ctcohort.segment import (  # noqa: E402
    ModelFolderError,
    Segmenter,
    find_model_parts,
    missing_segmentation_packages,
    model_files,
    recorded_label_names,
    segment_batch,
)
from ctcohort.structures import load_structure_table  # noqa: E402
from ctcohort.train import train_tiny_model  # noqa: E402

pytestmark = pytest.mark.slow
V1 = load_structure_table("total_v1")
PART_A = ["liver", "spleen", "kidney_left", "kidney_right"]
PART_B = ["hip_left", "hip_right", "sacrum", "kidney_left"]  # kidney_left claimed by both parts


@pytest.fixture(scope="module")
def two_part_model(tmp_path_factory):
    """Two real nnU-Net models as parts of one model folder (Dataset998_..., Dataset999_...)."""
    root = tmp_path_factory.mktemp("models")
    model_dir = root / "two_parts"
    for dataset_id, structures in ((998, PART_A), (999, PART_B)):
        trained = train_tiny_model(root / f"train{dataset_id}", dataset_id=dataset_id, structures=structures,
                                   iterations=3)
        target = model_dir / f"Dataset{dataset_id:03d}_Part" / "nnUNetTrainer__nnUNetPlans__3d_small"
        target.parent.mkdir(parents=True)
        trained.rename(target)
    return model_dir


@pytest.fixture(scope="module")
def phantom_scan(tmp_path_factory):
    folder = tmp_path_factory.mktemp("scan")
    ct, labels, affine = phantom.render_subject(phantom.draw_subject(seed=11, index=0), spacing=(6.0, 5.0, 8.0))
    path = folder / "ct.nii.gz"
    nib.save(nib.Nifti1Image(ct, affine), path)
    return path


def test_parts_map_their_labels_to_global_structures(two_part_model):
    parts = find_model_parts(two_part_model, V1)
    assert [p.dataset_id for p in parts] == [998, 999]
    label_of = dict(zip(V1["name"], V1["label"]))
    assert sorted(parts[0].global_labels.values()) == sorted(label_of[s] for s in PART_A)
    assert sorted(parts[1].global_labels.values()) == sorted(label_of[s] for s in PART_B)
    # each part's own dataset.json names its labels
    names = json.loads((parts[1].folder / "dataset.json").read_text())["labels"]
    for name, local in names.items():
        if name != "background":
            assert parts[1].global_labels[local] == label_of[name]


def test_merged_map_is_the_parts_merged_later_part_winning(two_part_model, phantom_scan):
    ct = nib.load(phantom_scan)
    merged = Segmenter(two_part_model, V1, device="cpu").segment(ct)
    assert merged.shape == ct.shape and merged.dtype == np.uint8
    singles = []
    for part_folder in sorted(two_part_model.glob("Dataset*/*")):
        singles.append(Segmenter(part_folder, V1, device="cpu").segment(ct))
    expected = singles[0].copy()
    expected[singles[1] != 0] = singles[1][singles[1] != 0]
    np.testing.assert_array_equal(merged, expected)
    allowed = {0} | {int(V1.set_index("name").at[s, "label"]) for s in PART_A + PART_B}
    assert set(np.unique(merged)) <= allowed
    assert len(set(np.unique(merged)) - {0}) >= 2, "the tiny models should label something for this test to bite"


def test_output_lies_on_the_input_grid_in_any_orientation(two_part_model, phantom_scan, tmp_path):
    """The same scan stored RAS and LPS (anisotropic spacing) gets the same labels, each on its own grid."""
    ras = nib.load(phantom_scan)
    data = np.asanyarray(ras.dataobj)
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    flip[:2, 3] = np.array(ras.shape[:2]) - 1
    lps = nib.Nifti1Image(data[::-1, ::-1, :].copy(), ras.affine @ flip)
    assert nib.aff2axcodes(lps.affine) == ("L", "P", "S")
    lps_path = tmp_path / "lps.nii.gz"
    nib.save(lps, lps_path)
    out = tmp_path / "out"
    assert main(["segment", "--ct", str(phantom_scan), str(lps_path), "--model", str(two_part_model),
                 "--structures", "total_v1", "--device", "cpu", "-o", str(out)]) == 0
    seg_ras, seg_lps = nib.load(out / "ct.nii.gz"), nib.load(out / "lps.nii.gz")
    assert seg_lps.shape == lps.shape
    np.testing.assert_allclose(seg_lps.affine, lps.affine)
    np.testing.assert_allclose(seg_ras.affine, ras.affine)
    np.testing.assert_array_equal(np.asanyarray(seg_lps.dataobj)[::-1, ::-1, :], np.asanyarray(seg_ras.dataobj))
    assert np.count_nonzero(np.asanyarray(seg_ras.dataobj)) > 100
    names = recorded_label_names(seg_ras)
    label_names = dict(zip(V1["label"], V1["name"]))
    assert all(label_names[k] == v for k, v in names.items())
    assert set(names) == set(np.unique(np.asanyarray(seg_ras.dataobj)).tolist()) - {0}


def test_batch_records_a_broken_scan_and_segments_the_rest(two_part_model, phantom_scan, tmp_path):
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(b"no image here")
    outputs = [tmp_path / "a.nii.gz", tmp_path / "b.nii.gz"]
    statuses = [tmp_path / "a.json", tmp_path / "b.json"]
    segment_batch(["good", "bad"], [phantom_scan, broken], outputs, statuses, model=two_part_model,
                  structures="total_v1", device="cpu")
    good, bad = (json.loads(p.read_text()) for p in statuses)
    assert good["ok"] and not bad["ok"]
    assert bad["stage"] == "segment" and "broken.nii.gz" in bad["error"]
    assert nib.load(outputs[0]).shape == nib.load(phantom_scan).shape


@pytest.mark.parametrize("make, message", [
    (lambda d: None, "does not exist"),
    (lambda d: d.mkdir(), "expected an nnU-Net v2 trained model folder"),
])
def test_missing_or_empty_model_folder_says_what_to_provide(tmp_path, make, message):
    folder = tmp_path / "weights"
    make(folder)
    with pytest.raises(ModelFolderError, match=message):
        find_model_parts(folder, V1)


def test_model_files_are_each_parts_plans_and_fold_checkpoints(two_part_model):
    files = model_files(find_model_parts(two_part_model, V1), folds=[0])
    assert len(files) == 2 * 3 and all(path.is_file() for path in files)
    assert {path.name for path in files} == {"dataset.json", "plans.json", "checkpoint_final.pth"}


def test_missing_segmentation_packages_say_what_to_install():
    assert missing_segmentation_packages(("json",)) is None
    message = missing_segmentation_packages(("json", "no_such_package_here"))
    assert "no_such_package_here" in message and "pip install -e '.[segment]'" in message


def test_labels_not_in_the_structure_table_are_named(two_part_model):
    table = pd.DataFrame({"label": [1], "name": ["liver"], "group": ["organ"]})
    with pytest.raises(ModelFolderError, match="spleen"):
        find_model_parts(two_part_model, table)


def test_workflow_segments_in_batches_and_passes_failures_on(two_part_model, tmp_path):
    from conftest import run_workflow

    data = tmp_path / "data"
    phantom.write_cohort(data, 5, seed=5, spacing=(6.0, 5.0, 8.0))
    (data / "ct" / "demo003.nii.gz").write_bytes(b"not a scan")
    config = {
        "cohort": str(data / "cohort.tsv"),
        "segmentation": {"method": "nnunet", "model": str(two_part_model), "device": "cpu", "threads": 1,
                         "scans_per_job": 2},
    }
    result = run_workflow(tmp_path, config)
    assert result.stderr.count("rule segment_batch_") == 3  # 5 scans, 2 per job
    failures = pd.read_csv(tmp_path / "results" / "tables" / "failures.tsv", sep="\t")
    assert list(failures["subject"]) == ["demo003"] and list(failures["stage"]) == ["segment"]
    measurements = pd.read_csv(tmp_path / "results" / "tables" / "measurements.tsv", sep="\t")
    assert sorted(measurements["subject"].unique()) == ["demo001", "demo002", "demo004", "demo005"]
    seg = nib.load(tmp_path / "results" / "seg" / "demo001.nii.gz")
    ct = nib.load(data / "ct" / "demo001.nii.gz")
    assert seg.shape == ct.shape and np.allclose(seg.affine, ct.affine)
    dice = pd.read_csv(tmp_path / "results" / "evaluation" / "dice.tsv", sep="\t")
    assert set(dice["subject"]) == {"demo001", "demo002", "demo004", "demo005"}
    assert dice["dice"].dropna().between(0, 1).all()
    # the weights are inputs of the segmentation jobs: replacing them segments every batch again
    dry = run_workflow(tmp_path, config, "-n")
    assert "segment_batch_" not in dry.stdout + dry.stderr
    checkpoints = sorted(two_part_model.rglob("fold_0/checkpoint_final.pth"))
    assert len(checkpoints) == 2
    os.utime(checkpoints[1])
    dry = run_workflow(tmp_path, config, "-n")
    assert (dry.stdout + dry.stderr).count("rule segment_batch_") == 3


def test_bundled_model_segments_an_lps_phantom_scan_on_its_grid(tmp_path):
    """The default model, on an unseen demo scan stored LPS with 2.5 x 2.5 x 4 mm voxels: the label map lies
    on exactly that grid and matches the phantom's truth."""
    ct, truth, affine = phantom.render_subject(phantom.draw_subject(seed=1, index=0))
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    flip[:2, 3] = np.array(ct.shape[:2]) - 1
    lps_affine = affine @ flip
    assert nib.aff2axcodes(lps_affine) == ("L", "P", "S")
    path = tmp_path / "lps.nii.gz"
    nib.save(nib.Nifti1Image(ct[::-1, ::-1, :].copy(), lps_affine), path)
    assert main(["segment", "--ct", str(path), "--device", "cpu", "--threads", "2", "-o", str(tmp_path / "out")]) == 0
    seg = nib.load(tmp_path / "out" / "lps.nii.gz")
    assert seg.shape == ct.shape
    np.testing.assert_allclose(seg.affine, lps_affine)
    predicted = np.asanyarray(seg.dataobj)[::-1, ::-1, :]  # back to the truth's RAS voxel order
    names = dict(zip(V1["label"], V1["name"]))
    present = [label for label in np.unique(truth) if label]
    assert len(present) >= 30
    for label in present:
        p, t = predicted == label, truth == label
        dice = 2 * np.count_nonzero(p & t) / (np.count_nonzero(p) + np.count_nonzero(t))
        assert dice >= 0.9, f"{names[label]}: Dice {dice:.3f}"
    assert set(np.unique(predicted)) <= set(np.unique(truth))  # nothing that is not there


def _nnunet_own_labels(segmenter, ct):
    """nnU-Net's own preprocessing and export (predict_single_npy_array) for a single-part model, (x, y, z)."""
    hu = np.asanyarray(ct.dataobj).astype(np.float32)
    spacing = [float(s) for s in ct.header.get_zooms()[:3]]
    local = segmenter.predictors[0].predict_single_npy_array(hu.transpose(2, 1, 0)[None], {"spacing": spacing[::-1]},
                                                            None, None, False)
    lookup = np.zeros(max(segmenter.parts[0].global_labels) + 1, np.uint8)
    for part_label, label in segmenter.parts[0].global_labels.items():
        lookup[part_label] = label
    return lookup[np.asarray(local).transpose(2, 1, 0)]


def test_device_side_processing_matches_nnunets_own(tmp_path):
    """On the model's spacing the device-side pre/postprocessing gives nnU-Net's labels; on another spacing
    (resampled both ways, trilinear here, nnU-Net's spline/linear there) nearly the same."""
    segmenter = Segmenter(None, V1, device="cpu", threads=2)
    ct_data, _, affine = phantom.render_subject(phantom.draw_subject(seed=1, index=1))
    native = nib.Nifti1Image(ct_data, affine)
    np.testing.assert_array_equal(segmenter.segment(native), _nnunet_own_labels(segmenter, native))

    coarse_data, _, coarse_affine = phantom.render_subject(phantom.draw_subject(seed=1, index=1), spacing=(3.0, 3.0, 5.0))
    coarse = nib.Nifti1Image(coarse_data, coarse_affine)
    ours, theirs = segmenter.segment(coarse), _nnunet_own_labels(segmenter, coarse)
    assert ours.shape == coarse.shape
    foreground = (ours != 0) | (theirs != 0)
    assert np.mean(ours[foreground] == theirs[foreground]) > 0.95
