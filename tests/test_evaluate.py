"""Dice, NSD and bootstrap summaries against independent per-structure computations, on synthetic and real maps."""

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from scipy import ndimage

from ctcohort import evaluate
from ctcohort.evaluate import METRIC_COLUMNS, SUMMARY_COLUMNS, evaluate_scan, plot_dice, summarize, surface_metrics
from ctcohort.imaging import GridMismatchError
from ctcohort.structures import load_structure_table

SIX_NEIGHBOURS = ndimage.generate_binary_structure(3, 1)


def table_of(n_labels, group="organ"):
    return pd.DataFrame({"label": range(1, n_labels + 1), "name": [f"s{i}" for i in range(1, n_labels + 1)],
                         "group": group})


def reference_metrics(pred, ref, spacing, table, tolerance):
    """The slow, obvious computation: full-volume boolean masks, erosion and distance transforms per structure."""
    rows = []
    for label in table["label"]:
        p, r = pred == label, ref == label
        n_p, n_r = int(p.sum()), int(r.sum())
        if n_p == 0 and n_r == 0:
            rows.append((np.nan, np.nan))
            continue
        dice = 2.0 * (p & r).sum() / (n_p + n_r)
        if n_p == 0 or n_r == 0:
            rows.append((dice, 0.0))
            continue
        p_surf = p & ~ndimage.binary_erosion(p, SIX_NEIGHBOURS, border_value=0)
        r_surf = r & ~ndimage.binary_erosion(r, SIX_NEIGHBOURS, border_value=0)
        to_r = ndimage.distance_transform_edt(~r_surf, sampling=spacing)
        to_p = ndimage.distance_transform_edt(~p_surf, sampling=spacing)
        hits = (to_r[p_surf] <= tolerance).sum() + (to_p[r_surf] <= tolerance).sum()
        rows.append((dice, hits / (p_surf.sum() + r_surf.sum())))
    return pd.DataFrame(rows, columns=["dice", "nsd"])


def blobs(seed, shape=(36, 32, 28), n_labels=8, jitter=0):
    """Ellipsoids at random places; ``jitter`` moves each centre and radius a little (a 'prediction')."""
    rng = np.random.default_rng(seed)
    noise = np.random.default_rng(seed + 1000)  # its own stream: the same blobs with or without jitter
    labels = np.zeros(shape, np.uint8)
    grid = np.indices(shape).transpose(1, 2, 3, 0)
    for label in range(1, n_labels + 1):
        centre = rng.uniform(0, shape)
        radius = rng.uniform(2, 8, 3)
        if jitter:
            centre = centre + noise.normal(0, jitter, 3)
            radius = radius * noise.uniform(0.8, 1.2, 3)
        labels[(((grid - centre) / radius) ** 2).sum(-1) <= 1] = label
    return labels


def sphere(shape, centre_mm, radius_mm, spacing):
    grid = np.indices(shape).transpose(1, 2, 3, 0) * np.asarray(spacing, float)
    return ((((grid - centre_mm) ** 2).sum(-1)) <= radius_mm**2).astype(np.uint8)


def test_dice_matches_per_structure_boolean_computation_on_random_label_maps():
    rng = np.random.default_rng(0)
    pred = rng.integers(0, 7, (20, 18, 16)).astype(np.uint8)  # 6 only in the prediction
    ref = rng.integers(0, 6, (20, 18, 16)).astype(np.uint16)
    table = table_of(7)  # 7 in neither
    got = surface_metrics(pred, ref, (1.0, 1.0, 1.0), table)
    assert list(got.columns) == METRIC_COLUMNS
    for i, label in enumerate(table["label"]):
        p, r = pred == label, ref == label
        assert got.at[i, "n_pred"] == p.sum() and got.at[i, "n_ref"] == r.sum()
        if p.any() or r.any():
            assert got.at[i, "dice"] == pytest.approx(2 * (p & r).sum() / (p.sum() + r.sum()), rel=1e-12)
    assert got.at[5, "dice"] == 0 and got.at[5, "nsd"] == 0
    assert np.isnan(got.at[6, "dice"]) and np.isnan(got.at[6, "nsd"])


@pytest.mark.parametrize("spacing,tolerance", [((1.0, 1.0, 1.0), 3.0), ((0.7, 1.3, 3.0), 2.0), ((2.5, 0.8, 1.1), 1.0)])
def test_nsd_matches_full_volume_computation(spacing, tolerance):
    ref = blobs(seed=1)
    pred = blobs(seed=1, jitter=2.5)
    table = table_of(9)
    got = surface_metrics(pred, ref, spacing, table, tolerance_mm=tolerance)
    want = reference_metrics(pred, ref, spacing, table, tolerance)
    np.testing.assert_allclose(got["dice"], want["dice"], rtol=1e-12)
    np.testing.assert_allclose(got["nsd"], want["nsd"], rtol=1e-12)
    assert ((got["nsd"] > 0) & (got["nsd"] < 1)).sum() >= 3, "the jitter must make a difference"


def test_structures_cut_by_the_image_border_have_their_border_as_surface():
    ref = np.zeros((10, 10, 10), np.uint8)
    ref[:4, 2:8, 2:8] = 1  # touches the face x = 0
    pred = ref.copy()
    pred[:5, 2:8, 2:8] = 1  # one 4 mm slice longer
    got = surface_metrics(pred, ref, (4.0, 1.0, 1.0), table_of(1), tolerance_mm=3.0)
    want = reference_metrics(pred, ref, (4.0, 1.0, 1.0), table_of(1), 3.0)
    assert got.at[0, "nsd"] == pytest.approx(want.at[0, "nsd"], rel=1e-12)
    assert got.at[0, "nsd"] < 1


def test_identical_maps_score_one():
    labels = blobs(seed=2)
    got = surface_metrics(labels, labels.copy(), (0.8, 0.8, 2.0), table_of(8))
    present = got["n_ref"] > 0
    assert present.sum() >= 6
    assert (got.loc[present, "dice"] == 1).all() and (got.loc[present, "nsd"] == 1).all()


def test_sphere_shifted_by_2_mm():
    shape, spacing = (40, 40, 40), (1.0, 1.0, 1.0)
    ref = sphere(shape, (20, 20, 20), 10, spacing)
    pred = sphere(shape, (22, 20, 20), 10, spacing)
    assert not np.array_equal(pred, ref)
    table = table_of(1)
    at_3 = surface_metrics(pred, ref, spacing, table, tolerance_mm=3.0)
    at_1 = surface_metrics(pred, ref, spacing, table, tolerance_mm=1.0)
    assert at_3.at[0, "nsd"] == 1.0
    assert at_1.at[0, "nsd"] < 1.0
    assert 0 < at_3.at[0, "dice"] < 1 and at_1.at[0, "dice"] == at_3.at[0, "dice"]


def test_anisotropic_spacing_is_respected():
    spacing = (1.0, 1.0, 5.0)
    ref = sphere((32, 32, 12), (16, 16, 30), 12, spacing)
    along_thick = np.roll(ref, 1, axis=2)  # 5 mm
    along_thin = np.roll(ref, 1, axis=0)  # 1 mm
    table = table_of(1)
    assert surface_metrics(along_thick, ref, spacing, table).at[0, "nsd"] < 1
    assert surface_metrics(along_thin, ref, spacing, table).at[0, "nsd"] == 1
    # the same voxel shift on an isotropic grid is within tolerance
    assert surface_metrics(along_thick, ref, (1.0, 1.0, 1.0), table).at[0, "nsd"] == 1


def test_empty_conventions():
    empty = np.zeros((8, 8, 8), np.uint8)
    cube = empty.copy()
    cube[2:5, 2:5, 2:5] = 1
    table = table_of(2)
    both_empty = surface_metrics(empty, empty, (1, 1, 1), table)
    assert both_empty[["dice", "nsd"]].isna().all().all()
    assert (both_empty[["n_pred", "n_ref"]] == 0).all().all()
    for pred, ref in ((cube, empty), (empty, cube)):
        got = surface_metrics(pred, ref, (1, 1, 1), table)
        assert got.at[0, "dice"] == 0 and got.at[0, "nsd"] == 0
        assert (got.at[0, "n_pred"], got.at[0, "n_ref"]) == (pred.sum(), ref.sum())
        assert np.isnan(got.at[1, "dice"]) and np.isnan(got.at[1, "nsd"])


def test_large_label_ids_use_plain_bincounts(monkeypatch):
    ref = blobs(seed=4)
    pred = blobs(seed=4, jitter=1.0)
    table = table_of(8)
    joint = surface_metrics(pred, ref, (1.0, 1.5, 2.0), table)
    monkeypatch.setattr(evaluate, "MAX_JOINT_BINS", 0)
    plain = surface_metrics(pred, ref, (1.0, 1.5, 2.0), table)
    pd.testing.assert_frame_equal(plain, joint)


def test_bad_inputs_are_rejected():
    labels = np.zeros((4, 4, 4), np.uint8)
    with pytest.raises(ValueError, match="shape"):
        surface_metrics(labels, labels[:3], (1, 1, 1), table_of(1))
    with pytest.raises(ValueError, match="spacing"):
        surface_metrics(labels, labels, (1, 1), table_of(1))
    with pytest.raises(TypeError, match="integer"):
        surface_metrics(labels.astype(float), labels, (1, 1, 1), table_of(1))


def save_figure(array, affine, path, dtype=None):
    nib.save(nib.Nifti1Image(array if dtype is None else array.astype(dtype), affine), path)
    return path


def test_evaluate_scan_reads_float_reference_in_another_orientation(tmp_path):
    ref = blobs(seed=5)
    pred = blobs(seed=5, jitter=1.2)
    affine = np.diag([0.8, 1.5, 3.0, 1.0])
    affine[:3, 3] = (-30, 12, 40)
    table = table_of(8)
    want = surface_metrics(pred, ref, (0.8, 1.5, 3.0), table)

    pred_path = save_figure(pred, affine, tmp_path / "pred.nii.gz")
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])  # LPS-like grid of the same voxels
    flip[:3, 3] = [ref.shape[0] - 1, ref.shape[1] - 1, 0]
    ref_path = save_figure(ref[::-1, ::-1, :], affine @ flip, tmp_path / "ref.nii.gz", dtype=np.float64)
    assert nib.aff2axcodes(nib.load(ref_path).affine) == ("L", "P", "S")
    got = evaluate_scan(pred_path, ref_path, table)
    pd.testing.assert_frame_equal(got, want)

    other_path = save_figure(ref[:-1], affine, tmp_path / "other.nii.gz")
    with pytest.raises(GridMismatchError):
        evaluate_scan(pred_path, other_path, table)


def per_scan_frame(values_by_structure):
    rows = []
    for structure, (group, dice, nsd) in values_by_structure.items():
        for scan, (d, s) in enumerate(zip(dice, nsd)):
            rows.append({"scan": f"scan{scan}", "structure": structure, "group": group, "dice": d, "nsd": s})
    return pd.DataFrame(rows)


def test_summarize_bootstrap_ci():
    rng = np.random.default_rng(11)
    dice = rng.uniform(0.6, 0.95, 30)
    nsd = rng.uniform(0.7, 1.0, 30)
    dice[[3, 17]] = np.nan  # absent from both maps in two scans
    nsd[[3, 17]] = np.nan
    frame = per_scan_frame({"liver": ("organ", dice, nsd), "femur_left": ("bone", dice[::-1] * 0.9, nsd[::-1])})
    got = summarize(frame, n_resamples=2000, seed=7)
    assert list(got.columns) == SUMMARY_COLUMNS
    assert list(got["structure"]) == ["liver", "femur_left"]
    assert list(got["group"]) == ["organ", "bone"]
    assert (got["n"] == 28).all()
    row = got.iloc[0]
    for metric, values in (("dice", dice), ("nsd", nsd)):
        finite = values[~np.isnan(values)]
        assert row[f"{metric}_mean"] == pytest.approx(finite.mean(), rel=1e-12)
        assert row[f"{metric}_ci_low"] < row[f"{metric}_mean"] < row[f"{metric}_ci_high"]
        # the same bootstrap, recomputed by hand
        draws = np.random.default_rng(7).integers(0, len(finite), size=(2000, len(finite)))
        means = finite[draws].mean(axis=1)
        assert row[f"{metric}_ci_low"] == pytest.approx(np.percentile(means, 2.5), abs=1e-12)
        assert row[f"{metric}_ci_high"] == pytest.approx(np.percentile(means, 97.5), abs=1e-12)
        # and it is a sensible CI: close to the normal approximation
        half = 1.96 * finite.std(ddof=1) / np.sqrt(len(finite))
        assert row[f"{metric}_ci_high"] - row[f"{metric}_ci_low"] == pytest.approx(2 * half, rel=0.2)
    wider = summarize(frame, n_resamples=2000, seed=7, level=0.99).iloc[0]
    assert wider["dice_ci_low"] < row["dice_ci_low"] and wider["dice_ci_high"] > row["dice_ci_high"]


def test_summarize_degenerate_small_and_empty_inputs():
    frame = per_scan_frame({
        "same": ("organ", [0.8] * 6, [1.0] * 6),
        "one": ("vessel", [0.5, np.nan, np.nan], [0.4, np.nan, np.nan]),
        "none": ("muscle", [np.nan] * 3, [np.nan] * 3),
    })
    got = summarize(frame, n_resamples=500).set_index("structure")
    assert got.loc["same", "n"] == 6
    for column in ("dice_mean", "dice_ci_low", "dice_ci_high"):
        assert got.loc["same", column] == pytest.approx(0.8, abs=1e-12)
    assert got.loc["same", "nsd_ci_low"] == got.loc["same", "nsd_ci_high"] == 1.0
    assert got.loc["one", "n"] == 1 and got.loc["one", "dice_mean"] == 0.5
    assert got.loc["one", ["dice_ci_low", "dice_ci_high", "nsd_ci_low", "nsd_ci_high"]].isna().all()
    assert got.loc["none", "n"] == 0
    assert got.loc["none", ["dice_mean", "nsd_mean", "dice_ci_low"]].isna().all()


def test_plot_dice_writes_png_and_svg(tmp_path):
    frame = per_scan_frame({
        "liver": ("organ", [0.9, 0.95, 0.92], [0.95, 0.97, 0.96]),
        "aorta": ("vessel", [0.8, 0.85, 0.7], [0.9, 0.9, 0.8]),
        "none": ("bone", [np.nan] * 3, [np.nan] * 3),
    })
    outputs = [tmp_path / "dice.png", tmp_path / "dice.svg"]
    plot_dice(summarize(frame, n_resamples=200), outputs)
    assert outputs[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    svg = outputs[1].read_text()
    assert "<svg" in svg and "liver" in svg and "aorta" in svg


def test_real_fast_model_against_full_resolution_model(shared_data):
    """TotalSegmentator v1 fast (3 mm) output against the v1 model's output, float64 on disk, 104 classes."""
    folder = shared_data / "totalseg-example"
    table = load_structure_table("total_v1")
    got = evaluate_scan(folder / "example_seg_fast_v1.nii.gz", folder / "example_seg_v1.nii.gz", table)
    assert len(got) == 104
    pred = np.asarray(nib.load(folder / "example_seg_fast_v1.nii.gz").dataobj)
    ref = np.rint(nib.load(folder / "example_seg_v1.nii.gz").get_fdata()).astype(int)
    np.testing.assert_array_equal(got["n_pred"], [(pred == k).sum() for k in table["label"]])
    np.testing.assert_array_equal(got["n_ref"], [(ref == k).sum() for k in table["label"]])
    both = (got["n_pred"] > 0) & (got["n_ref"] > 0)
    assert both.sum() > 40
    evaluable = got["dice"].notna()
    assert got.loc[evaluable, "dice"].between(0, 1).all() and got.loc[evaluable, "nsd"].between(0, 1).all()
    assert 0.5 < got.loc[both, "dice"].mean() < 0.99
    # at 3 mm voxels a 3 mm tolerance forgives one-voxel boundary disagreements: NSD above Dice on average
    assert got.loc[both, "nsd"].mean() > got.loc[both, "dice"].mean()
