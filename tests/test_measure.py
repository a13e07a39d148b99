"""measure_structures against an independent per-structure computation, on synthetic and real CT."""

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from scipy import ndimage

from ctcohort.imaging import GridMismatchError, ct_hounsfield, label_array
from ctcohort.measure import measure_scan, measure_structures, read_measurements, write_measurements
from ctcohort.structures import load_structure_table

SIX_NEIGHBOURS = ndimage.generate_binary_structure(3, 1)


def per_structure_reference(hu, labels, voxel_ml, table, margin):
    """The slow, obvious computation: one boolean mask per structure."""
    rows = []
    for label, name in zip(table["label"], table["name"]):
        mask = labels == label
        n = int(mask.sum())
        values = hu[mask].astype(float)
        inner = ndimage.binary_erosion(mask, SIX_NEIGHBOURS, border_value=0)
        shell = np.zeros_like(mask)
        if margin:
            shell[:] = True
            shell[margin:-margin, margin:-margin, margin:-margin] = False
        rows.append({
            "structure": name, "n_voxels": n, "raw_volume_ml": n * voxel_ml,
            "hu_mean": values.mean() if n else np.nan,
            "hu_median": np.median(values) if n else np.nan,
            "hu_std": values.std() if n else np.nan,
            "hu_mean_eroded": hu[inner].astype(float).mean() if inner.any() else np.nan,
            "touches_border": bool((mask & shell).any()),
        })
    return pd.DataFrame(rows)


def random_scene(seed=0, shape=(40, 36, 30), n_labels=12, hu_dtype=np.int16):
    rng = np.random.default_rng(seed)
    labels = np.zeros(shape, np.uint8)
    grid = np.indices(shape).transpose(1, 2, 3, 0)
    for label in range(1, n_labels + 1):
        centre = rng.uniform(0, shape)
        radius = rng.uniform(2, 7, 3)
        labels[(((grid - centre) / radius) ** 2).sum(-1) <= 1] = label
    hu = rng.normal(0, 200, shape) + labels * 37.0
    return hu.astype(hu_dtype), labels


def small_table(n_labels=12, extra_absent=2):
    names = [f"s{i}" for i in range(1, n_labels + extra_absent + 1)]
    return pd.DataFrame({"label": range(1, len(names) + 1), "name": names, "group": "organ"})


@pytest.mark.parametrize("hu_dtype", [np.int16, np.int32, np.float32])
@pytest.mark.parametrize("margin", [0, 3])
def test_matches_per_structure_computation(hu_dtype, margin):
    hu, labels = random_scene(seed=3, hu_dtype=hu_dtype)
    table = small_table()
    got = measure_structures(hu, labels, 0.125, table, border_margin=margin)
    want = per_structure_reference(hu, labels, 0.125, table, margin)
    assert list(got["structure"]) == list(want["structure"])
    np.testing.assert_array_equal(got["n_voxels"], want["n_voxels"])
    present = want["n_voxels"] > 0
    for column in ("hu_mean", "hu_median", "hu_std", "hu_mean_eroded"):
        np.testing.assert_allclose(got.loc[present, column], want.loc[present, column], rtol=1e-9, atol=1e-6)
    complete = present & ~want["touches_border"]
    np.testing.assert_allclose(got.loc[complete, "volume_ml"], want.loc[complete, "raw_volume_ml"])
    assert (got.loc[~present, "exclusion_reason"] == "absent").all()
    assert (got.loc[present & want["touches_border"], "exclusion_reason"] == "cut_off").all()
    assert got.loc[~complete, "volume_ml"].isna().all(), "excluded volumes must be NaN, never 0"
    assert got.loc[~present, "hu_mean"].isna().all()
    assert got.loc[present & want["touches_border"], "hu_mean"].notna().all(), "cut-off keeps its HU"
    assert (got.loc[present, "complete"] == ~want.loc[present, "touches_border"]).all()
    assert got.loc[~present, "complete"].isna().all()


def test_too_small_structures_are_excluded_with_nan():
    hu, labels = random_scene(seed=5)
    table = small_table()
    counts = np.bincount(labels.ravel(), minlength=15)
    threshold = int(np.median(counts[1:13][counts[1:13] > 0]))
    got = measure_structures(hu, labels, 1.0, table, border_margin=0, min_voxels=threshold)
    small = (got["n_voxels"] > 0) & (got["n_voxels"] < threshold)
    assert small.any()
    assert (got.loc[small, "exclusion_reason"] == "too_small").all()
    assert got.loc[small, ["volume_ml", "hu_mean", "hu_median"]].isna().all().all()


def test_median_of_even_count_is_mean_of_middle_values():
    labels = np.zeros((4, 4, 4), np.uint8)
    labels[1:3, 1:3, 1] = 1  # four voxels
    hu = np.zeros((4, 4, 4), np.int16)
    hu[1:3, 1:3, 1] = [[10, 20], [31, 1000]]
    got = measure_structures(hu, labels, 1.0, small_table(1, 0), border_margin=0)
    assert got.at[0, "hu_median"] == 25.5


def test_unknown_labels_are_ignored_and_logged(caplog):
    hu, labels = random_scene(seed=1)
    table = small_table(5, 0)  # labels 6.. are not in the table
    got = measure_structures(hu, labels, 1.0, table, border_margin=0)
    assert len(got) == 5
    assert "not in the structure table" in caplog.text


def save_nifti(array, affine, path, dtype=None, slope=None, inter=None):
    img = nib.Nifti1Image(array if dtype is None else array.astype(dtype), affine)
    if slope is not None:
        img.header.set_slope_inter(slope, inter)
    nib.save(img, path)
    return path


def test_scan_files_with_scaling_float_labels_and_other_orientation(tmp_path):
    hu, labels = random_scene(seed=7)
    affine = np.diag([0.8, 0.9, 2.5, 1.0])
    affine[:3, 3] = (-10, 20, 5)
    table = small_table()
    want = measure_structures(hu.astype(np.float64), labels, 0.8 * 0.9 * 2.5 / 1000, table)

    # CT stored as unsigned raw values with slope/intercept, as scanners write it
    raw = ((hu.astype(np.int32) + 1024) * 2).astype(np.uint16)
    ct_path = save_nifti(raw, affine, tmp_path / "ct.nii.gz", slope=0.5, inter=-1024)
    # labels as float64 (as TotalSegmentator writes them), flipped to an LPS-like grid
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    flip[:3, 3] = [(labels.shape[0] - 1), (labels.shape[1] - 1), 0]
    seg_path = save_nifti(labels[::-1, ::-1, :], affine @ flip, tmp_path / "seg.nii.gz", dtype=np.float64)
    got = measure_scan(ct_path, seg_path, table)
    # affines are stored as float32 in NIfTI: voxel volumes agree to ~1e-8
    pd.testing.assert_frame_equal(got, want, check_exact=False, rtol=1e-6)


def test_label_map_on_another_grid_is_rejected(tmp_path):
    hu, labels = random_scene(seed=2)
    ct_path = save_nifti(hu, np.eye(4), tmp_path / "ct.nii.gz")
    seg_path = save_nifti(labels[:-1], np.eye(4), tmp_path / "seg.nii.gz")
    with pytest.raises(GridMismatchError, match="grid does not match"):
        measure_scan(ct_path, seg_path, small_table())


def test_probability_map_is_not_a_label_map(tmp_path):
    img = nib.Nifti1Image(np.full((3, 3, 3), 0.4), np.eye(4))
    with pytest.raises(ValueError, match="non-integer"):
        label_array(img, "probabilities.nii.gz")


def test_unreadable_file_names_the_path(tmp_path):
    bad = tmp_path / "broken.nii.gz"
    bad.write_bytes(b"not a nifti")
    with pytest.raises(ValueError, match="broken.nii.gz"):
        measure_scan(bad, bad, small_table())


def test_tsv_round_trip_keeps_nan_and_reasons(tmp_path):
    hu, labels = random_scene(seed=4)
    frame = measure_structures(hu, labels, 1.0, small_table())
    write_measurements(frame, tmp_path / "m.tsv")
    back = read_measurements(tmp_path / "m.tsv")
    pd.testing.assert_frame_equal(back, frame, check_dtype=False, check_exact=False, rtol=1e-9)
    assert "NaN" in (tmp_path / "m.tsv").read_text()


def test_real_ct_and_its_104_class_segmentation(shared_data):
    """The paper's v1 model output on a real CT: float64 labels on disk, int32 CT, RAS, 3 mm."""
    folder = shared_data / "totalseg-example"
    ct = nib.load(folder / "example_ct.nii.gz")
    seg = nib.load(folder / "example_seg_v1.nii.gz")
    table = load_structure_table("total_v1")
    got = measure_scan(folder / "example_ct.nii.gz", folder / "example_seg_v1.nii.gz", table)

    hu = ct.get_fdata()  # nibabel's own scaling, in float64: an independent path
    labels = np.rint(seg.get_fdata()).astype(int)
    voxel_ml = float(np.prod(ct.header.get_zooms()[:3])) / 1000
    want = per_structure_reference(hu, labels, voxel_ml, table, margin=3)

    present = want["n_voxels"] > 0
    assert present.sum() > 40, "the example holds many structures"
    np.testing.assert_array_equal(got["n_voxels"], want["n_voxels"])
    assert np.max(np.abs(got.loc[present, "hu_mean"] - want.loc[present, "hu_mean"])) < 0.01
    np.testing.assert_allclose(got.loc[present, "hu_median"], want.loc[present, "hu_median"])
    complete = present & ~want["touches_border"]
    assert complete.sum() > 10
    np.testing.assert_allclose(got.loc[complete, "volume_ml"], want.loc[complete, "raw_volume_ml"], rtol=1e-12)
    cut = present & want["touches_border"]
    assert cut.sum() > 10, "the example is cropped: many structures touch its border"
    assert (got.loc[cut, "exclusion_reason"] == "cut_off").all()
    assert got.loc[cut, "volume_ml"].isna().all()
    assert (got.loc[cut, "complete"] == False).all()  # noqa: E712 - nullable boolean


def test_real_ct_int32_is_read_as_integer_hu(shared_data):
    ct = nib.load(shared_data / "totalseg-example" / "example_ct.nii.gz")
    hu = ct_hounsfield(ct)
    assert np.issubdtype(hu.dtype, np.integer)
    np.testing.assert_array_equal(hu, ct.get_fdata())


def test_real_v2_segmentation_with_v2_table(shared_data):
    folder = shared_data / "totalseg-example"
    got = measure_scan(folder / "example_ct_sm.nii.gz", folder / "example_seg.nii.gz", load_structure_table("total_v2"))
    assert len(got) == 117
    assert (got["n_voxels"] > 0).sum() > 10
    assert set(got["group"]) <= {"organ", "bone", "muscle", "vessel"}


def test_memory_order_of_the_arrays_does_not_matter():
    hu, labels = random_scene(seed=9)
    table = small_table()
    want = measure_structures(np.ascontiguousarray(hu), np.ascontiguousarray(labels), 1.0, table)
    for hu_order, label_order in (("F", "F"), ("F", "C"), ("C", "F")):
        got = measure_structures(np.asarray(hu, order=hu_order), np.asarray(labels, order=label_order), 1.0, table)
        pd.testing.assert_frame_equal(got, want)
