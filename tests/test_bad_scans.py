"""A cohort of real-CT copies, some broken the ways real scans break, run through the real workflow once.

Good copies are measured exactly as the CT says; each broken one fails with its stage and a reason a person
can act on (naming the file or series and the cause), or has the affected values excluded with a reason; none
of them reaches the statistics as a plain number. Broken NIfTIs fail at stage measure (they are read where
they are); broken DICOM series (copies of the shared real series, headers edited) fail at stage import_ct.
Problems of the sheet itself (missing file, duplicate or unsafe id, bad age or sex, the file's format) stop
the run before any job: tests/test_sheet.py and tests/test_workflow.py.
"""

import gzip

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from conftest import background_marked, run_workflow, study_folder
from dicom_edits import series_files, tilt, write_copies

from ctcohort.structures import load_structure_table

pytestmark = pytest.mark.slow

KIDNEY_LEFT, LIVER, FEMUR_LEFT = 3, 5, 88  # v1 label ids; the liver is cut off by the field of view
GOOD = ["good1", "good2", "good3"]
# subject -> (stage, words its failure message must hold: the file or series, and the cause)
FAILING = {
    "zero": ("measure", ["zero_ct.nii.gz", "constant"]),  # all-zero image
    "raw": ("measure", ["raw_ct.nii.gz", "-500", "intercept"]),  # intensities not in HU
    "zoomed": ("measure", ["zoomed_ct.nii.gz", "voxel size"]),
    "label250": ("measure", ["label250_seg.nii.gz", "250"]),  # label ids not in the structure table
    "emptyseg": ("measure", ["emptyseg_seg.nii.gz", "no labelled voxel"]),
    "flat": ("measure", ["flat_ct.nii.gz", "expected a 3-D volume", "(122, 101)"]),  # a 2-D image
    "fourd": ("measure", ["fourd_ct.nii.gz", "expected a 3-D volume", "(122, 101, 112, 2)"]),  # a 4-D image
    "truncated": ("measure", ["truncated_ct.nii.gz", "cannot read", "ended before"]),  # gzip cut short
    "webpage": ("measure", ["webpage_ct.nii.gz", "cannot read", "as NIfTI"]),  # not a NIfTI: an error page
    "seggrid": ("measure", ["seggrid_seg.nii.gz", "grid does not match"]),  # segmentation on another grid
    "nodicom": ("import_ct", ["nodicom", "holds no DICOM image"]),  # a folder of other files
    "notct": ("import_ct", ["notct", "holds no CT image: modality MR (20)"]),
    "twoseries": ("import_ct", ["twoseries", "more than one series: SeriesNumber 2 (20 images), 3 (20 images)"]),
    "localizer": ("import_ct", ["localizer", "1 localizer image (ImageType LOCALIZER) mixed in with the 20"]),
    "missingslice": ("import_ct", ["missingslice", "uneven slice spacing", "1 gap of 4 mm"]),
    "tilt": ("import_ct", ["tilt", "gantry tilt of 15.0 degrees"]),
}


def save(array, affine, path, dtype):
    nib.save(nib.Nifti1Image(np.asarray(array).astype(dtype), affine), path)


@pytest.fixture(scope="module")
def real_ct_cohort(tmp_path_factory):
    """Copies of the real example CT and its v1 segmentation: three good, one with metal, one with non-finite
    voxels, the others broken (FAILING); and copies of the real DICOM series, broken."""
    from conftest import require_shared_data

    folder = require_shared_data() / "totalseg-example"
    workdir, data = study_folder(tmp_path_factory, "realct")
    ct_img = nib.load(folder / "example_ct.nii.gz")
    seg_img = nib.load(folder / "example_seg_v1.nii.gz")
    hu = np.asanyarray(ct_img.dataobj).astype(np.int32)
    labels = np.rint(np.asanyarray(seg_img.dataobj)).astype(np.uint8)
    affine = ct_img.affine
    kidney = labels == KIDNEY_LEFT

    metal = hu.copy()
    femur = np.argwhere(labels == FEMUR_LEFT)
    metal[tuple(femur[: len(femur) // 3].T)] = 31800  # extended-range scanner: span > 32767
    nan_ct = hu.astype(np.float32)
    nan_ct[tuple(np.argwhere(kidney)[:50].T)] = np.nan  # inside one structure
    nan_ct[0, 0, :] = np.nan  # and outside every structure (padding)
    nan_ct[0, 1, 0] = -np.inf
    with_250 = labels.copy()
    with_250[tuple(np.argwhere(labels == 0)[:40].T)] = 250
    zoomed = affine.copy()
    zoomed[:3, :3] *= 1000

    # every scan a scan of its own: those that would hold the CT's very bytes get one background voxel changed
    own = iter(range(100))
    cts = {
        **{s: (background_marked(hu, labels, next(own)), affine, np.int16) for s in GOOD},
        "metal": (metal, affine, np.int16),  # fits int16; its span does not
        "zero": (np.zeros_like(hu), affine, np.int16),
        "raw": (hu + 1024, affine, np.int16),  # stored without the -1024 intercept
        "zoomed": (hu, zoomed, np.int16),
        "nonfinite": (nan_ct, affine, np.float32),
        "label250": (background_marked(hu, labels, next(own)), affine, np.int16),
        "emptyseg": (background_marked(hu, labels, next(own)), affine, np.int16),
        "flat": (hu[:, :, 10], affine, np.int16),
        "fourd": (np.stack([hu, hu], axis=-1), affine, np.int16),
        "truncated": (background_marked(hu, labels, next(own)), affine, np.int16),
        "seggrid": (background_marked(hu, labels, next(own)), affine, np.int16),
    }
    segs = {"label250": with_250, "emptyseg": np.zeros_like(labels)}
    rows = []
    for i, (subject, (values, grid, dtype)) in enumerate(cts.items()):
        save(values, grid, data / f"{subject}_ct.nii.gz", dtype)
        save(segs.get(subject, labels), grid, data / f"{subject}_seg.nii.gz", np.uint8)
        rows.append((subject, f"{subject}_ct.nii.gz", f"{subject}_seg.nii.gz", 30 + 5 * i, "MF"[i % 2], i % 2))
    whole = (data / "truncated_ct.nii.gz").read_bytes()
    (data / "truncated_ct.nii.gz").write_bytes(whole[: len(whole) // 2])  # the header reads, the voxels do not
    with pytest.raises(EOFError):
        gzip.decompress((data / "truncated_ct.nii.gz").read_bytes())
    (data / "webpage_ct.nii.gz").write_text("<html><body>502 Bad Gateway</body></html>\n")
    save(labels, affine, data / "webpage_seg.nii.gz", np.uint8)
    rows.append(("webpage", "webpage_ct.nii.gz", "webpage_seg.nii.gz", 70, "F", 0))
    save(labels[:, :, 5:], affine, data / "seggrid_seg.nii.gz", np.uint8)  # 107 of the CT's 112 slices

    # DICOM series: copies of the shared real series, headers edited (tests/dicom_edits.py)
    files = series_files(folder.parent)
    dicom = data / "dicom"
    (dicom / "nodicom").mkdir(parents=True)
    (dicom / "nodicom" / "README.txt").write_text("the export's index, not an image\n")
    (dicom / "nodicom" / "IM0001.dcm").write_bytes(b"\0" * 300)
    write_copies(files, dicom / "notct", lambda ds, i: setattr(ds, "Modality", "MR"))
    for prefix, number in (("soft", 2), ("bone", 3)):  # two reconstructions, blank UIDs as in the shared series
        write_copies(files, dicom / "twoseries", lambda ds, i, n=number: setattr(ds, "SeriesNumber", n), prefix)
    write_copies(files, dicom / "localizer")

    def scout(ds, index):  # a coronal scout with the series' (blank) UIDs
        ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]

    write_copies(files[:1], dicom / "localizer", scout, prefix="scout")
    write_copies(files[:9] + files[10:], dicom / "missingslice")
    write_copies(files, dicom / "tilt", tilt(15.0))
    dicom_seg = folder / "example_seg_dicom.nii.gz"  # never read: the import fails first
    for subject in ("nodicom", "notct", "twoseries", "localizer", "missingslice", "tilt"):
        rows.append((subject, f"dicom/{subject}", str(dicom_seg), 50, "M", 1))
    sheet = pd.DataFrame(rows, columns=["subject", "ct", "seg", "age", "sex", "contrast"])
    sheet.to_csv(data / "cohort.tsv", sep="\t", index=False)
    # up to the tables and the age statistics these tests read (the figures, charts and CT age add nothing here)
    result = run_workflow(
        workdir,
        {"cohort": str(data / "cohort.tsv"), "segmentation": {"method": "precomputed"}},
        "results/stats/age_correlations.tsv",
    )
    return {
        "results": workdir / "results",
        "hu": hu,
        "labels": labels,
        "metal": metal,
        "voxel_ml": abs(np.linalg.det(affine[:3, :3])) / 1000,
        "console": result.stderr,
    }


def test_broken_scans_fail_with_their_stage_and_reason(real_ct_cohort):
    failures = pd.read_csv(real_ct_cohort["results"] / "tables" / "failures.tsv", sep="\t").set_index("subject")
    assert sorted(failures.index) == sorted(FAILING)
    for subject, (stage, words) in FAILING.items():
        error = failures.at[subject, "error"]
        assert failures.at[subject, "stage"] == stage, (subject, error)
        for word in words:
            assert word in error, (subject, word, error)
        assert "Traceback" not in error and "\n" not in error
    n = len(FAILING)
    assert (
        f"{n} of {n + 5} scans failed and are left out of the study (measure: 10, import_ct: 6)"
        in real_ct_cohort["console"]
    )


def test_failed_scans_reach_no_table_or_statistic(real_ct_cohort):
    results = real_ct_cohort["results"]
    measurements = pd.read_csv(results / "tables" / "measurements.tsv", sep="\t")
    assert set(measurements["subject"]) == {*GOOD, "metal", "nonfinite"}
    numbers = measurements.select_dtypes("number").to_numpy(dtype=float)
    assert not np.isinf(numbers).any()
    correlations = pd.read_csv(results / "stats" / "age_correlations.tsv", sep="\t")
    assert correlations["n"].max() <= 5
    counts = pd.read_csv(results / "tables" / "exclusion_counts.tsv", sep="\t").set_index(["level", "kind"])
    assert counts.at[("scans", "failed: measure"), "count"] == 10
    assert counts.at[("scans", "failed: import_ct"), "count"] == 6


def test_good_copies_are_measured_as_the_ct_says(real_ct_cohort):
    measurements = pd.read_csv(real_ct_cohort["results"] / "tables" / "measurements.tsv", sep="\t")
    hu, labels, voxel_ml = real_ct_cohort["hu"], real_ct_cohort["labels"], real_ct_cohort["voxel_ml"]
    for subject in GOOD:
        rows = measurements[measurements["subject"] == subject].set_index("structure")
        kidney = rows.loc["kidney_left"]
        assert kidney["exclusion_reason"] != kidney["exclusion_reason"]  # read back as NaN: measured
        assert kidney["volume_ml"] == pytest.approx((labels == KIDNEY_LEFT).sum() * voxel_ml)
        assert kidney["hu_mean"] == pytest.approx(hu[labels == KIDNEY_LEFT].mean())
        assert kidney["hu_median"] == pytest.approx(np.median(hu[labels == KIDNEY_LEFT]))
        # cut off: no volume, but the visible tissue's attenuation
        liver = rows.loc["liver"]
        assert liver["exclusion_reason"] == "cut_off" and np.isnan(liver["volume_ml"])
        assert liver["hu_mean"] == pytest.approx(hu[labels == LIVER].mean())
    table = load_structure_table("total_v1")
    # one row per structure of the table (the combined structures' rows have no label id)
    per_subject = measurements[measurements["label"].notna()].groupby("subject")["structure"].count()
    assert (per_subject == len(table)).all()


def test_extended_range_medians_are_exact(real_ct_cohort):
    measurements = pd.read_csv(real_ct_cohort["results"] / "tables" / "measurements.tsv", sep="\t")
    metal, labels = real_ct_cohort["metal"], real_ct_cohort["labels"]
    femur = measurements[(measurements["subject"] == "metal") & (measurements["structure"] == "femur_left")].iloc[0]
    assert femur["hu_median"] == pytest.approx(np.median(metal[labels == FEMUR_LEFT]))
    assert femur["hu_mean"] == pytest.approx(metal[labels == FEMUR_LEFT].mean())


def test_non_finite_voxels_exclude_only_the_structure_that_holds_them(real_ct_cohort):
    measurements = pd.read_csv(real_ct_cohort["results"] / "tables" / "measurements.tsv", sep="\t")
    nan_scan = measurements[measurements["subject"] == "nonfinite"].set_index("structure")
    good = measurements[measurements["subject"] == "good1"].set_index("structure")
    kidney = nan_scan.loc["kidney_left"]
    assert kidney["exclusion_reason"] == "hu_nonfinite"
    assert kidney[["hu_mean", "hu_median", "hu_std", "hu_mean_eroded"]].isna().all()
    assert kidney["volume_ml"] == pytest.approx(good.loc["kidney_left", "volume_ml"])  # the labels are intact
    # the kidneys combined (statistics.combined) lose their HU with their member; nothing else changes
    kidneys = nan_scan.loc["kidneys"]
    assert kidneys["exclusion_reason"] == "member_missing" and np.isnan(kidneys["hu_mean"])
    assert kidneys["volume_ml"] == pytest.approx(good.loc["kidneys", "volume_ml"])
    others = ~nan_scan.index.isin(["kidney_left", "kidneys"])
    covariates = ["subject", "age", "sex", "contrast"]
    pd.testing.assert_frame_equal(
        nan_scan[others].drop(columns=covariates),
        good[others].drop(columns=covariates),
        check_dtype=False,
        check_exact=False,
    )
