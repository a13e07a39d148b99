"""measure_structures against an independent per-structure computation, on synthetic and real CT."""

import logging
import re
import subprocess
import sys

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from scipy import ndimage

from ctcohort import measure
from ctcohort.columns import EXCLUSION_REASONS, MEASURE_COLUMNS, SCAN_EXCLUSION_REASONS
from ctcohort.imaging import GridMismatchError, ImplausibleScanError, ScanChecks, ct_hounsfield, label_array
from ctcohort.measure import (
    LabelMapError,
    measure_files,
    measure_structures,
    read_measurements,
    write_measurements,
)
from ctcohort.structures import load_structure_table

SIX_NEIGHBOURS = ndimage.generate_binary_structure(3, 1)
HU_COLUMNS = ["hu_mean", "hu_median", "hu_std", "hu_mean_eroded"]


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
        rows.append(
            {
                "structure": name,
                "n_voxels": n,
                "raw_volume_ml": n * voxel_ml,
                "hu_mean": values.mean() if n else np.nan,
                "hu_median": np.median(values) if n else np.nan,
                "hu_std": values.std() if n else np.nan,
                "hu_mean_eroded": hu[inner].astype(float).mean() if inner.any() else np.nan,
                "touches_border": bool((mask & shell).any()),
            }
        )
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


@pytest.mark.parametrize("hu_dtype", [np.int16, np.int32, np.float32])  # integers: the joint histogram
@pytest.mark.parametrize("margin", [0, 3])
@pytest.mark.parametrize("slab_voxels", [measure.SLAB_VOXELS, 1, 2000])  # one slab; a row each; several rows
def test_matches_per_structure_computation(monkeypatch, hu_dtype, margin, slab_voxels):
    monkeypatch.setattr(measure, "SLAB_VOXELS", slab_voxels)
    hu, labels = random_scene(seed=3, hu_dtype=hu_dtype)
    table = small_table()
    got = measure_structures(hu, labels, 0.125, table, border_margin=margin, min_voxels=1)
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
    got = measure_structures(hu, labels, 1.0, small_table(1, 0), border_margin=0, min_voxels=1)
    assert got.at[0, "hu_median"] == 25.5


def test_min_voxels_defaults_to_the_configs_10():
    labels = np.zeros((6, 6, 6), np.uint8)
    labels[1:4, 1:4, 1] = 1  # 9 voxels
    labels[1:4, 1:4, 3] = 2
    labels[1, 1, 4] = 2  # 10 voxels
    hu = np.arange(labels.size, dtype=np.int16).reshape(labels.shape) - 1000
    got = measure_structures(hu, labels, 1.0, small_table(2, 0), border_margin=0)
    assert got["exclusion_reason"].tolist() == ["too_small", ""]


@pytest.mark.parametrize("histogram_bins", [measure.MAX_HISTOGRAM_BINS, 0])  # label x HU histogram; sorting
def test_medians_exact_when_hu_span_more_than_int16_holds(monkeypatch, histogram_bins):
    """Metal and extended-range scanners: int16 HU from -3000 to +31000 (a span of 34000 > 32767)."""
    monkeypatch.setattr(measure, "MAX_HISTOGRAM_BINS", histogram_bins)
    rng = np.random.default_rng(8)
    _, labels = random_scene(seed=8)
    hu = rng.integers(-1024, 31001, labels.shape).astype(np.int16)
    hu[rng.random(labels.shape) < 0.2] = -3000
    hu[rng.random(labels.shape) < 0.05] = 31000
    hu[labels == 3] = rng.choice([-3000, 30990, 31000], (labels == 3).sum())
    assert int(hu.max()) - int(hu.min()) > np.iinfo(np.int16).max
    table = small_table()
    got = measure_structures(hu, labels, 1.0, table, border_margin=0, min_voxels=1)
    for label, median in zip(table["label"], got["hu_median"]):
        mask = labels == label
        if mask.any():
            assert median == np.median(hu[mask].astype(np.int64)), label
        else:
            assert np.isnan(median)


def test_unknown_label_ids_fail_and_name_the_segmentation():
    hu, labels = random_scene(seed=1)
    table = small_table(5, 0)  # labels 6..12 are not in the table
    with pytest.raises(LabelMapError) as info:
        measure_structures(hu, labels, 1.0, table, border_margin=0, source="seg/sub-01.nii.gz")
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("seg/sub-01.nii.gz: 7 label id(s) not in the structure table (5 structures, ids 1-5)")
    counts = np.bincount(labels.ravel())
    assert f"6 ({counts[6]} voxels), 7 ({counts[7]} voxels)" in message
    assert "10 (" in message and "11 (" not in message and "and 2 more" in message
    assert "does not match the segmentation model" in message and "structures" in message


def test_one_stray_label_fails_too():
    hu, labels = random_scene(seed=1)
    labels[20, 20, 15] = 250
    with pytest.raises(LabelMapError, match=r"seg\.nii: 1 label id\(s\) .*: 250 \(1 voxels\);"):
        measure_structures(hu, labels, 1.0, small_table(), source="seg.nii")


def test_empty_segmentation_fails():
    hu, labels = random_scene(seed=1)
    with pytest.raises(LabelMapError, match="^seg.nii: the segmentation holds no labelled voxel"):
        measure_structures(hu, np.zeros_like(labels), 1.0, small_table(), source="seg.nii")


def nonfinite_scene():
    """A float32 scene with NaN/inf in four structures (one cut off, one too small) and NaN outside all."""
    hu, labels = random_scene(seed=6, hu_dtype=np.float32)
    labels[:3][labels[:3] == 1] = 0
    labels[0, 10:14, 10:13] = 1  # structure 1 touches the border
    labels[labels == 9] = 0
    labels[30, 30, 25:28] = 9  # structure 9: 3 voxels
    spoiled = {1: np.nan, 2: np.inf, 4: -np.inf, 9: np.nan}
    for label, value in spoiled.items():
        hu[tuple(np.argwhere(labels == label)[-1])] = value
    outside = np.flatnonzero((labels == 0).ravel())[::7]
    hu.ravel()[outside] = np.nan
    hu.ravel()[outside[:5]] = -np.inf
    return hu, labels, spoiled, outside.size


def test_nonfinite_voxels_exclude_the_hu_of_their_structure_only(caplog):
    hu, labels, spoiled, n_outside = nonfinite_scene()
    table = small_table()
    caplog.set_level(logging.WARNING)
    got = measure_structures(hu, labels, 0.5, table, border_margin=1, min_voxels=5, ct_source="ct/sub-01.nii.gz")
    with np.errstate(invalid="ignore"):  # the reference's statistics of inf
        want = per_structure_reference(hu, labels, 0.5, table, margin=1)
    reason = got.set_index("label")["exclusion_reason"]
    assert reason[1] == "hu_nonfinite", "cut off and non-finite: the reason that says the HU is unusable"
    assert got.at[0, "complete"] == False and np.isnan(got.at[0, "volume_ml"])  # noqa: E712 - cut off
    assert reason[2] == reason[4] == "hu_nonfinite"
    assert reason[9] == "too_small"
    for label in spoiled:
        assert got.loc[got["label"] == label, HU_COLUMNS].isna().all(axis=None), label
    for label in (2, 4):
        row = got.index[got["label"] == label][0]
        assert got.at[row, "volume_ml"] == want.at[row, "raw_volume_ml"], "the volume depends on the labels only"
        assert not want.at[row, "touches_border"]
    others = ~got["label"].isin(spoiled) & (want["n_voxels"] > 0)
    assert others.sum() >= 6
    for column in HU_COLUMNS:
        np.testing.assert_allclose(got.loc[others, column], want.loc[others, column], rtol=1e-9)
    assert f"{n_outside} non-finite (NaN/inf) voxels outside every structure are ignored" in caplog.text
    assert "ct/sub-01.nii.gz" in caplog.text
    numbers = got.select_dtypes("number").to_numpy(float)
    assert not np.isinf(numbers).any()


def test_nonfinite_voxels_outside_every_structure_change_no_number():
    hu, labels = random_scene(seed=6, hu_dtype=np.float32)
    table = small_table()
    want = measure_structures(hu, labels, 1.0, table)
    padded = hu.copy()
    padded[:4][labels[:4] == 0] = np.nan  # NaN padding outside the field of view
    padded[-1][labels[-1] == 0] = np.inf
    got = measure_structures(padded, labels, 1.0, table)
    pd.testing.assert_frame_equal(got, want)
    assert (got["exclusion_reason"] != "hu_nonfinite").all()


def test_huge_finite_values_are_not_taken_for_nonfinite(caplog):
    """Their float32 sum overflows to inf: the exact check must then find no non-finite voxel."""
    hu, labels = random_scene(seed=6, hu_dtype=np.float32)
    background = np.argwhere(labels == 0)
    for index in background[:4]:
        hu[tuple(index)] = 3e38
    with np.errstate(over="ignore"):
        assert not np.isfinite(hu.sum())
    caplog.set_level(logging.WARNING)
    got = measure_structures(hu, labels, 1.0, small_table())
    assert (got["exclusion_reason"] != "hu_nonfinite").all() and "non-finite" not in caplog.text
    pd.testing.assert_frame_equal(got, measure_structures(np.where(labels == 0, 0, hu), labels, 1.0, small_table()))


def test_exclusion_reasons_in_order_of_precedence():
    assert SCAN_EXCLUSION_REASONS == ("absent", "too_small", "hu_nonfinite", "cut_off")
    # the cohort's plausibility checks (qc.apply_plausibility) add two, implausible_hu before cut_off, and a
    # reviewer's exclusion (review.apply_review_decisions) overrides them all
    precedence = "absent too_small hu_nonfinite implausible_hu cut_off implausible_volume reviewer_excluded"
    assert EXCLUSION_REASONS == tuple(precedence.split())
    hu, labels, _, _ = nonfinite_scene()
    got = measure_structures(hu, labels, 1.0, small_table(), border_margin=1, min_voxels=5)
    assert set(got["exclusion_reason"]) - {""} == set(SCAN_EXCLUSION_REASONS)


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
    want = measure_structures(hu.astype(np.float64), labels, 0.8 * 0.9 * 2.5 / 1000, table, min_voxels=1)

    # CT stored as unsigned raw values with slope/intercept, as scanners write it
    raw = ((hu.astype(np.int32) + 1024) * 2).astype(np.uint16)
    ct_path = save_nifti(raw, affine, tmp_path / "ct.nii.gz", slope=0.5, inter=-1024)
    # labels as float64 (as TotalSegmentator writes them), flipped to an LPS-like grid
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    flip[:3, 3] = [(labels.shape[0] - 1), (labels.shape[1] - 1), 0]
    seg_path = save_nifti(labels[::-1, ::-1, :], affine @ flip, tmp_path / "seg.nii.gz", dtype=np.float64)
    got = measure_files(ct_path, seg_path, table, min_voxels=1)
    # affines are stored as float32 in NIfTI: voxel volumes agree to ~1e-8
    pd.testing.assert_frame_equal(got, want, check_exact=False, rtol=1e-6)


def test_label_map_on_another_grid_is_rejected(tmp_path):
    hu, labels = random_scene(seed=2)
    ct_path = save_nifti(hu, np.eye(4), tmp_path / "ct.nii.gz")
    seg_path = save_nifti(labels[:-1], np.eye(4), tmp_path / "seg.nii.gz")
    with pytest.raises(GridMismatchError, match="grid does not match") as info:
        measure_files(ct_path, seg_path, small_table())
    assert "\n" not in str(info.value) and str(info.value).startswith(str(seg_path))


def test_probability_map_is_not_a_label_map(tmp_path):
    img = nib.Nifti1Image(np.full((3, 3, 3), 0.4), np.eye(4))
    with pytest.raises(ValueError, match="non-integer"):
        label_array(img, "probabilities.nii.gz")


def test_unreadable_file_names_the_path(tmp_path):
    bad = tmp_path / "broken.nii.gz"
    bad.write_bytes(b"not a nifti")
    with pytest.raises(ValueError, match="broken.nii.gz"):
        measure_files(bad, bad, small_table())


def test_tsv_round_trip_keeps_nan_and_reasons(tmp_path):
    hu, labels, _, _ = nonfinite_scene()
    frame = measure_structures(hu, labels, 1.0, small_table(), border_margin=1, min_voxels=5)
    write_measurements(frame, tmp_path / "m.tsv")
    back = read_measurements(tmp_path / "m.tsv")
    pd.testing.assert_frame_equal(back, frame, check_dtype=False, check_exact=False, rtol=1e-9)
    text = (tmp_path / "m.tsv").read_text()
    assert "NaN" in text and "hu_nonfinite" in text and "inf" not in text


def test_infinite_values_are_never_written(tmp_path):
    hu, labels = random_scene(seed=4)
    frame = measure_structures(hu, labels, 1.0, small_table())
    frame.loc[3, "hu_std"] = -np.inf
    with pytest.raises(ValueError, match="refusing to write infinite values .*hu_std"):
        write_measurements(frame, tmp_path / "m.tsv")
    assert not (tmp_path / "m.tsv").exists()


def test_real_ct_and_its_104_class_segmentation(shared_data):
    """The paper's v1 model output on a real CT: float64 labels on disk, int32 CT, RAS, 3 mm."""
    folder = shared_data / "totalseg-example"
    ct = nib.load(folder / "example_ct.nii.gz")
    seg = nib.load(folder / "example_seg_v1.nii.gz")
    table = load_structure_table("total_v1")
    got = measure_files(folder / "example_ct.nii.gz", folder / "example_seg_v1.nii.gz", table)

    hu = ct.get_fdata()  # nibabel's own scaling, in float64: an independent path
    labels = np.rint(seg.get_fdata()).astype(int)
    voxel_ml = float(np.prod(ct.header.get_zooms()[:3])) / 1000
    want = per_structure_reference(hu, labels, voxel_ml, table, margin=3)

    present = want["n_voxels"] > 0
    assert present.sum() > 40, "the example holds many structures"
    np.testing.assert_array_equal(got["n_voxels"], want["n_voxels"])
    too_small = present & (want["n_voxels"] < 10)  # measure.min_voxels: 10, the default
    assert too_small.sum() == 2 and (got.loc[too_small, "exclusion_reason"] == "too_small").all()
    present &= ~too_small
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
    got = measure_files(
        folder / "example_ct_sm.nii.gz", folder / "example_seg.nii.gz", load_structure_table("total_v2")
    )
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


# Real CT made broken: each must fail with one line naming the file at fault, or exclude with a reason.


@pytest.fixture
def real_scan(shared_data):
    folder = shared_data / "totalseg-example"
    return folder / "example_ct.nii.gz", folder / "example_seg_v1.nii.gz", load_structure_table("total_v1")


def scan_error(error_type, ct_path, seg_path, table, **options) -> str:
    with pytest.raises(error_type) as info:
        measure_files(ct_path, seg_path, table, **options)
    message = str(info.value)
    assert "\n" not in message, "failures.tsv holds one line per scan"
    return message


def test_real_all_zero_ct_fails(real_scan, tmp_path):
    ct_path, seg_path, table = real_scan
    ct = nib.load(ct_path)
    zeros = save_nifti(np.zeros(ct.shape, np.int16), ct.affine, tmp_path / "zeros.nii.gz")
    message = scan_error(ImplausibleScanError, zeros, seg_path, table)
    assert message == f"{zeros}: not plausibly in HU: constant image (every finite voxel is 0)"


def test_real_ct_without_rescale_intercept_fails(real_scan, tmp_path):
    ct_path, seg_path, table = real_scan
    ct = nib.load(ct_path)
    raw = np.clip(ct_hounsfield(ct) + 1024, 0, 4095).astype(np.int16)  # scanner values, intercept not applied
    unscaled = save_nifti(raw, ct.affine, tmp_path / "raw.nii.gz")
    message = scan_error(ImplausibleScanError, unscaled, seg_path, table)
    assert message.startswith(f"{unscaled}: not plausibly in HU: lowest value 0 is above -500 HU (no air); ")
    assert "rescale intercept (-1024) not applied" in message and "measure.ct_checks.lowest_hu_at_most" in message
    # the same values with the intercept in the header measure as the original (where it was not clipped)
    scaled = save_nifti(raw, ct.affine, tmp_path / "scaled.nii.gz", slope=1, inter=-1024)
    clipped = np.clip(ct_hounsfield(ct), -1024, 3071)
    want = measure_structures(clipped, label_array(nib.load(seg_path)), 0.027, table)
    pd.testing.assert_frame_equal(measure_files(scaled, seg_path, table), want, check_exact=False, rtol=1e-6)
    # unclipped: padding below -1024 HU stays below 0 after the shift; fails all the same
    shifted = save_nifti(ct_hounsfield(ct) + 1024, ct.affine, tmp_path / "shifted.nii.gz")
    message = scan_error(ImplausibleScanError, shifted, seg_path, table)
    assert "lowest value -183 is above -500 HU (no air); was the rescale intercept (-1024) not applied?" in message
    # ... unless that check is disabled
    assert len(measure_files(shifted, seg_path, table, checks=ScanChecks(lowest_hu_at_most=None))) == 104


@pytest.mark.parametrize("seg_too", [False, True])
def test_real_ct_with_zooms_x1000_fails(real_scan, tmp_path, seg_too):
    ct_path, seg_path, table = real_scan
    ct, seg = nib.load(ct_path), nib.load(seg_path)
    scale = np.diag([1000.0, 1000.0, 1000.0, 1.0])
    ct_big = save_nifti(np.asanyarray(ct.dataobj), ct.affine @ scale, tmp_path / "ct.nii.gz")
    if seg_too:
        seg_path = save_nifti(np.asanyarray(seg.dataobj), seg.affine @ scale, tmp_path / "seg.nii.gz")
    message = scan_error(ImplausibleScanError, ct_big, seg_path, table)
    assert message == (
        f"{ct_big}: implausible voxel size 3000 x 3000 x 3000 mm: 3000 mm is above 15 mm "
        "(header zooms in the wrong unit?) (measure.ct_checks.max_spacing_mm)"
    )
    got = measure_files(ct_big, seg_path, table, checks=ScanChecks(max_spacing_mm=None)) if seg_too else None
    if got is not None:  # what it would have been: a kidney of ~1.9e8 ml
        assert got.set_index("structure").at["kidney_right", "volume_ml"] > 1e8


def test_real_ct_with_zero_affine_fails(real_scan, tmp_path):
    ct_path, seg_path, table = real_scan
    ct = nib.load(ct_path)
    header = ct.header.copy()
    header.set_sform(np.zeros((4, 4)), code="scanner")
    header.set_qform(None, code="unknown")
    broken = tmp_path / "ct.nii.gz"
    nib.save(nib.Nifti1Image(np.asanyarray(ct.dataobj), None, header), broken)
    assert not np.linalg.det(nib.load(broken).affine[:3, :3])
    for checks in (ScanChecks(), ScanChecks(min_spacing_mm=None, max_spacing_mm=None)):
        message = scan_error(ImplausibleScanError, broken, seg_path, table, checks=checks)
        assert message.startswith(f"{broken}: the header's affine is not invertible (voxel volume 0 mm3")


def test_real_float_ct_with_nonfinite_voxels(real_scan, tmp_path, caplog):
    """float32 copy: NaN/inf in kidney_right, gallbladder and liver (cut off); NaN padding outside all."""
    ct_path, seg_path, table = real_scan
    ct = nib.load(ct_path)
    labels = label_array(nib.load(seg_path))
    hu = ct_hounsfield(ct).astype(np.float32)
    spoiled = {"kidney_right": np.nan, "gallbladder": np.inf, "liver": -np.inf}
    label_of = dict(zip(table["name"], table["label"]))
    for name, value in spoiled.items():
        hu[tuple(np.argwhere(labels == label_of[name])[len(spoiled)])] = value
    padding = np.zeros(hu.shape, bool)
    padding[:, :, -4:] = labels[:, :, -4:] == 0
    hu[padding] = np.nan
    float_ct = save_nifti(hu, ct.affine, tmp_path / "float_ct.nii.gz")
    caplog.set_level(logging.WARNING)
    got = measure_files(float_ct, seg_path, table).set_index("structure")

    want = measure_files(ct_path, seg_path, table).set_index("structure")  # the unbroken scan
    reference = per_structure_reference(ct.get_fdata(), labels, 0.027, table, margin=3).set_index("structure")
    assert (got.loc[list(spoiled), "exclusion_reason"] == "hu_nonfinite").all()
    assert got.loc[list(spoiled), HU_COLUMNS].isna().all(axis=None)
    for name in ("kidney_right", "gallbladder"):  # complete: the volume is kept
        assert got.at[name, "volume_ml"] == pytest.approx(reference.at[name, "raw_volume_ml"], rel=1e-9)
        assert got.at[name, "volume_ml"] == want.at[name, "volume_ml"]
    assert want.at["liver", "exclusion_reason"] == "cut_off" and np.isnan(got.at["liver", "volume_ml"])
    assert got.at["liver", "complete"] == False  # noqa: E712 - nullable boolean
    others = got.index.difference(list(spoiled))
    pd.testing.assert_frame_equal(got.loc[others], want.loc[others])
    measured = others[reference.loc[others, "n_voxels"] >= 10]
    np.testing.assert_allclose(got.loc[measured, "hu_median"], reference.loc[measured, "hu_median"])
    assert f"{int(padding.sum())} non-finite (NaN/inf) voxels outside every structure are ignored" in caplog.text
    assert "3 non-finite (NaN/inf) voxels inside 3 structure(s)" in caplog.text
    write_measurements(got.reset_index()[MEASURE_COLUMNS], tmp_path / "m.tsv")
    fields = {field.lower() for line in (tmp_path / "m.tsv").read_text().splitlines() for field in line.split("\t")}
    assert "nan" in fields and not fields & {"inf", "-inf", "+inf", "infinity", "-infinity"}


def test_real_float_ct_all_nan_fails(real_scan, tmp_path):
    ct_path, seg_path, table = real_scan
    ct = nib.load(ct_path)
    nan_ct = save_nifti(np.full(ct.shape, np.nan, np.float32), ct.affine, tmp_path / "nan.nii.gz")
    message = scan_error(ImplausibleScanError, nan_ct, seg_path, table)
    assert message == f"{nan_ct}: not plausibly in HU: all {int(np.prod(ct.shape))} voxels are NaN or infinite"


def test_real_seg_with_an_unknown_label_fails(real_scan, tmp_path):
    ct_path, seg_path, table = real_scan
    seg = nib.load(seg_path)
    values = seg.get_fdata()
    values[60, 50, 50:53] = 250
    stray = save_nifti(values, seg.affine, tmp_path / "seg250.nii.gz")
    message = scan_error(LabelMapError, ct_path, stray, table)
    assert message.startswith(
        f"{stray}: 1 label id(s) not in the structure table (104 structures, ids 1-104): "
        "250 (3 voxels); the structure table probably does not match"
    )
    assert "config key structures" in message


def test_real_v2_segmentation_measured_with_the_v1_table_fails(shared_data):
    folder = shared_data / "totalseg-example"
    seg_path = folder / "example_seg.nii.gz"
    message = scan_error(LabelMapError, folder / "example_ct_sm.nii.gz", seg_path, load_structure_table("total_v1"))
    ids = np.unique(label_array(nib.load(seg_path)))
    unknown = ids[ids > 104]
    assert len(unknown) > 5
    assert message.startswith(f"{seg_path}: {len(unknown)} label id(s) not in the structure table")
    assert re.search(rf": {unknown[0]} \(\d+ voxels\), {unknown[1]} \(", message)
    assert f"and {len(unknown) - 5} more" in message and "TotalSegmentator v2 segmentation" in message


def test_real_empty_segmentation_fails(real_scan, tmp_path):
    ct_path, seg_path, table = real_scan
    seg = nib.load(seg_path)
    empty = save_nifti(np.zeros(seg.shape), seg.affine, tmp_path / "empty.nii.gz")
    message = scan_error(LabelMapError, ct_path, empty, table)
    assert message.startswith(f"{empty}: the segmentation holds no labelled voxel")


def test_real_ct_with_metal_has_exact_medians(real_scan, tmp_path):
    """Extended-range int16 CT: a third of femur_left at 31800 HU, air at -1207: a span above 32767."""
    ct_path, seg_path, table = real_scan
    ct = nib.load(ct_path)
    labels = label_array(nib.load(seg_path))
    hu = ct_hounsfield(ct).astype(np.int16)
    femur = np.argwhere(labels == dict(zip(table["name"], table["label"]))["femur_left"])
    hu[tuple(femur[: len(femur) // 3].T)] = 31800
    metal = save_nifti(hu, ct.affine, tmp_path / "metal.nii.gz")
    got = measure_files(metal, seg_path, table, min_voxels=1)
    for label, median in zip(table["label"], got["hu_median"]):
        mask = labels == label
        assert median == np.median(hu[mask]) if mask.any() else np.isnan(median), label
    assert got.set_index("structure").at["femur_left", "hu_median"] == 347


@pytest.mark.parametrize("order", ["C", "F"])
def test_histogram_and_sorting_give_the_same_numbers(monkeypatch, order):
    """Integer CTs: the joint histogram's numbers are the sorting path's (exact counts, sums and medians)."""
    hu, labels = random_scene(seed=11, shape=(37, 29, 23))
    hu, labels = np.asarray(hu, order=order), np.asarray(labels, order=order)
    table = small_table()
    histogram = measure_structures(hu, labels, 0.5, table, border_margin=2, min_voxels=1)
    monkeypatch.setattr(measure, "MAX_HISTOGRAM_BINS", 0)
    monkeypatch.setattr(measure, "SLAB_VOXELS", 3 * 29 * 23)
    sorting = measure_structures(hu, labels, 0.5, table, border_margin=2, min_voxels=1)
    exact = [c for c in MEASURE_COLUMNS if c != "hu_std"]
    pd.testing.assert_frame_equal(histogram[exact], sorting[exact], check_exact=True)
    np.testing.assert_allclose(histogram["hu_std"], sorting["hu_std"], rtol=1e-12)


def test_unknown_labels_fail_on_both_paths(monkeypatch):
    hu, labels = random_scene(seed=1)
    labels[0, 0, 0] = 200
    for bins in (measure.MAX_HISTOGRAM_BINS, 0):
        monkeypatch.setattr(measure, "MAX_HISTOGRAM_BINS", bins)
        with pytest.raises(LabelMapError, match="label id"):
            measure_structures(hu, labels, 1.0, small_table())


def test_scan_read_and_measured_from_files_equals_the_arrays(tmp_path):
    hu, labels = random_scene(seed=12)
    affine = np.diag([0.75, 0.5, 2.0, 1.0])  # exact in the header's float32
    ct_path = save_nifti(hu, affine, tmp_path / "ct.nii.gz")
    seg_path = save_nifti(labels, affine, tmp_path / "seg.nii.gz")
    scan = measure.read_scan(ct_path, seg_path)
    np.testing.assert_array_equal(scan.hu, hu)
    np.testing.assert_array_equal(scan.labels, labels)
    np.testing.assert_array_equal(scan.affine, affine)
    table = small_table()
    want = measure_structures(
        hu, labels, 0.75 * 0.5 * 2.0 / 1000, table, min_voxels=1, source=seg_path, ct_source=ct_path
    )
    pd.testing.assert_frame_equal(measure_files(ct_path, seg_path, table, min_voxels=1), want)
    pd.testing.assert_frame_equal(measure_files(ct_path, seg_path, lambda: table, min_voxels=1), want)


def test_errors_come_in_the_order_of_a_sequential_read(tmp_path):
    """The two files are read in two threads; the CT's errors still come before the label map's,
    and a structure table that cannot be loaded before either."""
    hu, labels = random_scene(seed=2)
    raw = save_nifti(hu.astype(np.int32) + 3000, np.eye(4), tmp_path / "raw.nii.gz")  # no air: not in HU
    other_grid = save_nifti(labels[:-1], np.eye(4), tmp_path / "seg.nii.gz")
    with pytest.raises(ImplausibleScanError, match="raw.nii.gz"):
        measure_files(raw, other_grid, small_table())
    good = save_nifti(hu, np.eye(4), tmp_path / "ct.nii.gz")
    with pytest.raises(GridMismatchError, match="seg.nii.gz"):
        measure_files(good, other_grid, small_table())

    def broken_table():
        raise ValueError("structure table broken.csv: no rows")

    with pytest.raises(ValueError, match="broken.csv"):
        measure_files(raw, other_grid, broken_table)


def test_measure_command_starts_without_the_heavy_modules(tmp_path):
    """Start-up is paid by every per-scan job: `ctcohort measure` imports neither scipy's image
    processing, matplotlib, torch, statsmodels nor the segmentation and training modules."""
    hu, labels = random_scene(seed=4)
    ct_path = save_nifti(hu, np.eye(4), tmp_path / "ct.nii.gz")
    seg_path = save_nifti(labels, np.eye(4), tmp_path / "seg.nii.gz")
    table_path = tmp_path / "table.csv"
    small_table().to_csv(table_path, index=False)
    code = (
        "import sys; from ctcohort.cli import main; "
        f"assert main(['measure', '--ct', {str(ct_path)!r}, '--seg', {str(seg_path)!r}, "
        f"'--structures', {str(table_path)!r}, '--min-voxels', '1', '-o', {str(tmp_path / 'm.tsv')!r}]) == 0; "
        "print(' '.join(sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    modules = set(result.stdout.split())
    heavy = {
        "scipy.ndimage",
        "matplotlib",
        "torch",
        "statsmodels",
        "nnunetv2",
        "ctcohort.phantom",
        "ctcohort.train",
        "ctcohort.segment",
        "ctcohort.release",
    }
    assert not heavy & modules
    assert len(read_measurements(tmp_path / "m.tsv")) == len(small_table())
