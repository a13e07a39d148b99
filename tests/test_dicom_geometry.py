"""One definition of a clean stack of slices (ctcohort.dicom_geometry): by hand on positions written here, and on
edited copies of the real CT series, where `ctcohort sheet` and the import must come to the same answer."""

import math

import numpy as np
import pytest

from ctcohort.dicom_geometry import (
    MAX_TILT_DEGREES,
    POSITION_TOLERANCE_MM,
    affine_on_stack,
    measure_stack,
    position_tolerance,
    read_header,
    volume_disagreement,
)

AXIAL = (1, 0, 0, 0, 1, 0)  # rows along x, columns along y: the normal is z


def axial(zs, y=None):
    return [(0.0, 0.0 if y is None else y[i], z) for i, z in enumerate(zs)]


def test_slices_are_sorted_by_their_positions_along_the_normal():
    zs = [4.0, 0.0, 8.0, 2.0, 6.0]
    stack = measure_stack(axial(zs), AXIAL)
    assert stack.order == (1, 3, 0, 4, 2) and stack.along == (0, 2, 4, 6, 8)
    assert stack.regular and stack.spacing == 2 and stack.step == pytest.approx(2) and stack.start == pytest.approx(0)
    # an oblique stack: rows along x, columns tilted 30 degrees from y towards z; the slices step along the normal
    c, s = math.cos(math.radians(30)), math.sin(math.radians(30))
    normal = np.cross([1, 0, 0], [0, c, s])
    points = [tuple(k * 3.0 * normal) for k in (2, 0, 1)]
    oblique = measure_stack(points, (1, 0, 0, 0, c, s))
    assert oblique.order == (1, 2, 0) and oblique.regular and oblique.spacing == pytest.approx(3)
    assert measure_stack(axial([0, 2]), (1, 0, 0, 1, 0, 0)) is None  # rows and columns alike: no normal
    assert measure_stack([(0, 0, 0), None], AXIAL) is None


def test_jitter_within_the_tolerance_is_a_regular_stack_whose_fit_is_the_true_geometry():
    jitter = [0.0, 0.05, -0.05] * 7
    stack = measure_stack(axial([5.0 * k + jitter[k] for k in range(20)]), AXIAL)
    assert stack.regular and stack.tilt_deg == 0
    assert stack.step == pytest.approx(5.0, abs=0.01) and stack.start == pytest.approx(0.0, abs=0.05)
    # the same jitter at 0.5 mm slices is a fifth of the spacing: still regular; twice the tolerance is not
    assert position_tolerance(0.5) == POSITION_TOLERANCE_MM and position_tolerance(0.25) == pytest.approx(0.05)
    assert measure_stack(axial([0.5 * k + jitter[k] for k in range(20)]), AXIAL).regular
    far = measure_stack(axial([5.0 * k + 4 * jitter[k] for k in range(20)]), AXIAL)
    assert far.problem.startswith("uneven slice spacing (") and "missing" not in far.problem


def test_a_missing_slice_is_named_with_its_place():
    zs = [-804.5 + 2 * k for k in range(20) if k != 9]
    stack = measure_stack(axial(zs), AXIAL)
    assert not stack.regular and not stack.doubled and stack.spacing == 2
    assert stack.problem == (
        "uneven slice spacing (17 gaps of 2 mm, 1 gap of 4 mm): slices missing (1 at -786.5 mm along the slice normal)"
    )
    three = measure_stack(axial([0, 2, 4, 12, 14, 16, 18]), AXIAL)
    assert "slices missing (3 at 6 mm along the slice normal)" in three.problem


def test_slices_at_one_position_are_doubled_not_uneven():
    stack = measure_stack(axial([0, 2, 2, 4, 6, 6.05, 8]), AXIAL)
    assert stack.doubled and stack.problem.startswith("slices at the same position: 4 slices at 2 positions")


@pytest.mark.parametrize("degrees, tilted", [(0.3, True), (15.0, True), (0.05, False)])
def test_a_tilt_beyond_the_tolerance_is_named_in_degrees(degrees, tilted):
    zs = [2.0 * k for k in range(20)]
    stack = measure_stack(axial(zs, y=[z * math.tan(math.radians(degrees)) for z in zs]), AXIAL)
    assert stack.tilt_deg == pytest.approx(degrees, abs=0.01)
    assert stack.regular is not tilted
    if tilted:
        shown = f"{degrees:.1f}" if degrees >= 1 else f"{degrees:.2f}"
        assert stack.problem == f"gantry tilt of {shown} degrees (slices sheared along the table)"


def test_over_a_short_stack_sideways_jitter_is_no_tilt():
    stack = measure_stack(axial([0, 2, 4], y=[0, 0.03, 0.06]), AXIAL)
    assert stack.tilt_deg > MAX_TILT_DEGREES and stack.regular  # 0.06 mm sideways: within the position tolerance


def grid(first_z, step, slices=None):
    """A NIfTI affine (RAS) of 1 mm pixels whose slices start at ``first_z`` and go ``step`` mm up."""
    affine = np.diag([-1.0, 1.0, step, 1.0])
    affine[2, 3] = first_z
    return affine


def test_a_volume_is_checked_against_the_headers_and_put_on_their_stack():
    jitter = [0.0, 0.05, -0.05] * 7
    stack = measure_stack(axial([-800 + 5.0 * k + jitter[k] for k in range(20)]), AXIAL)
    # one slice per image, the spacing taken from the first two slices: right count, moved onto the fitted stack
    taken = grid(-800.0, 5.05)
    assert volume_disagreement(taken, 20, stack, resliced=False) == ""
    placed = affine_on_stack(taken, stack)
    places = placed[2, 3] + placed[2, 2] * np.arange(20)
    assert np.abs(places - np.array(stack.along)).max() <= POSITION_TOLERANCE_MM
    np.testing.assert_array_equal(placed[:2], taken[:2])  # in-plane axes and origin kept
    # the same slices from the top down (the slice axis reversed)
    down = affine_on_stack(grid(stack.along[-1] + 0.3, -5.05), stack)
    assert down[2, 2] == pytest.approx(-stack.step) and down[2, 3] == pytest.approx(stack.start + 19 * stack.step)
    assert "5 slices" in volume_disagreement(taken, 5, stack, resliced=False)
    sideways = taken[:, [2, 1, 0, 3]]  # slices along x
    assert (
        volume_disagreement(sideways, 20, stack, resliced=False) == "its third axis not along the slice normal "
        "of the headers"
    )


def test_a_resliced_volume_must_span_the_headers_slices():
    stack = measure_stack(axial([-804.5 + 2 * k for k in range(20) if k != 9]), AXIAL)
    assert volume_disagreement(grid(-804.5, 2.0), 20, stack, resliced=True) == ""
    assert volume_disagreement(grid(-766.5, -2.0), 20, stack, resliced=True) == ""  # top down
    # what dcm2niix made of a series whose InstanceNumbers were shuffled: 10 slices of 3.33 mm, 2 mm too high
    wrong = volume_disagreement(grid(-802.5, 10 / 3), 10, stack, resliced=True)
    assert wrong == (
        "10 slices 3.333 mm apart from -802.5 mm along the slice normal, where the headers put 19 "
        "slices 2 mm apart from -804.5 mm over 38 mm"
    )
    assert volume_disagreement(grid(-804.5, 2.0), 10, stack, resliced=True)  # too few slices to span them


def test_the_header_reader_reads_the_geometry_and_skips_what_is_not_an_image(tmp_path, shared_data):
    (tmp_path / "notes.dcm").write_text("not DICOM\n")
    assert read_header(tmp_path / "notes.dcm", ["Rows"]) is None
    path = sorted((shared_data / "totalseg-example" / "dicom").glob("*.dcm"))[0]
    header = read_header(path, ["ImagePositionPatient", "PixelSpacing", "Rows", "Modality", "InstanceNumber"])
    assert header["Rows"] == 512 and header["Modality"] == "CT" and header["InstanceNumber"].isdigit()
    assert len(header["ImagePositionPatient"]) == 3 and header["PixelSpacing"] == (0.9765625, 0.9765625)


# --- ctcohort sheet and the import on edited copies of the real series --------------------------------------


def moved(z_of):
    """An edit that moves each slice to ``z_of(index, z)`` (index: feet to head, as series_files orders them)."""

    def edit(ds, index):
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [x, y, z_of(index, z)]

    return edit


JITTER = [0.0, 0.05, -0.05]


def shuffled_instance_numbers(ds, index):
    ds.InstanceNumber = [7, 19, 2, 14, 1, 10, 17, 5, 12, 20, 3, 16, 8, 11, 4, 18, 6, 13, 9, 15][index]


EDITS = {
    "jitter at 2 mm": moved(lambda k, z: z + JITTER[k % 3]),
    "jitter at 5 mm": moved(lambda k, z: -804.5 + 5 * k + JITTER[k % 3]),
    "shuffled InstanceNumber": shuffled_instance_numbers,
    "tilt of 0.05 degrees": "tilt:0.05",
    "tilt of 0.3 degrees": "tilt:0.3",
    "missing slice": "skip:9",
}


def edited_series(shared_data, folder, name):
    from dicom_edits import series_files, tilt, write_copies

    files, edit = series_files(shared_data), EDITS[name]
    if isinstance(edit, str) and edit.startswith("tilt:"):
        edit = tilt(float(edit[5:]))
    elif isinstance(edit, str):
        skipped = int(edit[5:])
        files, edit = files[:skipped] + files[skipped + 1 :], None
    return write_copies(files, folder, edit)


@pytest.mark.parametrize("name", list(EDITS))
def test_the_sheet_chooses_what_the_import_accepts_and_both_name_the_same_cause(name, shared_data, tmp_path):
    from ctcohort.dicom_import import DicomImportError, convert_series
    from ctcohort.dicom_series import InventorySettings, write_inventory

    folder = tmp_path / "export" / "series"
    edited_series(shared_data, folder, name)
    settings = InventorySettings(secret="test", progress=False)
    inventory = write_inventory(tmp_path / "export", tmp_path / "cohort.tsv", settings=settings)
    (series,) = inventory.series
    try:
        convert_series(folder)
        refused = ""
    except DicomImportError as err:
        refused = str(err)
    assert series.chosen == (not refused), (series.reason, refused)
    if refused:
        assert series.reason and f"{folder}: {series.reason}: not imported unless allowed" in refused
    assert (name.startswith("tilt of 0.3") or name == "missing slice") == bool(refused)


def test_orientations_further_apart_than_dcm2niix_allows_are_refused_by_sheet_and_import(shared_data, tmp_path):
    from dicom_edits import series_files, write_copies

    from ctcohort.dicom_import import DicomImportError, convert_series
    from ctcohort.dicom_series import InventorySettings, write_inventory

    def turned(ds, index):  # one slice's rows turned by 3e-4: equal to 3 decimals, apart for dcm2niix
        if index == 5:
            orientation = [float(v) for v in ds.ImageOrientationPatient]
            orientation[1] += 3e-4
            ds.ImageOrientationPatient = orientation

    folder = tmp_path / "export" / "series"
    write_copies(series_files(shared_data), folder, turned)
    settings = InventorySettings(secret="test", progress=False)
    (series,) = write_inventory(tmp_path / "export", tmp_path / "cohort.tsv", settings=settings).series
    assert not series.chosen and series.reason == "slices in 2 different orientations"
    with pytest.raises(DicomImportError, match="slices in 2 different orientations"):
        convert_series(folder)


def test_a_missing_file_of_a_file_list_is_named_by_its_line_not_its_path(shared_data, tmp_path):
    from dicom_edits import series_files

    from ctcohort.dicom_import import DicomImportError, convert_series

    files = series_files(shared_data)
    listing = tmp_path / "series.txt"
    listing.write_text("\n".join([*map(str, files[:3]), "/export/DOE_JOHN_MRN123/gone.dcm", *map(str, files[3:])]))
    with pytest.raises(DicomImportError, match=r"series.txt: 1 listed file not found \(line 4\)") as err:
        convert_series(listing)
    assert "DOE_JOHN" not in str(err.value)
