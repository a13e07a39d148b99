"""DICOM import (ctcohort.dicom_import, ctcohort import-ct) on the real CT series of the test data and on copies
of it with edited headers: the reference grid in HU, the same voxels as a pydicom + numpy conversion, and a clear
error (or, where allowed, dcm2niix's corrected volume) for every series that is not one clean CT volume."""

import re
import zipfile

import nibabel as nib
import numpy as np
import pytest

pytest.importorskip("pylibjpeg", reason="the reference conversion decodes JPEG 2000 with pylibjpeg (test extra)")

from conftest import require_shared_data  # noqa: E402
from dicom_edits import reference_volume, series_files, tilt, write_copies  # noqa: E402

from ctcohort import dicom_import  # noqa: E402
from ctcohort.cli import main  # noqa: E402
from ctcohort.dicom_geometry import measure_stack  # noqa: E402
from ctcohort.dicom_import import (  # noqa: E402
    DicomImportError,
    _choose_volume,
    _placed_affine,
    convert_series,
    import_batch,
    import_series,
    import_table,
)
from ctcohort.scan_status import read_status  # noqa: E402

AXIAL = (1, 0, 0, 0, 1, 0)


@pytest.fixture(scope="module")
def data():
    return require_shared_data()


@pytest.fixture(scope="module")
def files(data):
    return series_files(data)


@pytest.fixture(scope="module")
def reference_grid(data):
    return nib.load(data / "totalseg-example" / "example_seg_dicom.nii.gz")


@pytest.fixture(scope="module")
def reference(files):
    """The pydicom + numpy conversion, reoriented to the closest canonical (RAS) grid."""
    hu, affine = reference_volume(files)
    return nib.as_closest_canonical(nib.Nifti1Image(hu, affine))


@pytest.fixture(scope="module")
def imported(files, tmp_path_factory):
    out = tmp_path_factory.mktemp("imported") / "ct.nii.gz"
    record = import_series(files[0].parent, out)
    return nib.load(out), record


def canonical_hu(img):
    canonical = nib.as_closest_canonical(img)
    return np.asanyarray(canonical.dataobj), canonical.affine


def test_the_shared_series_lands_on_the_reference_grid_in_hu(imported, reference_grid, reference):
    img, record = imported
    assert img.shape == reference_grid.shape == (512, 512, 20)
    np.testing.assert_array_equal(img.affine, reference_grid.affine)
    assert "".join(nib.aff2axcodes(img.affine)) == "LAS"
    assert img.get_data_dtype() == np.int16
    hu, affine = canonical_hu(img)
    # the independent conversion: same world grid and the same HU in every voxel
    np.testing.assert_allclose(affine, reference.affine, atol=1e-4)
    np.testing.assert_array_equal(hu, np.asanyarray(reference.dataobj))
    assert hu.min() == -1024 and 1000 < hu.max() < 3000  # air outside the body, bone or contrast
    assert record.images == 20 and record.shape == "512x512x20" and record.correction == "none"
    assert record.spacing_mm == "0.9766x0.9766x2" and record.orientation == "LAS" and record.dtype == "int16"


def test_the_nifti_header_carries_nothing_but_the_grid_and_the_values(imported):
    img, _ = imported
    header = img.header
    for field in ("descrip", "aux_file", "db_name", "intent_name"):
        assert header[field].item() == b"", field  # dcm2niix writes acquisition notes into descrip
    assert len(header.extensions) == 0
    assert header["qform_code"] == header["sform_code"] == 1


def test_a_zip_a_file_list_and_the_command_line_give_the_same_volume(files, imported, tmp_path):
    img, _ = imported
    archive = tmp_path / "series.zip"
    with zipfile.ZipFile(archive, "w") as stream:
        for n, path in enumerate(files):
            stream.write(path, f"export/part{n % 2}/{path.name}")
    listing = tmp_path / "series.txt"  # absolute paths, in any order (ctcohort sheet writes such lists)
    listing.write_text("".join(f"{p}\n" for p in files[::-1]))
    for source in (archive, listing):
        converted, _ = convert_series(source)
        np.testing.assert_array_equal(converted.affine, img.affine)
        np.testing.assert_array_equal(np.asanyarray(converted.dataobj), np.asanyarray(img.dataobj))
    out = tmp_path / "cli.nii.gz"
    assert main(["import-ct", *map(str, files), "-o", str(out)]) == 0
    np.testing.assert_array_equal(np.asanyarray(nib.load(out).dataobj), np.asanyarray(img.dataobj))


def test_a_file_list_holds_paths_relative_to_its_folder(files, tmp_path):
    copies = write_copies(files[:3], tmp_path / "dicom" / "a")
    listing = tmp_path / "lists" / "a.txt"
    listing.parent.mkdir()
    listing.write_text("".join(f"../dicom/a/{p.name}\n" for p in copies) + "\n")
    img, record = convert_series(listing)
    assert img.shape == (512, 512, 3) and record.images == 3


def test_a_missing_slice_fails_or_is_resliced_where_allowed(files, reference_grid, reference, tmp_path, capsys):
    gap = 9
    folder = tmp_path / "missing"
    write_copies(files[:gap] + files[gap + 1 :], folder)
    with pytest.raises(DicomImportError) as failure:
        convert_series(folder)
    message = str(failure.value)
    assert message.startswith(f"DICOM series {folder}: uneven slice spacing")
    assert "17 gaps of 2 mm, 1 gap of 4 mm" in message and "allow_corrected" in message
    assert main(["import-ct", str(folder), "-o", str(tmp_path / "cli.nii.gz")]) == 1
    assert "uneven slice spacing" in capsys.readouterr().err

    img, record = convert_series(folder, allow_corrected=True)
    assert record.correction == "Eq" and record.images == 19
    # resliced at 2 mm from the first slice: the reference grid again, the missing slice filled in between
    np.testing.assert_array_equal(img.affine, reference_grid.affine)
    hu, _ = canonical_hu(img)
    expected = np.asanyarray(reference.dataobj)
    kept = [k for k in range(20) if k != gap]
    np.testing.assert_array_equal(hu[..., kept], expected[..., kept])
    below, above = expected[..., gap - 1], expected[..., gap + 1]
    filled = hu[..., gap]
    assert np.all(filled >= np.minimum(below, above) - 1) and np.all(filled <= np.maximum(below, above) + 1)
    assert np.abs(filled - (below + above) / 2).max() <= 1  # linear: halfway


def test_a_gantry_tilt_fails_or_is_corrected_where_allowed(files, tmp_path):
    folder = tmp_path / "tilted"
    write_copies(files, folder, tilt(15.0))
    with pytest.raises(DicomImportError, match=r"gantry tilt of 15\.0 degrees"):
        convert_series(folder)
    img, record = convert_series(folder, allow_corrected=True)
    assert record.correction == "Tilt"
    # the sheared stack on an orthogonal grid: wider in y by the shear, 20 slices 2 mm apart
    shift_mm = 38 * np.tan(np.radians(15.0))
    assert img.shape[0] == 512 and img.shape[2] == 20
    assert img.shape[1] == 512 + round(shift_mm / 0.9765625) + 1
    np.testing.assert_allclose(img.header.get_zooms(), (0.9765625, 0.9765625, 2.0), atol=1e-5)


def shuffle_instance_numbers(ds, index):
    """InstanceNumbers in no spatial order; the positions untouched."""
    ds.InstanceNumber = [7, 19, 2, 14, 1, 10, 17, 5, 12, 20, 3, 16, 8, 11, 4, 18, 6, 13, 9, 15][index]


@pytest.mark.parametrize("allow_corrected", [False, True])
def test_shuffled_instance_numbers_convert_on_the_positions_grid(
    files, reference_grid, reference, tmp_path, allow_corrected
):
    folder = tmp_path / "shuffled"
    copies = write_copies(files, folder, shuffle_instance_numbers)
    before = [p.read_bytes() for p in copies]
    img, record = convert_series(folder, allow_corrected=allow_corrected)
    # 20 slices of 2 mm from the lowest position, as the headers say (not dcm2niix's 10 slices of 3.33 mm)
    assert (record.shape, record.spacing_mm, record.correction) == ("512x512x20", "0.9766x0.9766x2", "none")
    np.testing.assert_array_equal(img.affine, reference_grid.affine)
    hu, _ = canonical_hu(img)
    np.testing.assert_array_equal(hu, np.asanyarray(reference.dataobj))  # each slice in its place
    assert [p.read_bytes() for p in copies] == before  # numbered in temporary copies: the user's files untouched


def test_a_volume_that_disagrees_with_the_headers_is_refused_even_where_corrections_are_allowed(
    files, tmp_path, monkeypatch
):
    """Without the numbering by position dcm2niix stacks the shuffled slices by InstanceNumber and keeps a few of
    the 20 (a Siemens CT: those up to the first that goes back): refused, with dcm2niix's own word for the cause."""
    folder = tmp_path / "shuffled"
    write_copies(files, folder, shuffle_instance_numbers)
    monkeypatch.setattr(dicom_import, "_number_by_position", lambda images, stack: False)
    with pytest.raises(DicomImportError) as failure:
        convert_series(folder, allow_corrected=True)
    message = str(failure.value)
    assert re.search(r"dcm2niix's volume has [1-9] slices", message)
    assert "the headers put 20 slices 2 mm apart" in message
    assert "Instance Number (0020,0013) order is not spatial" in message
    # a resliced volume whose slice count does not span the headers' slices (dcm2niix's Eq of the same series)
    stack = measure_stack([(0, 0, -804.5 + 2 * k) for k in range(20) if k != 9], AXIAL)
    affine = np.diag([-1, 1, 10 / 3, 1])
    affine[2, 3] = -802.5
    eq = nib.Nifti1Image(np.zeros((4, 4, 10), np.int16), affine)
    with pytest.raises(DicomImportError, match=r"corrected volume \(Eq\) has 10 slices 3\.333 mm apart"):
        _placed_affine(eq, "Eq", stack, [])


def test_jittered_positions_convert_on_the_stack_they_describe(files, tmp_path):
    """Positions 0.05 mm off their places at 5 mm: regular; dcm2niix took 5.05 mm from the first two slices,
    the volume has the spacing and origin fitted to all 20."""
    jitter = [0.0, 0.05, -0.05]

    def jittered(ds, index):
        x, y, _ = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [x, y, -804.5 + 5 * index + jitter[index % 3]]

    folder = tmp_path / "jittered"
    write_copies(files, folder, jittered)
    img, record = convert_series(folder)
    assert record.shape == "512x512x20" and record.correction == "none"
    headers = np.array([-804.5 + 5 * k + jitter[k % 3] for k in range(20)])
    places = img.affine[2, 3] + img.affine[2, 2] * np.arange(20)
    assert img.affine[2, 2] == pytest.approx(5.0, abs=0.01)
    assert np.abs(places - headers).max() <= 0.1


def set_series(uid, number):
    def edit(ds, index):
        ds.SeriesInstanceUID, ds.SeriesNumber = uid, number

    return edit


@pytest.mark.parametrize(
    "second, message",
    [
        (set_series("1.2.826.0.1.3680043.8.498.2", 3), r"holds 2 series \(distinct SeriesInstanceUID\)"),
        (set_series("", 3), r"more than one series: SeriesNumber 2 \(20 images\), 3 \(20 images\)"),
    ],
)
def test_a_second_series_mixed_in_is_an_error(files, tmp_path, second, message):
    folder = tmp_path / "two"
    uid = "" if "SeriesNumber" in message else "1.2.826.0.1.3680043.8.498.1"
    write_copies(files, folder, set_series(uid, 2), prefix="a")
    write_copies(files, folder / "more", second, prefix="b")
    with pytest.raises(DicomImportError, match=message):
        convert_series(folder, allow_corrected=True)


def test_two_reconstructions_with_blank_uids_are_an_error(files, tmp_path):
    folder = tmp_path / "twice"
    write_copies(files, folder, prefix="a")
    write_copies(files[5:10], folder, prefix="b")  # dcm2niix alone would drop these as duplicates
    with pytest.raises(DicomImportError, match="slices at the same position: 10 slices at 5 positions"):
        convert_series(folder, allow_corrected=True)


def test_a_localizer_mixed_in_is_an_error(files, tmp_path):
    folder = tmp_path / "with_localizer"
    write_copies(files, folder)

    def localizer(ds, index):  # a coronal scout with the series' (blank) UIDs, as dcm2niix would merge it
        ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]

    write_copies(files[:1], folder, localizer, prefix="scout")
    with pytest.raises(DicomImportError, match=r"1 localizer image \(ImageType LOCALIZER\) mixed in with the 20"):
        convert_series(folder, allow_corrected=True)

    def scout_without_its_type(ds, index):
        ds.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]

    write_copies(files[:1], folder, scout_without_its_type, prefix="scout")
    with pytest.raises(DicomImportError, match="slices in 2 different orientations"):
        convert_series(folder, allow_corrected=True)


def test_a_source_with_no_dicom_or_no_ct_is_an_error(files, tmp_path):
    empty = tmp_path / "notes"
    empty.mkdir()
    (empty / "README.txt").write_text("not an image\n")
    (empty / "slice.dcm").write_bytes(b"\0" * 200)
    with pytest.raises(DicomImportError, match=rf"DICOM series {empty}: holds no DICOM image \(2 files"):
        convert_series(empty)
    mr = tmp_path / "mr"

    def modality(ds, index):
        ds.Modality = "MR"

    write_copies(files, mr, modality)
    with pytest.raises(DicomImportError, match=r"holds no CT image: modality MR \(20\)"):
        convert_series(mr)
    with pytest.raises(DicomImportError, match="does not exist"):
        convert_series(tmp_path / "nowhere")
    with pytest.raises(DicomImportError, match="a single slice, not a volume"):
        convert_series(files[:1])


def test_more_than_one_output_volume_or_a_4d_one_is_an_error(tmp_path):
    """dcm2niix's outputs are checked whatever the header checks let through."""
    grid = np.zeros((4, 4, 3), np.int16)
    several = tmp_path / "several"
    several.mkdir()
    for name in ("volume.nii", "volume_e2.nii"):
        nib.save(nib.Nifti1Image(grid, np.eye(4)), several / name)
    with pytest.raises(DicomImportError, match="more than one volume"):
        _choose_volume(several, True, None)
    four_d = tmp_path / "four_d"
    four_d.mkdir()
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 3, 2), np.int16), np.eye(4)), four_d / "volume.nii")
    with pytest.raises(DicomImportError, match="a 4-D volume of shape 4x4x3x2"):
        _choose_volume(four_d, True, None)
    plain = tmp_path / "plain"
    plain.mkdir()
    nib.save(nib.Nifti1Image(grid, np.eye(4)), plain / "volume.nii")
    missing_slice = measure_stack([(0, 0, z) for z in (0, 2, 6)], AXIAL)
    with pytest.raises(DicomImportError, match="uneven slice spacing .*, but dcm2niix wrote no corrected volume"):
        _choose_volume(plain, True, missing_slice)


def test_a_batch_records_each_series_and_its_failure(files, tmp_path):
    good, broken = tmp_path / "good", tmp_path / "broken"
    write_copies(files[:4], good)
    write_copies(files[:2] + files[3:4], broken)
    subjects = ["good", "broken"]
    cts = [tmp_path / f"{s}.nii.gz" for s in subjects]
    records = [tmp_path / f"{s}.import.tsv" for s in subjects]
    statuses = [tmp_path / f"{s}.status.json" for s in subjects]
    import_batch(subjects, [good, broken], cts, records, statuses)
    ok, failed = (read_status(p) for p in statuses)
    assert ok.ok and ok.stage == "import_ct"
    assert not failed.ok and failed.stage == "import_ct"
    assert failed.error.startswith(f"DicomImportError: DICOM series {broken}: uneven slice spacing")
    assert nib.load(cts[0]).shape == (512, 512, 4) and nib.load(cts[1]).shape == (1, 1, 1)
    table = import_table(records, statuses)
    assert table["subject"].tolist() == subjects and table["imported"].tolist() == [True, False]
    assert table.loc[0, "shape"] == "512x512x4" and table.loc[0, "correction"] == "none"
    assert table.loc[1, "shape"] == "" and "uneven slice spacing" in table.loc[1, "error"]


def test_a_slice_with_another_rescale_gives_float32_hu_equal_to_the_reference(files, tmp_path):
    """int16 only where it is lossless: a non-integer intercept on one slice makes the volume float32."""

    def rescale(ds, index):
        if index == 7:
            ds.RescaleIntercept = -1024.5

    folder = tmp_path / "rescaled"
    copies = write_copies(files, folder, rescale)
    img, record = convert_series(folder)
    assert img.get_data_dtype() == np.float32 and record.dtype == "float32"
    hu, affine = reference_volume(copies)
    expected = nib.as_closest_canonical(nib.Nifti1Image(hu, affine))
    converted, _ = canonical_hu(img)
    np.testing.assert_allclose(converted, np.asanyarray(expected.dataobj), atol=1e-3)
    assert converted[..., 7].min() == -1024.5  # the half HU of that slice kept
