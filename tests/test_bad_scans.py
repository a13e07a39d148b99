"""A cohort of real-CT copies, some broken the ways real scans break, run through the real workflow.

Good copies are measured exactly as the CT says; each broken one fails with its reason or has the
affected values excluded with a reason; none of them reaches the statistics as a plain number.
"""

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from conftest import run_workflow
from ctcohort.structures import load_structure_table

pytestmark = pytest.mark.slow

KIDNEY_LEFT, LIVER, FEMUR_LEFT = 3, 5, 88  # v1 label ids; the liver is cut off by the field of view
GOOD = ["good1", "good2", "good3"]


def save(array, affine, path, dtype):
    nib.save(nib.Nifti1Image(np.asarray(array).astype(dtype), affine), path)


@pytest.fixture(scope="module")
def real_ct_cohort(tmp_path_factory):
    """Copies of the real example CT and its v1 segmentation: three good, one with metal, six broken."""
    from conftest import require_shared_data

    folder = require_shared_data() / "totalseg-example"
    workdir = tmp_path_factory.mktemp("realct")
    data = workdir / "data"
    data.mkdir()
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

    cts = {
        **{s: (hu, affine, np.int16) for s in GOOD},
        "metal": (metal, affine, np.int16),  # fits int16; its span does not
        "zero": (np.zeros_like(hu), affine, np.int16),
        "raw": (hu + 1024, affine, np.int16),  # stored without the -1024 intercept
        "zoomed": (hu, zoomed, np.int16),
        "nonfinite": (nan_ct, affine, np.float32),
        "label250": (hu, affine, np.int16),
        "emptyseg": (hu, affine, np.int16),
    }
    segs = {"label250": with_250, "emptyseg": np.zeros_like(labels)}
    rows = []
    for i, (subject, (values, grid, dtype)) in enumerate(cts.items()):
        save(values, grid, data / f"{subject}_ct.nii.gz", dtype)
        save(segs.get(subject, labels), grid, data / f"{subject}_seg.nii.gz", np.uint8)
        rows.append((subject, f"{subject}_ct.nii.gz", f"{subject}_seg.nii.gz", 30 + 5 * i, "MF"[i % 2], i % 2))
    sheet = pd.DataFrame(rows, columns=["subject", "ct", "seg", "age", "sex", "contrast"])
    sheet.to_csv(data / "cohort.tsv", sep="\t", index=False)
    result = run_workflow(workdir, {"cohort": str(data / "cohort.tsv"), "segmentation": {"method": "precomputed"}})
    return {"results": workdir / "results", "hu": hu, "labels": labels, "metal": metal,
            "voxel_ml": abs(np.linalg.det(affine[:3, :3])) / 1000, "console": result.stderr}


def test_broken_scans_fail_with_their_reason(real_ct_cohort):
    failures = pd.read_csv(real_ct_cohort["results"] / "tables" / "failures.tsv", sep="\t").set_index("subject")
    assert set(failures.index) == {"zero", "raw", "zoomed", "label250", "emptyseg"}
    assert (failures["stage"] == "measure").all()
    errors = failures["error"]
    assert "zero_ct.nii.gz" in errors["zero"] and "constant" in errors["zero"]
    assert "raw_ct.nii.gz" in errors["raw"] and "-500" in errors["raw"] and "intercept" in errors["raw"]
    assert "zoomed_ct.nii.gz" in errors["zoomed"] and "voxel size" in errors["zoomed"]
    assert "label250_seg.nii.gz" in errors["label250"] and "250" in errors["label250"]
    assert "emptyseg_seg.nii.gz" in errors["emptyseg"] and "no labelled voxel" in errors["emptyseg"]
    assert "5 of 10 scans failed" in real_ct_cohort["console"]


def test_failed_scans_reach_no_table_or_statistic(real_ct_cohort):
    results = real_ct_cohort["results"]
    measurements = pd.read_csv(results / "tables" / "measurements.tsv", sep="\t")
    assert set(measurements["subject"]) == {*GOOD, "metal", "nonfinite"}
    numbers = measurements.select_dtypes("number").to_numpy(dtype=float)
    assert not np.isinf(numbers).any()
    correlations = pd.read_csv(results / "stats" / "age_correlations.tsv", sep="\t")
    assert correlations["n"].max() <= 5
    counts = pd.read_csv(results / "tables" / "exclusion_counts.tsv", sep="\t").set_index(["level", "kind"])
    assert counts.at[("scans", "failed: measure"), "count"] == 5


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
    per_subject = measurements.groupby("subject")["structure"].count()
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
    others = nan_scan.index != "kidney_left"
    covariates = ["subject", "age", "sex", "contrast"]
    pd.testing.assert_frame_equal(nan_scan[others].drop(columns=covariates), good[others].drop(columns=covariates),
                                  check_dtype=False, check_exact=False)
