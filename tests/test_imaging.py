"""check_ct and ScanChecks: a CT that cannot be in HU, or whose header is broken, fails with one line."""

import numpy as np
import pytest

from ctcohort.imaging import ImplausibleScanError, ScanChecks, check_ct, finite_range

SOURCE = "/data/cohort/sub-01_ct.nii.gz"


def body(shape=(30, 28, 20), air=-1000, seed=0, dtype=np.int16):
    """A plausible CT: air around a soft-tissue cylinder with noise."""
    rng = np.random.default_rng(seed)
    x, y = np.indices(shape[:2]) - np.array(shape[:2]).reshape(2, 1, 1) / 2
    inside = (x**2 + y**2 < (min(shape[:2]) / 3) ** 2)[..., None]
    hu = np.where(inside, 40.0, air) + rng.normal(0, 15, shape)
    return hu.astype(dtype)


def spacing_affine(*mm):
    return np.diag([*mm, 1.0])


def failure(hu, affine=None, checks=ScanChecks()) -> str:
    with pytest.raises(ImplausibleScanError) as info:
        check_ct(hu, spacing_affine(1, 1, 3) if affine is None else affine, SOURCE, checks)
    message = str(info.value)
    assert "\n" not in message, "failures.tsv holds one line per scan"
    assert message.startswith(SOURCE + ": ")
    return message


@pytest.mark.parametrize("dtype", [np.int16, np.int32, np.float32, np.float64])
def test_plausible_ct_passes(dtype):
    check_ct(body(dtype=dtype), spacing_affine(0.7, 0.7, 2.5), SOURCE)


@pytest.mark.parametrize("value", [0, -1000, 40])
def test_constant_image_fails(value):
    message = failure(np.full((10, 10, 10), value, np.int16))
    assert "not plausibly in HU" in message and "constant image" in message and f"is {value}" in message


def test_constant_image_fails_even_with_the_lowest_hu_check_disabled():
    assert "constant" in failure(np.full((5, 5, 5), -1000, np.int16), checks=ScanChecks(lowest_hu_at_most=None))


def test_missing_rescale_intercept_fails_and_says_so():
    raw = np.clip(body(dtype=np.int32) + 1024, 0, 4095)  # scanner values 0..4095, intercept not applied
    assert raw.min() == 0
    message = failure(raw)
    assert message == (
        f"{SOURCE}: not plausibly in HU: lowest value 0 is above -500 HU (no air); "
        "was the rescale intercept (-1024) not applied? (measure.ct_checks.lowest_hu_at_most)"
    )


def test_no_air_below_zero_fails_too():
    message = failure(body(air=-300))
    lowest = int(body(air=-300).min())
    assert -400 < lowest < -250
    assert message == (
        f"{SOURCE}: not plausibly in HU: lowest value {lowest} is above -500 HU (no air); "
        "was the rescale intercept (-1024) not applied? (measure.ct_checks.lowest_hu_at_most)"
    )


def test_lowest_hu_threshold_is_configurable_and_can_be_disabled():
    cropped = body(air=-300)
    lowest = int(cropped.min())
    check_ct(cropped, spacing_affine(1, 1, 1), SOURCE, ScanChecks(lowest_hu_at_most=lowest))
    check_ct(cropped, spacing_affine(1, 1, 1), SOURCE, ScanChecks(lowest_hu_at_most=None))
    assert f"lowest value {lowest} is above {lowest - 1} HU" in failure(cropped, checks=ScanChecks(lowest_hu_at_most=lowest - 1))


def test_plausibility_uses_finite_voxels_only():
    hu = body(dtype=np.float32)
    hu[0, 0, :3] = [np.nan, -np.inf, np.inf]
    check_ct(hu, spacing_affine(1, 1, 1), SOURCE)  # -inf is not air: the finite minimum is
    no_air = body(air=-300, dtype=np.float32)
    no_air[0, 0, :3] = [np.nan, -np.inf, np.inf]
    assert "lowest value" in failure(no_air)
    constant = np.full((6, 6, 6), 20.0, np.float32)
    constant[2, 2, 2] = -np.inf
    constant[3, 3, 3] = np.nan
    assert "constant image (every finite voxel is 20)" in failure(constant)


@pytest.mark.parametrize("fill", [np.nan, np.inf, -np.inf])
def test_ct_without_a_finite_voxel_fails(fill):
    hu = np.full((4, 5, 6), fill, np.float32)
    hu[0, 0, 0] = np.nan
    assert "all 120 voxels are NaN or infinite" in failure(hu)


def test_finite_range_against_numpy_on_the_finite_values():
    rng = np.random.default_rng(4)
    hu = rng.normal(0, 500, (20, 21, 22)).astype(np.float32)
    assert finite_range(hu) == (float(hu.min()), float(hu.max()), 0)
    hu[rng.random(hu.shape) < 0.1] = np.nan
    hu[rng.random(hu.shape) < 0.01] = np.inf
    hu[rng.random(hu.shape) < 0.01] = -np.inf
    finite = hu[np.isfinite(hu)]
    assert finite_range(hu) == (float(finite.min()), float(finite.max()), hu.size - finite.size)
    assert finite_range(np.array([[[3, -7]]], np.int16)) == (-7, 3, 0)


@pytest.mark.parametrize("factor", [1000, 0.001])
def test_implausible_voxel_size_fails(factor):
    message = failure(body(), spacing_affine(0.8 * factor, 0.8 * factor, 3 * factor))
    bound, key = ("above 15 mm", "max_spacing_mm") if factor > 1 else ("below 0.1 mm", "min_spacing_mm")
    assert "implausible voxel size" in message and bound in message and f"measure.ct_checks.{key}" in message


def test_voxel_size_of_one_axis_and_of_rotated_grids():
    assert "20 mm is above 15 mm" in failure(body(), spacing_affine(0.5, 0.5, 20))
    rotation = np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    affine = np.eye(4)
    affine[:3, :3] = rotation * [0.8, 0.8, 3.0]  # per-axis sizes are column norms, not the diagonal
    check_ct(body(), affine, SOURCE)
    affine[:3, :3] = rotation * [0.8, 0.05, 3.0]
    assert "0.05 mm is below 0.1 mm" in failure(body(), affine)


def test_spacing_range_is_configurable():
    thick = spacing_affine(1, 1, 20)
    check_ct(body(), thick, SOURCE, ScanChecks(max_spacing_mm=25))
    check_ct(body(), thick, SOURCE, ScanChecks(max_spacing_mm=None))
    assert "is below 2 mm" in failure(body(), spacing_affine(1, 1, 3), ScanChecks(min_spacing_mm=2))


@pytest.mark.parametrize("linear", [
    np.zeros((3, 3)),
    np.diag([1.0, 1.0, 0.0]),
    np.array([[1.0, 2.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 3.0]]),  # two parallel voxel axes
])
def test_non_invertible_affine_fails_even_with_spacing_checks_off(linear):
    affine = np.eye(4)
    affine[:3, :3] = linear
    off = ScanChecks(min_spacing_mm=None, max_spacing_mm=None)
    assert "affine is not invertible" in failure(body(), affine, off)


def test_non_finite_affine_fails():
    affine = spacing_affine(1, 1, 1)
    affine[1, 1] = np.nan
    assert "non-finite" in failure(body(), affine)


def test_scan_checks_from_config():
    assert ScanChecks.from_config(None) == ScanChecks() == ScanChecks.from_config({})
    assert ScanChecks().min_spacing_mm == 0.1 and ScanChecks().max_spacing_mm == 15.0
    assert ScanChecks().lowest_hu_at_most == -500.0
    checks = ScanChecks.from_config({"min_spacing_mm": 0.3, "max_spacing_mm": None, "lowest_hu_at_most": -800})
    assert checks == ScanChecks(0.3, None, -800.0)
    with pytest.raises(ValueError, match="measure.ct_checks: unknown key.*max_spacing"):
        ScanChecks.from_config({"max_spacing": 10})
    with pytest.raises(ValueError, match="measure.ct_checks.min_spacing_mm .* above"):
        ScanChecks.from_config({"min_spacing_mm": 5, "max_spacing_mm": 2})
    with pytest.raises(ValueError, match="measure.ct_checks.max_spacing_mm must be positive"):
        ScanChecks(max_spacing_mm=0)
    with pytest.raises(ValueError, match="lowest_hu_at_most must be a finite number"):
        ScanChecks.from_config({"lowest_hu_at_most": "-500"})
    with pytest.raises(AttributeError):
        checks.min_spacing_mm = 1.0  # frozen
