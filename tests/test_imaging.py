"""check_ct and ScanChecks: a CT that cannot be in HU, or whose header is broken, fails with one line."""

import gzip

import nibabel as nib
import numpy as np
import pytest

from ctcohort import imaging
from ctcohort.imaging import ImplausibleScanError, ScanChecks, check_ct, finite_range, load_image

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
    assert f"lowest value {lowest} is above {lowest - 1} HU" in failure(
        cropped, checks=ScanChecks(lowest_hu_at_most=lowest - 1)
    )


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


@pytest.mark.parametrize(
    "linear",
    [
        np.zeros((3, 3)),
        np.diag([1.0, 1.0, 0.0]),
        np.array([[1.0, 2.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 3.0]]),  # two parallel voxel axes
    ],
)
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


# Reading: gzipped NIfTI inflates with ISA-L; the image must be the one nibabel's own reader gives.


def nibabel_reference(path):
    img = nib.load(path)
    return np.asanyarray(img.dataobj), img.get_fdata(), img.affine, img.header


def assert_same_image(img, path):
    data, scaled, affine, header = nibabel_reference(path)
    values = np.asanyarray(img.dataobj)
    assert values.dtype == data.dtype and values.shape == data.shape
    np.testing.assert_array_equal(values, data)
    np.testing.assert_array_equal(img.get_fdata(), scaled)
    np.testing.assert_array_equal(img.affine, affine)
    assert img.header.binaryblock == header.binaryblock
    assert values.flags.writeable, "nibabel's arrays are writeable; so must ours be"


def scan_file(tmp_path, name, array, affine, image_class=nib.Nifti1Image, slope=None, inter=None):
    img = image_class(array, affine)
    if slope is not None:
        img.header.set_slope_inter(slope, inter)
    nib.save(img, tmp_path / name)
    return tmp_path / name


def example_files(tmp_path):
    affine = np.diag([0.8, 0.9, 2.5, 1.0])
    affine[:3, 3] = (-10, 20, 5)
    hu = body(shape=(31, 28, 17))
    return [
        scan_file(tmp_path, "ct.nii.gz", hu, affine),
        scan_file(tmp_path, "ct.nii", hu, affine),  # plain: nibabel's own reader (memory-mapped)
        scan_file(
            tmp_path, "scaled.nii.gz", (hu.astype(np.int32) + 1024).astype(np.uint16), affine, slope=0.5, inter=-1024
        ),
        scan_file(tmp_path, "float.nii.gz", hu.astype(np.float32), affine),
        scan_file(tmp_path, "labels.nii.gz", (hu > 0).astype(np.uint8), affine),
        scan_file(tmp_path, "nifti2.nii.gz", hu, affine, nib.Nifti2Image),
    ]


@pytest.mark.parametrize("in_memory", [False, True])
def test_reader_gives_nibabels_image(tmp_path, in_memory):
    for path in example_files(tmp_path):
        img = load_image(path, in_memory=in_memory)
        assert type(img) is type(nib.load(path))
        assert_same_image(img, path)


def test_gzipped_nifti_inflates_with_isal(tmp_path, monkeypatch):
    assert imaging.fast_gzip is not None, "isal is a dependency"
    calls = []
    real = imaging.fast_gzip

    class Spy:
        def open(self, *args, **kwargs):
            calls.append("open")
            return real.open(*args, **kwargs)

        def decompress(self, *args, **kwargs):
            calls.append("decompress")
            return real.decompress(*args, **kwargs)

    monkeypatch.setattr(imaging, "fast_gzip", Spy())
    path = example_files(tmp_path)[0]
    assert_same_image(load_image(path), path)
    assert_same_image(load_image(path, in_memory=True), path)
    assert calls == ["open", "decompress"]


@pytest.mark.parametrize("in_memory", [False, True])
def test_reader_without_isal_is_nibabels(tmp_path, monkeypatch, in_memory):
    monkeypatch.setattr(imaging, "fast_gzip", None)
    for path in example_files(tmp_path):
        assert_same_image(load_image(path, in_memory=in_memory), path)


@pytest.mark.parametrize("in_memory", [False, True])
def test_gzip_that_is_not_nifti_names_the_file(tmp_path, in_memory):
    path = tmp_path / "notes.nii.gz"
    with gzip.open(path, "wb") as out:
        out.write(b"not a NIfTI header at all" * 40)
    with pytest.raises(ValueError, match="cannot read .*notes.nii.gz as NIfTI"):
        load_image(path, in_memory=in_memory)


@pytest.mark.parametrize("in_memory", [False, True])
def test_reader_on_the_real_ct_and_segmentation(shared_data, in_memory):
    folder = shared_data / "totalseg-example"
    for name in ("example_ct.nii.gz", "example_seg_v1.nii.gz", "example_seg.nii.gz"):
        assert_same_image(load_image(folder / name, in_memory=in_memory), folder / name)


# --- orientation: sform and qform ----------------------------------------------------------------------------


def real_ct_copy(shared_data, tmp_path, sform_code: int, qform_code: int, qform_shift_mm: float = 0.0):
    """The real example CT and its v1 labels, the CT's header codes and qform set as asked."""
    ct = nib.load(shared_data / "totalseg-example" / "example_ct.nii.gz")
    labels = np.rint(np.asanyarray(nib.load(shared_data / "totalseg-example" / "example_seg_v1.nii.gz").dataobj))
    copy = nib.Nifti1Image(np.asanyarray(ct.dataobj).astype(np.int16), ct.affine)
    qform = ct.affine.copy()
    qform[0, 3] += qform_shift_mm
    copy.set_qform(qform, code=qform_code)
    copy.set_sform(ct.affine, code=sform_code)
    nib.save(copy, tmp_path / "ct.nii.gz")
    nib.save(nib.Nifti1Image(labels.astype(np.uint8), ct.affine), tmp_path / "seg.nii.gz")
    return tmp_path / "ct.nii.gz", tmp_path / "seg.nii.gz"


def test_a_ct_without_orientation_fails_instead_of_a_mirrored_qc(shared_data, tmp_path):
    from ctcohort.measure import read_scan

    ct, seg = real_ct_copy(shared_data, tmp_path, sform_code=0, qform_code=0)
    with pytest.raises(ImplausibleScanError, match=r"ct.nii.gz: orientation undefined \(sform_code and qform_code"):
        read_scan(ct, seg)


def test_sform_and_qform_that_disagree_are_said_with_the_distance(shared_data, tmp_path, caplog):
    from ctcohort.measure import read_scan

    ct, seg = real_ct_copy(shared_data, tmp_path, sform_code=1, qform_code=1, qform_shift_mm=10.0)
    with caplog.at_level("WARNING"):
        scan = read_scan(ct, seg)
    assert np.allclose(scan.affine, nib.load(ct).get_sform())  # measured on the sform
    assert "sform and qform disagree by up to 10.0 mm (sform_code 1, qform_code 1); the sform is used" in caplog.text
    # and the QC table says it, on every structure row (qc.tsv flags the scan: review.sanity_flags)
    from ctcohort.measure import measure_and_qc_files
    from ctcohort.qc import QCSettings
    from ctcohort.structures import load_structure_table

    checked = measure_and_qc_files(ct, seg, load_structure_table("total_v1"), qc=QCSettings(preview_width=None))
    assert checked.qc.table["sform_qform_mm"].to_numpy() == pytest.approx(10.0)
    # a label map that follows the qform: the mismatch says that the CT itself is in doubt
    qform_seg = nib.Nifti1Image(np.asanyarray(nib.load(seg).dataobj), nib.load(ct).get_qform())
    nib.save(qform_seg, tmp_path / "qform_seg.nii.gz")
    with pytest.raises(imaging.GridMismatchError, match="the CT itself is in doubt: its sform and qform disagree"):
        read_scan(ct, tmp_path / "qform_seg.nii.gz")
    # agreeing codes say nothing
    caplog.clear()
    ct, seg = real_ct_copy(shared_data, tmp_path, sform_code=1, qform_code=1)
    with caplog.at_level("WARNING"):
        assert read_scan(ct, seg).sform_qform_mm is None
    assert "disagree" not in caplog.text
