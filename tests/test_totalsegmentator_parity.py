"""ctcohort's segmentation.resampling: totalsegmentator against TotalSegmentator's own inference code
(``totalsegmentator.nnunet.nnUNet_predict_image`` of the pinned version, run by tests/totalsegmentator_driver.py)
on the same release-shaped weights and scan; and the steps of ``ctcohort.totalseg_geometry`` against scipy."""

import os

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from ctcohort import totalseg_geometry

torch = pytest.importorskip("torch")


@pytest.mark.parametrize(
    "shape, zoom",
    [((37, 41, 23), (0.8 / 1.5, 0.8 / 1.5, 2.5 / 1.5)), ((20, 30, 10), (2.0, 1.3, 0.5)), ((7, 9, 11), (3.0, 2.0, 1.0))],
)
def test_zooms_equal_scipys(shape, zoom):
    rng = np.random.default_rng(0)
    hu = rng.integers(-1000, 1500, size=shape).astype(np.float64)
    expected = ndimage.zoom(hu, zoom, order=1, mode="nearest")
    ours = totalseg_geometry.zoom_linear(torch.from_numpy(hu), expected.shape, max_voxels=500).numpy()
    np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-9)
    # TotalSegmentator's int32 cast: equal but where a value within rounding of an integer lands on its other side
    differ = np.trunc(ours) != expected.astype(np.int32)
    assert differ.mean() <= 1e-3 and np.abs(np.trunc(ours) - expected.astype(np.int32)).max() <= 1
    labels = rng.integers(0, 7, size=shape).astype(np.uint8)
    expected = ndimage.zoom(labels, zoom, order=0, mode="nearest")
    np.testing.assert_array_equal(
        totalseg_geometry.zoom_nearest(torch.from_numpy(labels), expected.shape).numpy(), expected
    )
    spacing = 1.5 * np.asarray(zoom)
    assert totalseg_geometry.resampled_shape(shape, spacing, [1.5] * 3) == ndimage.zoom(hu, zoom, order=0).shape


def test_slabs_cover_the_image_as_totalsegmentator_splits_it():
    depth = 1000
    slabs = totalseg_geometry.slabs(depth, 512 * 512 * 1000, multi_part=True)
    assert len(slabs) == 3 and totalseg_geometry.slabs(depth, 512 * 512 * 1000, multi_part=False)[0][0] == slice(
        0, depth
    )
    covered = np.concatenate([np.arange(depth)[destination] for _, _, destination in slabs])
    np.testing.assert_array_equal(covered, np.arange(depth))
    for source, kept, destination in slabs:  # the kept rows of each slab are the rows they are written to
        np.testing.assert_array_equal(np.arange(depth)[source][kept], np.arange(depth)[destination])
    assert slabs[1][0] == slice(314, 686)  # TotalSegmentator's: third + 1 - margin to 2 * third + margin


# TotalSegmentator's own run: a process of its own and nnU-Net's worker processes (25-50 s on 2 cores)
@pytest.mark.slow
def test_parity_mode_gives_totalsegmentators_labels(tmp_path):
    """TotalSegmentator's code and ctcohort's parity mode segment a scan stored in LPS at a spacing far from
    the model's (3 mm), with a border of zeros, with a release-shaped total_fast model: every structure's
    Dice >= 0.999. The default mode differs (that the comparison bites)."""
    pytest.importorskip("nnunetv2")
    from totalseg_models import (
        RELEASE_TRAINERS,
        totalsegmentator_environment,
        totalsegmentator_labels,
        totalsegmentator_problem,
        write_release,
    )

    from ctcohort.segment import SegmentationSettings, Segmenter
    from ctcohort.structures import load_structure_table

    weights = write_release(
        tmp_path / "weights", (297,), settings={297: {"active_labels": [0, 5, 10, 20]}}, patch=(16, 16, 16)
    )
    env = totalsegmentator_environment(weights, tmp_path / "home")
    problem = totalsegmentator_problem(env)
    if problem:
        if os.environ.get("CI"):
            pytest.fail(problem + "; CI installs it (.ci/run)")
        pytest.skip(problem)
    ct_path = tmp_path / "ct.nii.gz"
    data = ndimage.gaussian_filter(np.random.default_rng(0).normal(0.0, 2400.0, (41, 37, 29)), 1.5)
    data = np.round(data).astype(np.int16)
    data[data == 0] = 1
    data[:4], data[:, -3:] = 0, 0  # a border of exact zeros, which nnU-Net crops before predicting
    affine = np.diag([1.3, 1.1, 2.2, 1.0])
    ras = nib.Nifti1Image(data, affine)
    nib.save(ras.as_reoriented(nib.orientations.axcodes2ornt("LPS")), ct_path)
    (theirs,) = totalsegmentator_labels(
        env, [ct_path], [tmp_path / "theirs.nii.gz"], task_ids=[297], trainer=RELEASE_TRAINERS[297], resample=[3.0] * 3
    )
    ct = nib.load(ct_path)
    table = load_structure_table("total_v2")
    parity_segmenter = Segmenter(
        weights,
        table,
        task="total_fast",
        settings=SegmentationSettings(device="cpu", resampling="totalsegmentator", threads=1),
    )
    assert not parity_segmenter.bfloat16  # precision auto: float32, as TotalSegmentator on the CPU
    parity = parity_segmenter.segment(ct)
    default = Segmenter(
        weights, table, task="total_fast", settings=SegmentationSettings(device="cpu", precision="float32", threads=1)
    ).segment(ct)
    structures = sorted(set(np.unique(theirs).tolist()) - {0})
    assert structures == [5, 10, 20]
    for label in structures:
        assert _dice(parity == label, theirs == label) >= 0.999, label
    assert min(_dice(default == label, theirs == label) for label in structures) < 0.99


def _dice(a, b) -> float:
    return 2.0 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b))
