"""Dice, NSD and bootstrap summaries against independent computations, on synthetic and real maps.

Independent references: DeepMind's ``surface-distance`` package (Nikolov et al.'s reference
implementation, used by the TotalSegmentator paper's evaluation script) for Dice, for NSD (equal to rounding,
on full-volume masks it crops itself) and for the surfel areas; scipy.stats.bootstrap and the normal
approximation for the bootstrap CIs.
"""

import runpy
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import surface_distance
from scipy import stats
from surface_distance import lookup_tables

from ctcohort import evaluate, runlog
from ctcohort.evaluate import (
    COHORT_METRIC_COLUMNS,
    METRIC_COLUMNS,
    SUMMARY_COLUMNS,
    empty_metrics,
    evaluate_scan,
    plot_dice,
    summarize,
    surface_metrics,
    write_evaluation_summary,
    write_metrics,
)
from ctcohort.imaging import GridMismatchError
from ctcohort.scan_status import ScanStatus
from ctcohort.structures import load_structure_table

REPO = Path(__file__).resolve().parents[1]
# surface-distance 0.1 imports scipy.ndimage's deprecated submodules
pytestmark = pytest.mark.filterwarnings("ignore:Please import `:DeprecationWarning")


def table_of(n_labels, group="organ"):
    return pd.DataFrame(
        {"label": range(1, n_labels + 1), "name": [f"s{i}" for i in range(1, n_labels + 1)], "group": group}
    )


def deepmind_nsd(pred_mask, ref_mask, spacing, tolerance):
    """surface-distance's surface Dice (both masks non-empty: version 0.1 fails on empty masks with numpy 2)."""
    distances = surface_distance.compute_surface_distances(ref_mask, pred_mask, spacing)
    return surface_distance.compute_surface_dice_at_tolerance(distances, tolerance)


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


def test_surfel_areas_equal_deepmind_table_for_every_code():
    """All 256 neighbourhood codes (the random blobs meet only some), on isotropic and anisotropic grids.

    surface-distance's code has bit 7 - (4a + 2b + c) for the voxel at offset (a, b, c), ours bit 4a + 2b + c.
    """
    reversed_bits = [int(f"{code:08b}"[::-1], 2) for code in range(256)]
    for spacing in [(1.0, 1.0, 1.0), (0.7, 1.3, 3.0), (2.5, 0.8, 1.1), (0.5, 0.5, 5.0)]:
        want = lookup_tables.create_table_neighbour_code_to_surface_area(spacing)[reversed_bits]
        got = evaluate._surfel_areas(np.asarray(spacing))
        np.testing.assert_allclose(got, want, rtol=1e-14, atol=0)
        assert (got[1:255] > 0).all() and got[0] == got[255] == 0


# Random cases for the comparison with DeepMind's surface-distance: isotropic and anisotropic grids, blobs cut
# by the image border, predictions off by a few voxels; each case at every tolerance of DEEPMIND_TOLERANCES.
DEEPMIND_CASES = [
    (30, (1.0, 1.0, 1.0)),
    (31, (0.7, 1.3, 3.0)),
    (32, (2.5, 0.8, 1.1)),
    (33, (0.6, 0.6, 2.0)),
    (34, (1.6, 2.9, 0.9)),
    (35, (3.0, 3.0, 3.0)),
    (36, (1.5, 1.5, 1.5)),
    (37, (0.8, 0.8, 5.0)),
    (38, (1.0, 1.0, 1.0)),
    (39, (2.0, 0.7, 0.7)),
]
DEEPMIND_TOLERANCES = [0.0, 1.0, 2.0, 3.0, 5.0]


def deepmind_cases(tolerances):
    """(our row, DeepMind's surface distances, spacing, tolerance, pred mask, ref mask) per structure in both maps."""
    for seed, spacing in DEEPMIND_CASES:
        ref = blobs(seed=seed, n_labels=8)
        pred = blobs(seed=seed, n_labels=8, jitter=2.0)
        rows = {
            tolerance: surface_metrics(pred, ref, spacing, table_of(8), tolerance_mm=tolerance)
            for tolerance in tolerances
        }
        for i, label in enumerate(range(1, 9)):
            p, r = pred == label, ref == label
            if p.any() and r.any():
                distances = surface_distance.compute_surface_distances(r, p, spacing)
                for tolerance in tolerances:
                    yield rows[tolerance].iloc[i], distances, spacing, tolerance, p, r


def test_nsd_equals_deepmind_surface_dice_on_random_cases():
    """Equal up to the order of float summation; the old voxel-counting NSD was off by 0.02-0.1 on average."""
    got, want = [], []
    for row, distances, _, tolerance, _, _ in deepmind_cases(DEEPMIND_TOLERANCES):
        got.append(row["nsd"])
        want.append(surface_distance.compute_surface_dice_at_tolerance(distances, tolerance))
    got, want = np.array(got), np.array(want)
    assert len(got) >= 60 * len(DEEPMIND_TOLERANCES)
    assert ((want > 0) & (want < 1)).mean() > 0.5, "the jitter must make a difference at most tolerances"
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)


def test_dice_equals_deepmind_dice():
    checked = 0
    for row, _, _, _, p, r in deepmind_cases(tolerances=[3.0]):
        assert row["dice"] == pytest.approx(surface_distance.compute_dice_coefficient(r, p), rel=1e-12, abs=1e-15)
        checked += 1
    assert checked >= 40


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (0.7, 1.3, 3.0)])
def test_identical_maps_score_one_for_deepmind_too(spacing):
    labels = blobs(seed=36)
    got = surface_metrics(labels, labels.copy(), spacing, table_of(8), tolerance_mm=0.0)
    for i, label in enumerate(range(1, 9)):
        mask = labels == label
        if mask.any():
            distances = surface_distance.compute_surface_distances(mask, mask, spacing)
            assert surface_distance.compute_surface_dice_at_tolerance(distances, 0.0) == 1.0
            assert got.at[i, "nsd"] == 1.0


def test_structures_cut_by_the_image_border_have_their_border_as_surface():
    ref = np.zeros((10, 10, 10), np.uint8)
    ref[:4, 2:8, 2:8] = 1  # touches the face x = 0
    pred = ref.copy()
    pred[:5, 2:8, 2:8] = 1  # one 4 mm slice longer
    got = surface_metrics(pred, ref, (4.0, 1.0, 1.0), table_of(1), tolerance_mm=3.0)
    want = deepmind_nsd(pred == 1, ref == 1, (4.0, 1.0, 1.0), 3.0)  # full-volume masks, zero-padded by it
    assert got.at[0, "nsd"] == pytest.approx(want, rel=1e-12)
    # the faces at x = 0 coincide: with the image border as background they are surface, and within tolerance
    assert 0.5 < got.at[0, "nsd"] < 1


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


def test_summarize_means_groups_and_counts():
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
    for row, scale, values_of in ((got.iloc[0], 1.0, lambda v: v), (got.iloc[1], 0.9, lambda v: v[::-1])):
        for metric, values in (("dice", dice * scale), ("nsd", nsd)):
            finite = values_of(values)[~np.isnan(values_of(values))]
            assert row[f"{metric}_mean"] == pytest.approx(np.mean(finite), rel=1e-12)
            assert row[f"{metric}_ci_low"] < row[f"{metric}_mean"] < row[f"{metric}_ci_high"]


# The bootstrap CI is checked against scipy.stats.bootstrap (percentile method), an independent
# implementation with its own random stream. Both estimate the same quantiles of the bootstrap distribution
# from B resamples; an estimated p-quantile has a Monte-Carlo standard error of sqrt(p(1-p)/B)/f(q), which
# for a near-normal bootstrap distribution of the mean (sd s) is 0.019 s at p = 0.025 and B = 20,000: 0.5% of
# the CI width (3.92 s). The difference of the two estimates has a standard error of 0.7% of the width, so a
# tolerance of 3% of the width is over 4 standard errors, while a wrong level, a wrong percentile, resampling
# without replacement or a shift by one resample's worth of spread is far outside it.
RESAMPLES = 20_000
MC_TOLERANCE = 0.03  # of the CI width


@pytest.mark.parametrize("level", [0.95, 0.9])
def test_summarize_ci_agrees_with_scipy_bootstrap(level):
    rng = np.random.default_rng(11)
    n = 25
    dice = 1 - rng.beta(1.2, 10.0, n)  # skewed towards 1, like real Dice: the percentile CI is asymmetric
    nsd = rng.uniform(0.7, 1.0, n)
    dice[[3, 17]] = np.nan
    nsd[[3, 9, 17]] = np.nan  # NSD missing where Dice is not: dropped per metric
    frame = per_scan_frame({"liver": ("organ", dice, nsd), "aorta": ("vessel", np.sqrt(dice), nsd**2)})
    got = summarize(frame, n_resamples=RESAMPLES, seed=3, level=level).set_index("structure")
    for structure, values_by_metric in (
        ("liver", {"dice": dice, "nsd": nsd}),
        ("aorta", {"dice": np.sqrt(dice), "nsd": nsd**2}),
    ):
        for metric, values in values_by_metric.items():
            finite = values[np.isfinite(values)]
            want = stats.bootstrap(
                (finite,),
                np.mean,
                n_resamples=RESAMPLES,
                confidence_level=level,
                method="percentile",
                rng=np.random.default_rng(2024),
            ).confidence_interval
            width = want.high - want.low
            assert got.at[structure, f"{metric}_ci_low"] == pytest.approx(want.low, abs=MC_TOLERANCE * width)
            assert got.at[structure, f"{metric}_ci_high"] == pytest.approx(want.high, abs=MC_TOLERANCE * width)


def test_summarize_ci_of_a_large_sample_is_the_normal_interval():
    """Percentile bootstrap CI of a mean of n = 400 normal values ~ mean +- z * sd_plugin / sqrt(n).

    The bootstrap distribution of the mean has sd sd_plugin / sqrt(n) (plug-in sd, ddof=0) and, for normal data,
    negligible skew at n = 400; the Monte-Carlo error at the default 10,000 resamples is 0.7% of the width.
    """
    values = np.random.default_rng(5).normal(0.8, 0.05, 400)
    frame = per_scan_frame({"liver": ("organ", values, values)})
    for level in (0.95, 0.8):
        row = summarize(frame, level=level).iloc[0]
        half = stats.norm.ppf(0.5 + level / 2) * values.std(ddof=0) / np.sqrt(len(values))
        for bound, want in (("dice_ci_low", values.mean() - half), ("dice_ci_high", values.mean() + half)):
            assert row[bound] == pytest.approx(want, abs=0.03 * 2 * half)


def test_summarize_degenerate_small_and_empty_inputs():
    frame = per_scan_frame(
        {
            "same": ("organ", [0.8] * 6, [1.0] * 6),
            "one": ("vessel", [0.5, np.nan, np.nan], [0.4, np.nan, np.nan]),
            "none": ("muscle", [np.nan] * 3, [np.nan] * 3),
        }
    )
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
    frame = per_scan_frame(
        {
            "liver": ("organ", [0.9, 0.95, 0.92], [0.95, 0.97, 0.96]),
            "aorta": ("vessel", [0.8, 0.85, 0.7], [0.9, 0.9, 0.8]),
            "none": ("bone", [np.nan] * 3, [np.nan] * 3),
        }
    )
    outputs = [tmp_path / "dice.png", tmp_path / "dice.svg"]
    plot_dice(summarize(frame, n_resamples=200), outputs)
    assert outputs[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    svg = outputs[1].read_text()
    assert "<svg" in svg and "liver" in svg and "aorta" in svg


def write_scan_outputs(folder, subject, ok, table=None, stage="evaluate"):
    """A scan's per-scan TSV and status file as an evaluation job leaves them (placeholder table if failed)."""
    tsv, status = folder / f"{subject}.tsv", folder / f"{subject}.status.json"
    write_metrics(table if ok else empty_metrics(), tsv)
    ScanStatus(subject, stage, ok=ok, error="" if ok else f"RuntimeError: {subject} broke in {stage}").write(status)
    return tsv, status


def run_summary(tmp_path, scans):
    """write_evaluation_summary on ``scans`` ({subject: (tsv, status)}); returns the outputs read back."""
    out = tmp_path / "out"
    out.mkdir()
    paths = {
        "dice_path": out / "dice.tsv",
        "summary_path": out / "summary.tsv",
        "failures_path": out / "failures.tsv",
        "figure_paths": [out / "dice.png", out / "dice.svg"],
    }
    write_evaluation_summary(
        {s: tsv for s, (tsv, _) in scans.items()}, [st for _, st in scans.values()], n_resamples=500, **paths
    )
    read = {name: pd.read_csv(paths[f"{name}_path"], sep="\t") for name in ("dice", "summary", "failures")}
    return read, paths["figure_paths"]


FAILED = {"a01": "segment", "b02": "evaluate", "c03": "import_ct"}


def test_evaluation_summary_when_every_scan_failed(tmp_path):
    from test_figures import svg_text

    scans = {subject: write_scan_outputs(tmp_path, subject, ok=False, stage=stage) for subject, stage in FAILED.items()}
    read, (png, svg) = run_summary(tmp_path, scans)
    assert list(read["dice"].columns) == ["subject", "structure", "group", "dice", "nsd", "n_pred", "n_ref"]
    assert len(read["dice"]) == 0
    assert list(read["summary"].columns) == SUMMARY_COLUMNS and len(read["summary"]) == 0
    failures = read["failures"]
    assert list(failures.columns) == ["subject", "stage", "error"]
    assert dict(zip(failures["subject"], failures["stage"])) == FAILED
    assert all(subject in error for subject, error in zip(failures["subject"], failures["error"]))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "no structure evaluable" in svg_text(svg)


def test_evaluation_summary_leaves_out_failed_scans(tmp_path):
    table = table_of(8)
    ref = blobs(seed=40)
    scans, tables = {}, {}
    for k, subject in enumerate(["ok1", "bad", "ok2", "ok3"]):
        tables[subject] = surface_metrics(blobs(seed=40, jitter=1.0 + k), ref, (1.0, 1.0, 2.0), table)
        scans[subject] = write_scan_outputs(tmp_path, subject, ok=subject != "bad", table=tables[subject])
    read, _ = run_summary(tmp_path, scans)
    dice = read["dice"]
    assert list(dice.columns) == COHORT_METRIC_COLUMNS
    assert sorted(dice["subject"].unique()) == ["ok1", "ok2", "ok3"]
    assert list(read["failures"]["subject"]) == ["bad"]
    for subject in ("ok1", "ok2", "ok3"):
        got = dice[dice["subject"] == subject].reset_index(drop=True)
        np.testing.assert_allclose(got["dice"], tables[subject]["dice"], rtol=1e-5)  # %.6g on disk
    summary = read["summary"].set_index("structure")
    for structure, rows in dice.groupby("structure"):
        finite = rows["dice"].dropna()
        assert summary.at[structure, "n"] == len(finite)
        if len(finite):
            assert summary.at[structure, "dice_mean"] == pytest.approx(finite.mean(), rel=1e-5)


class Snakemake(SimpleNamespace):
    """The parts of Snakemake's ``snakemake`` object that scripts use (attribute access, log[0])."""


def test_evaluation_summary_script_runs_when_every_scan_failed(tmp_path, monkeypatch):
    monkeypatch.setattr(runlog, "log_to", lambda path: None)  # keep pytest's stderr and logging
    scans = {subject: write_scan_outputs(tmp_path, subject, ok=False) for subject in FAILED}
    out = tmp_path / "results"
    out.mkdir()
    snakemake = Snakemake(
        input=SimpleNamespace(scans=[str(t) for t, _ in scans.values()], statuses=[str(s) for _, s in scans.values()]),
        output=SimpleNamespace(
            dice=str(out / "dice.tsv"),
            summary=str(out / "summary.tsv"),
            failures=str(out / "failures.tsv"),
            png=str(out / "dice.png"),
            svg=str(out / "dice.svg"),
        ),
        params=SimpleNamespace(subjects=list(scans), resamples=100),
        log=[str(out / "log.txt")],
    )
    runpy.run_path(str(REPO / "workflow" / "scripts" / "evaluation_summary.py"), init_globals={"snakemake": snakemake})
    for name in ("dice.tsv", "summary.tsv", "failures.tsv", "dice.png", "dice.svg"):
        assert (out / name).is_file(), name
    assert sorted(pd.read_csv(out / "failures.tsv", sep="\t")["subject"]) == sorted(FAILED)


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


@pytest.mark.parametrize("tolerance", [0.0, 2.0, 3.0, 5.0])
def test_real_fast_model_nsd_equals_deepmind_surface_dice(shared_data, tolerance):
    """TotalSegmentator v2 fast (3 mm) output against the full model's, every structure in both maps.

    On a 3 mm grid a 3 mm tolerance falls exactly on the distance of neighbouring corners: ties count as within.
    """
    folder = shared_data / "totalseg-example"
    table = load_structure_table("total_v2")
    pred_path, ref_path = folder / "example_seg_fast.nii.gz", folder / "example_seg.nii.gz"
    got = evaluate_scan(pred_path, ref_path, table, tolerance_mm=tolerance)
    pred, ref = (np.asarray(nib.load(path).dataobj) for path in (pred_path, ref_path))
    spacing = tuple(float(z) for z in nib.load(pred_path).header.get_zooms())
    assert spacing == (3.0, 3.0, 3.0)
    both = got[(got["n_pred"] > 0) & (got["n_ref"] > 0)]
    assert len(both) >= 35
    want = [deepmind_nsd(pred == label, ref == label, spacing, tolerance) for label in both["label"]]
    np.testing.assert_allclose(both["nsd"], want, rtol=0, atol=1e-12)
    assert both["nsd"].between(0, 1, inclusive="neither").sum() >= 10
