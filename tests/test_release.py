"""Training data: a phantom release in the TotalSegmentator layout, and its conversion into an nnU-Net raw dataset."""

import json

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from tiny_model import TINY_SPACING, write_test_release

from ctcohort import phantom
from ctcohort import release as rel
from ctcohort.imaging import GridMismatchError
from ctcohort.structures import load_structure_table

SPACING = TINY_SPACING
STRUCTURE_NAMES = [s.name for s in phantom.ANATOMY]


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """Six coarse phantom scans in the release layout, one of them val and one test."""
    return write_test_release(tmp_path_factory.mktemp("release"))


def read(path):
    return np.asanyarray(nib.load(path).dataobj)


def test_assign_splits_exact_counts_seeded():
    splits = rel.assign_splits(10, seed=1, val_fraction=0.2, test_fraction=0.1)
    assert (splits.count("train"), splits.count("val"), splits.count("test")) == (7, 2, 1)
    assert splits == rel.assign_splits(10, seed=1, val_fraction=0.2, test_fraction=0.1)
    assert rel.assign_splits(3, seed=1, val_fraction=0.01).count("val") == 1  # at least one
    assert rel.assign_splits(3, seed=1, val_fraction=0.0) == ["train"] * 3
    with pytest.raises(ValueError, match="too few"):
        rel.assign_splits(2, seed=1, val_fraction=0.4, test_fraction=0.4)


def test_phantom_release_layout(release):
    meta = pd.read_csv(release / "meta.csv", sep=";")
    assert list(meta.columns) == ["image_id", "age", "gender", "split"]
    assert meta["image_id"].tolist() == [rel.release_subject_id(i) for i in range(6)]
    assert sorted(meta["split"]) == ["test", "train", "train", "train", "train", "val"]
    assert set(meta["gender"]) <= {"m", "f"}
    table = load_structure_table("total_v1").set_index("name")
    for subject in meta["image_id"]:
        ct = nib.load(release / subject / "ct.nii.gz")
        assert ct.get_data_dtype() == np.int16
        masks = sorted(p.name for p in (release / subject / "segmentations").iterdir())
        assert masks == sorted(f"{name}.nii.gz" for name in STRUCTURE_NAMES)
    # the masks are the phantom's label map, split by structure
    index = 0
    draw = phantom.draw_subject(3, rel.RELEASE_INDEX_OFFSET + index)
    _, labels, affine = phantom.render_subject(draw, SPACING)
    for name in STRUCTURE_NAMES:
        img = nib.load(release / "s0000" / "segmentations" / f"{name}.nii.gz")
        assert img.get_data_dtype() == np.uint8
        np.testing.assert_allclose(img.affine, affine)
        np.testing.assert_array_equal(read(img.get_filename()), labels == table.at[name, "label"])
    assert meta.at[index, "age"] == draw.age


def test_phantom_release_never_repeats_the_demo_cohort(release):
    demo_ct, _, _ = phantom.render_subject(phantom.draw_subject(3, 0), SPACING)
    assert not np.array_equal(read(release / "s0000" / "ct.nii.gz"), demo_ct)


def test_release_to_nnunet_raw(release, tmp_path):
    dataset = rel.release_to_nnunet_raw(release, tmp_path / "raw", 42, "Phantom")
    assert dataset == tmp_path / "raw" / "Dataset042_Phantom"
    spec = json.loads((dataset / "dataset.json").read_text())
    table = load_structure_table("total_v1")
    expected_order = [name for name in table["name"] if name in STRUCTURE_NAMES]  # v1 label order
    assert spec["labels"] == {"background": 0, **{name: k for k, name in enumerate(expected_order, start=1)}}
    assert spec["channel_names"] == {"0": "CT"} and spec["file_ending"] == ".nii.gz"
    meta = pd.read_csv(release / "meta.csv", sep=";")
    trained = meta[meta["split"] != "test"]
    assert spec["numTraining"] == len(trained) == 5
    assert sorted(p.name for p in (dataset / "imagesTr").iterdir()) == sorted(
        f"{s}_0000.nii.gz" for s in trained["image_id"]
    )
    test_subject = meta["image_id"][meta["split"] == "test"].item()
    assert (dataset / "imagesTs" / f"{test_subject}_0000.nii.gz").is_file()
    assert (dataset / "labelsTs" / f"{test_subject}.nii.gz").is_file()
    splits = json.loads((dataset / "splits_final.json").read_text())
    assert splits == [
        {
            "train": trained["image_id"][trained["split"] == "train"].tolist(),
            "val": trained["image_id"][trained["split"] == "val"].tolist(),
        }
    ]

    for subject in trained["image_id"]:
        label_img = nib.load(dataset / "labelsTr" / f"{subject}.nii.gz")
        ct_img = nib.load(release / subject / "ct.nii.gz")
        assert label_img.shape == ct_img.shape
        np.testing.assert_allclose(label_img.affine, ct_img.affine)
        labels = read(label_img.get_filename())
        union = np.zeros(labels.shape, bool)
        for k, name in enumerate(expected_order, start=1):
            mask = read(release / subject / "segmentations" / f"{name}.nii.gz") > 0
            np.testing.assert_array_equal(labels == k, mask)  # the phantom's masks do not overlap
            union |= mask
        np.testing.assert_array_equal(labels > 0, union)
        np.testing.assert_array_equal(
            read(dataset / "imagesTr" / f"{subject}_0000.nii.gz"), read(release / subject / "ct.nii.gz")
        )


def write_mini_release(root, masks: dict, ct_affine=None, mask_affine=None, split="train"):
    """One subject 's0000' with a 4x4x4 CT and the given masks."""
    affine = np.diag([2.0, 2.0, 3.0, 1.0]) if ct_affine is None else ct_affine
    (root / "s0000" / "segmentations").mkdir(parents=True)
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.int16), affine), root / "s0000" / "ct.nii.gz")
    for name, mask in masks.items():
        nib.save(
            nib.Nifti1Image(mask.astype(np.uint8), affine if mask_affine is None else mask_affine),
            root / "s0000" / "segmentations" / f"{name}.nii.gz",
        )
    (root / "meta.csv").write_text(f"image_id;age;gender;split\ns0000;50;f;{split}\n")
    return root


def test_overlapping_masks_later_structure_wins(tmp_path):
    first, second = np.zeros((4, 4, 4), bool), np.zeros((4, 4, 4), bool)
    first[:3], second[2:] = True, True
    release = write_mini_release(tmp_path / "release", {"liver": first, "spleen": second})
    dataset = rel.release_to_nnunet_raw(release, tmp_path / "raw", 1, "Mini", structures=["liver", "spleen"])
    labels = read(dataset / "labelsTr" / "s0000.nii.gz")
    assert (labels[:2] == 1).all() and (labels[2:] == 2).all()
    dataset = rel.release_to_nnunet_raw(release, tmp_path / "raw", 1, "Mini", structures=["spleen", "liver"])
    labels = read(dataset / "labelsTr" / "s0000.nii.gz")
    assert (labels[:3] == 2).all() and (labels[3:] == 1).all()
    assert json.loads((dataset / "dataset.json").read_text())["labels"] == {"background": 0, "spleen": 1, "liver": 2}


def test_default_structures_v1_order_then_unknown_names(tmp_path):
    empty = np.zeros((4, 4, 4), bool)
    release = write_mini_release(tmp_path, {"zzz_custom": empty, "liver": empty, "spleen": empty, "aaa": empty})
    assert rel.default_structures(release, "s0000") == ["spleen", "liver", "aaa", "zzz_custom"]


def test_masks_off_the_ct_grid_are_an_error_naming_the_subject(tmp_path):
    mask = np.zeros((4, 4, 4), bool)
    release = write_mini_release(tmp_path / "release", {"liver": mask}, mask_affine=np.diag([1.0, 1.0, 1.0, 1.0]))
    with pytest.raises(GridMismatchError, match="s0000"):
        rel.release_to_nnunet_raw(release, tmp_path / "raw", 1, "Mini")


def test_missing_mask_and_bad_meta_are_errors(tmp_path):
    release = write_mini_release(tmp_path / "release", {"liver": np.zeros((4, 4, 4), bool)})
    with pytest.raises(FileNotFoundError, match="s0000.*spleen"):
        rel.release_to_nnunet_raw(release, tmp_path / "raw", 1, "Mini", structures=["liver", "spleen"])
    (release / "meta.csv").write_text("image_id;split\ns0000;holdout\n")
    with pytest.raises(ValueError, match="holdout"):
        rel.release_to_nnunet_raw(release, tmp_path / "raw", 1, "Mini")


def test_cases_are_stored_canonical_like_inference_sees_them():
    rng = np.random.default_rng(0)
    hu = rng.integers(-1000, 1000, (5, 6, 7)).astype(np.int16)
    labels = (hu > 500).astype(np.uint8)
    affine = np.diag([-0.8, -0.9, 2.0, 1.0])  # LPS, anisotropic
    ct = nib.Nifti1Image(hu, affine)
    canonical, canonical_labels = rel.canonical_case(ct, labels)
    assert nib.aff2axcodes(canonical.affine) == ("R", "A", "S")
    np.testing.assert_array_equal(np.asanyarray(canonical.dataobj), hu[::-1, ::-1, :])
    np.testing.assert_array_equal(canonical_labels, labels[::-1, ::-1, :])
    # the same voxel keeps its world position
    np.testing.assert_allclose(canonical.affine @ [0, 0, 0, 1], affine @ [4, 5, 0, 1])
    ras = nib.Nifti1Image(hu, np.diag([0.8, 0.9, 2.0, 1.0]))
    assert rel.canonical_case(ras, labels)[0] is ras


def test_release_written_in_parallel_is_identical(release, tmp_path):
    parallel = rel.write_phantom_release(
        tmp_path / "parallel", 6, seed=3, spacing=SPACING, val_fraction=0.2, test_fraction=0.1, processes=2
    )
    assert (parallel / "meta.csv").read_text() == (release / "meta.csv").read_text()
    subject = rel.release_subject_id(4)
    for name in ("ct.nii.gz", "segmentations/kidney_left.nii.gz", "segmentations/femur_right.nii.gz"):
        np.testing.assert_array_equal(read(parallel / subject / name), read(release / subject / name))
