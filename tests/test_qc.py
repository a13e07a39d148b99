"""Quality control: faces that cut structures off, vertebral coverage, plausibility exclusions, the flow from
scans in to scans analysed, previews; and a real workflow run on copies of a real CT."""

import base64
import io
import re
import struct
import warnings

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from ctcohort import phantom
from ctcohort.aggregate import exclusion_flow, value_exclusions
from ctcohort.columns import EXCLUSION_REASONS, HU_COLUMNS
from ctcohort.imaging import voxel_volume_ml
from ctcohort.measure import measure_and_qc
from ctcohort.qc import (
    FACES,
    QCSettings,
    apply_plausibility,
    cut_faces,
    load_plausible_volumes,
    preview_png,
    vertebral_coverage,
)
from ctcohort.structures import load_structure_table

V1 = load_structure_table("total_v1")
V1_IDS = dict(zip(V1["name"], V1["label"]))


# --- faces ------------------------------------------------------------------------------------------------


def _box_map():
    """20 x 16 x 12 voxels: label 1 reaches the last index of axis 0 only, label 2 is inside, label 3 reaches
    index 0 of axis 1 and the last of axis 2."""
    labels = np.zeros((20, 16, 12), np.uint8)
    labels[12:20, 5:9, 4:8] = 1
    labels[4:8, 5:9, 4:8] = 2
    labels[4:8, 0:3, 9:12] = 3
    return labels


@pytest.mark.parametrize(
    "affine, want",
    [
        (np.diag([2.0, 2.0, 3.0, 1.0]), ["x+", "", "y-;z+"]),  # RAS: voxel axes are x, y, z, increasing
        (np.diag([-2.0, -2.0, 3.0, 1.0]), ["x-", "", "y+;z+"]),  # LPS storage: axes 0 and 1 run the other way
        # axes permuted: voxel axis 0 is world z, axis 1 is x, axis 2 is y (decreasing)
        (np.array([[0, 2.0, 0, 0], [0, 0, -3.0, 0], [2.5, 0, 0, 0], [0, 0, 0, 1]]), ["z+", "", "x-;y-"]),
    ],
)
def test_cut_faces_names_the_ras_face_of_each_structure(affine, want):
    assert cut_faces(_box_map(), affine, [1, 2, 3], margin=3) == want


def test_cut_faces_margin_and_absent_labels():
    labels = _box_map()
    labels[4:8, 0:3, 9:12] = 0
    labels[4:8, 3:6, 4:8] = 3  # now 3 voxels from the y- face: within a margin of 4, not of 3
    affine = np.eye(4)
    assert cut_faces(labels, affine, [1, 3, 7], margin=3) == ["x+", "", ""]
    assert cut_faces(labels, affine, [1, 3, 7], margin=4) == ["x+", "y-", ""]
    assert cut_faces(labels, affine, [1, 3], margin=0) == ["", ""]


def test_scan_qc_faces_agree_with_measure_on_a_cropped_phantom():
    """On a phantom scan cropped so that some structures reach the field of view: a structure has faces
    exactly where measure says it is not complete, and the faces are the cropped ones."""
    draw = phantom.draw_subject(seed=1, index=0)
    ct, labels, affine = phantom.render_subject(draw)
    ct, labels = ct[:, :, 20:-25], labels[:, :, 20:-25]  # cut at both ends of z
    affine = affine @ np.array([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 20], [0, 0, 0, 1]])
    result = measure_and_qc(ct, labels, affine, V1, QCSettings(preview_width=None))
    m, qc = result.measurements, result.qc.table
    assert list(qc["structure"]) == list(m["structure"])
    present = m["n_voxels"] > 0
    incomplete = (present & m["complete"].eq(False).fillna(False)).tolist()
    assert (qc["cut_faces"] != "").tolist() == incomplete and any(incomplete)
    faces = set(";".join(qc.loc[qc["cut_faces"] != "", "cut_faces"]).split(";"))
    assert faces and faces <= {"z-", "z+"}
    # independently: which labels lie in the first / last 3 slices
    top, bottom = set(np.unique(labels[:, :, -3:])) - {0}, set(np.unique(labels[:, :, :3])) - {0}
    for label, f in zip(qc["label"], qc["cut_faces"]):
        assert ("z+" in f.split(";")) == (label in top) and ("z-" in f.split(";")) == (label in bottom)
    assert set(FACES) >= faces


# --- coverage ---------------------------------------------------------------------------------------------


def test_vertebral_coverage_from_a_map_with_t12_to_l3():
    labels = np.zeros((30, 30, 60), np.uint8)
    # cranial (z+) to caudal: T12, L1, L2, L3 as slabs; L4 with 5 voxels only (fewer than min_voxels)
    for k, name in enumerate(["vertebrae_T12", "vertebrae_L1", "vertebrae_L2", "vertebrae_L3"]):
        labels[10:20, 10:20, 50 - 10 * k : 58 - 10 * k] = V1_IDS[name]
    labels[12, 12, 2:7] = V1_IDS["vertebrae_L4"]
    labels[10:20, 5:8, 40:45] = V1_IDS["liver"]
    hu = np.full(labels.shape, -1000, np.int16)
    hu[labels > 0] = 300
    result = measure_and_qc(hu, labels, np.eye(4), V1, QCSettings(min_voxels=10, preview_width=None))
    qc = result.qc.table
    assert set(qc["cranial_vertebra"]) == {"vertebrae_T12"} and set(qc["caudal_vertebra"]) == {"vertebrae_L3"}
    # the order is anatomical, not the table's or the names' alphabetical one
    assert vertebral_coverage(
        ["vertebrae_L5", "vertebrae_C1", "vertebrae_T2", "vertebrae_S1", "liver"], [True, True, True, True, True]
    ) == ("vertebrae_C1", "vertebrae_S1")
    assert vertebral_coverage(["vertebrae_T10", "vertebrae_T9"], [True, True]) == ("vertebrae_T9", "vertebrae_T10")
    assert vertebral_coverage(["liver"], [True]) == ("", "")


# --- plausibility -----------------------------------------------------------------------------------------


def test_the_plausible_volume_table_is_sound():
    table = load_plausible_volumes("total_v1")
    assert set(table["structure"]) <= set(V1["name"])
    assert (table["min_ml"] < table["max_ml"]).all() and (table["min_ml"] > 0).all()
    assert table["source"].str.len().gt(20).all()
    assert load_plausible_volumes(None) is None


@pytest.mark.parametrize(
    "text, message",
    [
        ("structure,min_ml,max_ml,source\nliver,900,800,x\n", "min_ml < max_ml"),
        ("structure,min_ml,max_ml,source\nliver,1,800,x\nliver,2,900,y\n", "duplicate"),
        ("structure,max_ml\nliver,800\n", "missing column"),
    ],
)
def test_a_bad_plausible_volume_table_is_an_error(tmp_path, text, message):
    (tmp_path / "t.csv").write_text(text)
    with pytest.raises(ValueError, match=message):
        load_plausible_volumes(tmp_path / "t.csv")


def _rows(**columns):
    n = len(next(iter(columns.values())))
    base = {
        "subject": [f"s{i}" for i in range(n)],
        "structure": ["liver"] * n,
        "label": [5] * n,
        "group": ["organ"] * n,
        "n_voxels": [1000] * n,
        "volume_ml": [1500.0] * n,
        "hu_mean": [60.0] * n,
        "hu_median": [60.0] * n,
        "hu_std": [10.0] * n,
        "hu_mean_eroded": [61.0] * n,
        "complete": pd.array([True] * n, dtype="boolean"),
        "exclusion_reason": [""] * n,
        "age": [50.0] * n,
    }
    base.update(columns)
    return pd.DataFrame(base)


def test_volume_bounds_come_from_the_table():
    table = load_plausible_volumes("total_v1").set_index("structure")
    low, high = table.at["liver", "min_ml"], table.at["liver", "max_ml"]
    volumes = [low - 0.01, low, 1500.0, high, high + 0.01, np.nan]
    rows = _rows(volume_ml=volumes)
    rows.loc[5, "exclusion_reason"] = "cut_off"
    rows.loc[5, "complete"] = False
    out = apply_plausibility(rows, load_plausible_volumes("total_v1"), None)
    assert out["volume_implausible"].tolist() == [True, False, False, False, True, False]
    assert out["exclusion_reason"].tolist() == ["implausible_volume", "", "", "", "implausible_volume", "cut_off"]
    assert np.isnan(out.loc[[0, 4, 5], "volume_ml"]).all() and out.loc[[1, 2, 3], "volume_ml"].tolist() == volumes[1:4]
    assert out[HU_COLUMNS].notna().all().all()  # only the volume goes
    # a structure the table does not list is not checked; no table: nothing is
    other = apply_plausibility(
        _rows(structure=["aorta", "liver"], volume_ml=[1e6, 1.0]), load_plausible_volumes("total_v1"), None
    )
    assert other["volume_implausible"].tolist() == [False, True]
    assert not apply_plausibility(rows, None, None)["volume_implausible"].any()
    # a later model's liver (several models per scan) has liver's bounds
    later = apply_plausibility(
        _rows(structure=["body:liver", "body:liver"], volume_ml=[1.0, 1500.0]), load_plausible_volumes("total_v1"), None
    )
    assert later["volume_implausible"].tolist() == [True, False]


def test_hu_window_excludes_hu_and_outranks_cut_off():
    rows = _rows(
        hu_median=[60.0, -1200.0, 3500.0, 3500.0, 3500.0], exclusion_reason=["", "", "", "cut_off", "hu_nonfinite"]
    )
    rows.loc[3, ["complete", "volume_ml"]] = [False, np.nan]
    rows.loc[4, HU_COLUMNS] = np.nan
    out = apply_plausibility(rows, None, [-1100, 3000])
    assert out["hu_implausible"].tolist() == [False, True, True, True, False]
    assert out["exclusion_reason"].tolist() == [
        "",
        "implausible_hu",
        "implausible_hu",
        "implausible_hu",
        "hu_nonfinite",
    ]
    assert out.loc[[1, 2, 3], HU_COLUMNS].isna().all().all() and out.loc[0, HU_COLUMNS].notna().all()
    assert out.loc[[0, 1, 2], "volume_ml"].tolist() == [1500.0] * 3  # the volume stays
    # the reasons each value is NaN for: the cut-off row's volume is cut_off although its reason is implausible_hu
    assert value_exclusions(out, "volume_ml").tolist() == ["", "", "", "cut_off", ""]
    assert value_exclusions(out, "hu_mean").tolist() == [
        "",
        "implausible_hu",
        "implausible_hu",
        "implausible_hu",
        "hu_nonfinite",
    ]


def test_exclusion_flow_adds_up_to_the_scans_in():
    rows = _rows(
        volume_ml=[1500.0, 10.0, 1500.0, np.nan, 1400.0, np.nan],
        hu_median=[60.0, 60.0, 5000.0, 60.0, 60.0, np.nan],
        exclusion_reason=["", "", "", "cut_off", "", "absent"],
        age=[40.0, 50.0, 60.0, 70.0, np.nan, 80.0],
    )
    rows.loc[3, "complete"] = False
    rows.loc[5, ["complete", *HU_COLUMNS]] = [pd.NA, np.nan, np.nan, np.nan, np.nan]
    checked = apply_plausibility(rows, load_plausible_volumes("total_v1"), [-1100, 3000])
    failures = pd.DataFrame(
        {"subject": ["x1", "x2", "x3"], "stage": ["measure", "segment", "measure"], "error": ["e", "e", "e"]}
    )
    flow = exclusion_flow(9, failures, checked, ["volume_ml", "hu_mean"]).set_index("measure")
    volume, hu = flow.loc["volume_ml"], flow.loc["hu_mean"]
    assert (volume["scans_in"], volume["failed_measure"], volume["failed_segment"], volume["measured"]) == (9, 2, 1, 6)
    assert (volume["excluded_implausible_volume"], volume["excluded_cut_off"], volume["excluded_absent"]) == (1, 1, 1)
    assert (volume["no_age"], volume["analysed"]) == (1, 2)  # s0 and s2 (whose HU, not volume, is implausible)
    assert (hu["excluded_implausible_hu"], hu["excluded_absent"], hu["no_age"], hu["analysed"]) == (1, 1, 1, 3)
    for row in (volume, hu):
        excluded = sum(row[f"excluded_{r}"] for r in [*EXCLUSION_REASONS, "other"])
        assert row["measured"] == excluded + row["no_age"] + row["analysed"]
        assert row["scans_in"] == row["measured"] + row[[c for c in flow.columns if c.startswith("failed_")]].sum()


# --- preview ----------------------------------------------------------------------------------------------


def _png_size(data: bytes) -> tuple[int, int]:
    """Width and height from the PNG's IHDR chunk, read by hand."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_preview_is_a_png_of_the_asked_size_and_the_same_bytes_twice():
    ct, labels, affine = phantom.render_subject(phantom.draw_subject(seed=1, index=2))
    first = preview_png(ct, labels, affine, 600)
    assert _png_size(first) == (600, 200)
    assert preview_png(ct.copy(), labels.copy(), affine.copy(), 600) == first
    assert _png_size(preview_png(ct, labels, affine, 300)) == (300, 100)
    image = np.asarray(Image.open(io.BytesIO(first)).convert("RGB")).astype(int)
    coloured = np.abs(image - image.mean(axis=2, keepdims=True)).max(axis=2) > 30  # overlay: not grey
    for panel in range(3):
        assert coloured[:, 200 * panel : 200 * (panel + 1)].sum() > 100
    # without labels, a grey image: nothing coloured
    plain = np.asarray(Image.open(io.BytesIO(preview_png(ct, np.zeros_like(labels), affine, 600)))).astype(int)
    assert np.abs(plain - plain.mean(axis=2, keepdims=True)).max() == 0


def test_preview_of_a_float_ct_with_non_finite_padding():
    ct, labels, affine = phantom.render_subject(phantom.draw_subject(seed=1, index=2))
    ct = ct.astype(np.float32)
    ct[:, :4, :] = np.nan
    ct[:2, :, :] = -np.inf
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        data = preview_png(ct, labels, affine, 600)
    assert _png_size(data) == (600, 200)


def test_preview_shows_the_subjects_right_on_the_left():
    """Radiological convention, whatever the storage order: a structure on the subject's right (x > 0 in
    RAS) appears in the left half of the axial panel, also when the CT is stored flipped (LPS)."""
    hu = np.full((40, 40, 20), -1000, np.int16)
    hu[5:35, 5:35, :] = 40
    labels = np.zeros(hu.shape, np.uint8)
    labels[28:34, 15:25, :] = 1  # high x index: the subject's right in RAS storage
    ras = np.diag([1.0, 1.0, 2.0, 1.0])
    lps = np.diag([-1.0, -1.0, 2.0, 1.0])
    for affine, data, seg in ((ras, hu, labels), (lps, hu[::-1, ::-1], labels[::-1, ::-1])):
        image = np.asarray(Image.open(io.BytesIO(preview_png(data, seg, affine, 600)))).astype(int)
        axial = np.abs(image[:, :200] - image[:, :200].mean(axis=2, keepdims=True)).max(axis=2) > 30
        columns = np.flatnonzero(axial.any(axis=0))
        assert columns.size and columns.max() < 100


# --- the workflow -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def qc_cohort(tmp_path_factory):
    """Copies of the real example CT and its v1 segmentation, run through the real workflow: one scan's
    left kidney shrunk to an implausible volume, one scan's gallbladder set to 4000 HU, one CT truncated,
    one scan without an age."""
    from conftest import background_marked, real_example_v1, run_workflow, study_folder

    affine, hu, labels = real_example_v1()
    workdir, data = study_folder(tmp_path_factory, "qc")
    kidney = V1_IDS["kidney_left"]
    shrunk = labels.copy()
    inside = np.argwhere(labels == kidney)
    shrunk[labels == kidney] = 0
    shrunk[tuple(inside[:100].T)] = kidney  # 100 voxels of 27 mm3: 2.7 ml
    hot = hu.copy()
    hot[labels == V1_IDS["gallbladder"]] = 4000
    # each a scan of its own: the copies of the CT get one background voxel changed each
    scans = {
        "good1": (background_marked(hu, labels, 0), labels, 41),
        "good2": (background_marked(hu, labels, 1), labels, 52),
        "shrunk": (background_marked(hu, labels, 2), shrunk, 63),
        "hot": (hot, labels, 74),
        "noage": (background_marked(hu, labels, 3), labels, None),
        "broken": (background_marked(hu, labels, 4), labels, 45),
    }
    rows = []
    for subject, (values, seg, age) in scans.items():
        nib.save(nib.Nifti1Image(values, affine), data / f"{subject}_ct.nii.gz")
        nib.save(nib.Nifti1Image(seg, affine), data / f"{subject}_seg.nii.gz")
        rows.append(
            {
                "subject": subject,
                "ct": f"{subject}_ct.nii.gz",
                "seg": f"{subject}_seg.nii.gz",
                "age": age,
                "sex": "MF"[len(rows) % 2],
            }
        )
    whole = (data / "broken_ct.nii.gz").read_bytes()
    (data / "broken_ct.nii.gz").write_bytes(whole[: len(whole) // 2])
    pd.DataFrame(rows).to_csv(data / "cohort.tsv", sep="\t", index=False)
    config = {"cohort": str(data / "cohort.tsv"), "segmentation": {"method": "precomputed"}, "statistics": {"min_n": 3}}
    # the per-scan QC, the cohort tables and the correlations that the tests below read, and the report of them
    # (not the study's further statistics and figures: the whole study on broken scans is test_workflow's)
    targets = ("results/tables/qc.tsv", "results/stats/age_correlations.tsv")
    run_workflow(workdir, config, "--report", "results/report.html", "--report-after-run", *targets)
    return {"results": workdir / "results", "labels": labels, "shrunk": shrunk, "voxel_ml": voxel_volume_ml(affine)}


@pytest.mark.slow
def test_workflow_excludes_implausible_values_and_counts_them(qc_cohort):
    results = qc_cohort["results"]
    measurements = pd.read_csv(results / "tables" / "measurements.tsv", sep="\t").set_index(["subject", "structure"])
    kidney = measurements.loc[("shrunk", "kidney_left")]
    assert kidney["exclusion_reason"] == "implausible_volume" and np.isnan(kidney["volume_ml"])
    assert kidney["hu_mean"] == kidney["hu_mean"]  # the HU of the visible voxels stays
    gallbladder = measurements.loc[("hot", "gallbladder")]
    assert gallbladder["exclusion_reason"] == "implausible_hu" and np.isnan(gallbladder["hu_mean"])
    assert gallbladder["volume_ml"] == pytest.approx(measurements.loc[("good1", "gallbladder"), "volume_ml"])
    # the per-scan table keeps the value as measured; qc.tsv has both and the flags
    per_scan = pd.read_csv(results / "measure" / "shrunk.tsv", sep="\t").set_index("structure")
    assert per_scan.at["kidney_left", "volume_ml"] == pytest.approx(100 * qc_cohort["voxel_ml"])
    qc = pd.read_csv(results / "tables" / "qc.tsv", sep="\t", keep_default_na=False).set_index(["subject", "structure"])
    assert qc.loc[("shrunk", "kidney_left"), "volume_implausible"] in (True, "True")
    assert float(qc.loc[("shrunk", "kidney_left"), "volume_ml_measured"]) == pytest.approx(100 * qc_cohort["voxel_ml"])
    assert qc.loc[("hot", "gallbladder"), "hu_implausible"] in (True, "True")
    # faces: this CT cuts the liver at its top (z+) and the colon at both ends, as its labels say
    labels = qc_cohort["labels"]
    assert qc.loc[("good1", "liver"), "cut_faces"] == "z+"
    assert (V1_IDS["liver"] in labels[:, :, -3:]) and (V1_IDS["liver"] not in labels[:, :, :3])
    assert set(qc.loc["good1", "cranial_vertebra"]) == {"vertebrae_T11"}
    assert set(qc.loc["good1", "caudal_vertebra"]) == {"vertebrae_L5"}
    assert "broken" not in qc.index.get_level_values("subject")

    flow = pd.read_csv(results / "tables" / "exclusion_flow.tsv", sep="\t").set_index(["structure", "measure"])
    row = flow.loc[("kidney_left", "volume_ml")]
    assert (row["scans_in"], row["failed_measure"], row["measured"]) == (6, 1, 5)
    assert (row["excluded_implausible_volume"], row["no_age"], row["analysed"]) == (1, 1, 3)
    assert flow.loc[("gallbladder", "hu_mean"), "excluded_implausible_hu"] == 1
    assert flow.loc[("gallbladder", "hu_mean"), "analysed"] == 3
    correlations = pd.read_csv(results / "stats" / "age_correlations.tsv", sep="\t").set_index(["structure", "measure"])
    for key in [("kidney_left", "volume_ml"), ("gallbladder", "hu_mean"), ("kidney_left", "hu_mean")]:
        assert correlations.loc[key, "n"] == flow.loc[key, "analysed"]
    assert flow.loc[("kidney_left", "hu_mean"), "analysed"] == 4


@pytest.mark.slow
def test_the_report_shows_the_flow_table(qc_cohort):
    html = (qc_cohort["results"] / "report.html").read_text(errors="replace")
    assert "exclusion_flow.tsv" in html
    embedded = {
        name: base64.b64decode(data).decode("utf-8", errors="replace")
        for name, data in re.findall(r"filename=([^;\"]+);base64,([A-Za-z0-9+/=]+)", html)
    }
    flow = pd.read_csv(io.StringIO(embedded["exclusion_flow.tsv"]), sep="\t").set_index(["structure", "measure"])
    assert flow.loc[("kidney_left", "volume_ml"), "excluded_implausible_volume"] == 1


@pytest.mark.slow
def test_workflow_writes_a_qc_table_and_preview_per_scan(qc_cohort):
    results = qc_cohort["results"]
    for subject in ("good1", "good2", "shrunk", "hot", "noage"):
        assert _png_size((results / "qc" / f"{subject}.png").read_bytes()) == (600, 200)
        table = pd.read_csv(results / "qc" / f"{subject}.tsv", sep="\t", keep_default_na=False)
        assert len(table) == len(V1)
    assert (results / "qc" / "good1.png").read_bytes() == (results / "qc" / "good2.png").read_bytes()
    # the failed scan has placeholders: a one-pixel PNG, a QC table without rows
    assert _png_size((results / "qc" / "broken.png").read_bytes()) == (1, 1)
    assert pd.read_csv(results / "qc" / "broken.tsv", sep="\t").empty


@pytest.mark.slow
def test_a_bad_plausible_volume_table_stops_before_any_job(qc_cohort, tmp_path):
    from conftest import run_workflow

    table = tmp_path / "volumes.csv"
    table.write_text("structure,min_ml,max_ml,source\nliver,900,800,typo\n")
    sheet = qc_cohort["results"].parent / "data" / "cohort.tsv"
    result = run_workflow(
        tmp_path,
        {"cohort": str(sheet), "segmentation": {"method": "precomputed"}, "qc": {"plausible_volumes": str(table)}},
        check=False,
    )
    assert result.returncode != 0
    assert "config key qc.plausible_volumes" in result.stdout + result.stderr and "liver" in result.stderr
    assert not (tmp_path / "results").exists()
