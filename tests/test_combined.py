"""Combined structures (kidneys = kidney_left + kidney_right, ...): values from the members' rows of
measure_structures, checked against numpy over the union of the members' voxels."""

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from ctcohort.aggregate import MEMBER_MISSING, add_combined, combine_structures
from ctcohort.measure import interior_mask, measure_structures
from ctcohort.structures import load_structure_table

REPO = Path(__file__).parents[1]
VOXEL_ML = 0.002
TABLE = pd.DataFrame(
    {
        "label": [1, 2, 3, 4],
        "name": ["kidney_left", "kidney_right", "spleen", "aorta"],
        "group": ["organ", "organ", "organ", "vessel"],
    }
)
COMBINED = {"kidneys": ["kidney_left", "kidney_right"], "mixed": ["spleen", "aorta"]}
# subject: age, sex
COVARIATES = {"a": (30.0, "F"), "b": (55.0, "M"), "c": (80.0, "F")}


def scan(seed: int, shapes: dict[int, tuple[slice, ...]], size=(40, 40, 40)) -> tuple[np.ndarray, np.ndarray]:
    """An integer CT with a different HU distribution per label, and its label map."""
    rng = np.random.default_rng(seed)
    hu = rng.integers(-1000, -900, size=size).astype(np.int16)
    labels = np.zeros(size, dtype=np.uint8)
    for label, box in shapes.items():
        labels[box] = label
        hu[box] = rng.normal(20 * label + seed, 5 + 10 * label, size=hu[box].shape).round()
    return hu, labels


BOXES = {
    1: np.s_[5:15, 5:12, 5:20],  # left and right of different sizes
    2: np.s_[20:33, 5:14, 5:25],
    3: np.s_[5:18, 20:30, 22:34],
    4: np.s_[22:30, 20:26, 28:35],
}


def measured(subject: str, hu: np.ndarray, labels: np.ndarray, margin: int = 3) -> pd.DataFrame:
    table = measure_structures(hu, labels, VOXEL_ML, TABLE, border_margin=margin, min_voxels=10)
    age, sex = COVARIATES[subject]
    return table.assign(subject=subject, age=age, sex=sex)[["subject", "age", "sex", *table.columns]]


def cohort(scans: dict[str, tuple[np.ndarray, np.ndarray]]) -> pd.DataFrame:
    return pd.concat([measured(s, *arrays) for s, arrays in scans.items()], ignore_index=True)


def row(frame: pd.DataFrame, subject: str, structure: str) -> pd.Series:
    rows = frame[(frame["subject"] == subject) & (frame["structure"] == structure)]
    assert len(rows) == 1
    return rows.iloc[0]


def test_combined_values_are_those_of_the_union_of_the_members_voxels():
    scans = {s: scan(seed, BOXES) for seed, s in enumerate(COVARIATES, start=1)}
    rows = combine_structures(cohort(scans), COMBINED)
    assert len(rows) == len(COVARIATES) * len(COMBINED)
    for subject, (hu, labels) in scans.items():
        for name, members in COMBINED.items():
            ids = [int(TABLE.loc[TABLE["name"] == m, "label"].iloc[0]) for m in members]
            voxels = hu[np.isin(labels, ids)].astype(float)
            got = row(rows, subject, name)
            # by hand: the boxes' voxel counts
            n = sum(int(np.prod([s.stop - s.start for s in BOXES[i]])) for i in ids)
            assert got["n_voxels"] == n == voxels.size
            assert got["volume_ml"] == pytest.approx(n * VOXEL_ML, rel=1e-12)
            assert got["hu_mean"] == pytest.approx(voxels.mean(), rel=1e-12)
            assert got["hu_std"] == pytest.approx(voxels.std(), rel=1e-10)  # population SD, as measured
            assert np.isnan(got["hu_median"])
            assert got["exclusion_reason"] == ""
            assert bool(got["complete"]) is True
            assert np.isnan(got["label"])
            assert (got["age"], got["sex"]) == COVARIATES[subject]
    assert set(rows.loc[rows["structure"] == "kidneys", "group"]) == {"organ"}
    assert set(rows.loc[rows["structure"] == "mixed", "group"]) == {""}  # organ + vessel: no shared group


def test_combined_eroded_mean_is_exact_for_members_of_the_same_shape():
    # mirror-image boxes have the same share of interior voxels: the n_voxels-weighted eroded mean is
    # then the eroded mean of the union
    boxes = {1: np.s_[5:15, 5:12, 5:20], 2: np.s_[25:35, 5:12, 5:20], 3: BOXES[3], 4: BOXES[4]}
    hu, labels = scan(7, boxes)
    rows = combine_structures(cohort({"a": (hu, labels)}), {"kidneys": ["kidney_left", "kidney_right"]})
    interior = interior_mask(labels) & np.isin(labels, [1, 2])
    assert row(rows, "a", "kidneys")["hu_mean_eroded"] == pytest.approx(hu[interior].mean(), rel=1e-12)


def test_a_missing_member_leaves_the_combined_value_undefined():
    full = scan(1, BOXES)
    no_right = scan(2, {k: v for k, v in BOXES.items() if k != 2})  # kidney_right absent
    hu, labels = scan(3, {**BOXES, 2: np.s_[20:33, 5:14, 0:25]})  # kidney_right touches the border
    rows = combine_structures(cohort({"a": full, "b": no_right, "c": (hu, labels)}), COMBINED)

    absent = row(rows, "b", "kidneys")
    assert absent[["volume_ml", "hu_mean", "hu_std", "hu_mean_eroded"]].isna().all()
    assert absent["exclusion_reason"] == MEMBER_MISSING
    assert pd.isna(absent["complete"])
    assert absent["n_voxels"] == np.prod([10, 7, 15])  # the present member's voxels only

    # cut off: no volume (half a pair is not the pair), the HU of the visible voxels as for the member
    cut = row(rows, "c", "kidneys")
    assert np.isnan(cut["volume_ml"])
    assert cut["hu_mean"] == pytest.approx(hu[np.isin(labels, [1, 2])].mean(), rel=1e-12)
    assert cut["exclusion_reason"] == MEMBER_MISSING
    assert bool(cut["complete"]) is False
    # a combination whose members are all measured is unaffected
    assert row(rows, "b", "mixed")["exclusion_reason"] == ""
    assert row(rows, "c", "mixed")["exclusion_reason"] == ""


def test_add_combined_appends_rows_that_the_statistics_read_like_any_structure(tmp_path):
    from scipy import stats

    from ctcohort.stats import age_correlations

    # kidney_left grows with age, kidney_right shrinks faster: the sum falls
    sizes = {"a": (10, 13), "b": (12, 9), "c": (14, 4)}
    scans = {
        s: scan(seed, {**BOXES, 1: np.s_[5 : 5 + sizes[s][0], 5:12, 5:20], 2: np.s_[20 : 20 + sizes[s][1], 5:14, 5:25]})
        for seed, s in enumerate(COVARIATES, start=1)
    }
    base = cohort(scans)
    table = add_combined(base, COMBINED)
    assert len(table) == len(base) + len(COVARIATES) * len(COMBINED)
    pd.testing.assert_frame_equal(table.iloc[: len(base)].reset_index(drop=True), base, check_dtype=False)
    path = tmp_path / "measurements.tsv"
    table.to_csv(path, sep="\t", index=False, na_rep="NaN", float_format="%.10g")
    back = pd.read_csv(path, sep="\t")
    result = age_correlations(back, ["volume_ml", "hu_mean"], min_n=3, partial_covariates=[])
    got = result.set_index(["structure", "measure"]).loc[("kidneys", "volume_ml")]
    kidneys = (
        base[base["structure"].str.startswith("kidney")]
        .groupby("subject")
        .agg(age=("age", "first"), volume=("volume_ml", "sum"))
    )
    assert got["n"] == 3
    assert got["rs"] == pytest.approx(stats.spearmanr(kidneys["age"], kidneys["volume"]).statistic)
    assert got["group"] == "organ"


def test_unknown_members_are_skipped_and_name_clashes_are_errors(caplog):
    base = cohort({"a": scan(1, BOXES)})
    with caplog.at_level(logging.WARNING):
        rows = combine_structures(base, {"hips": ["hip_left", "hip_right"], **COMBINED})
    assert set(rows["structure"]) == set(COMBINED)
    assert "hips" in caplog.text and "hip_left" in caplog.text
    assert add_combined(base, {}).equals(base)
    with pytest.raises(ValueError, match="spleen"):
        combine_structures(base, {"spleen": ["kidney_left", "kidney_right"]})


def test_default_combinations_name_structures_of_the_paper_table():
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    combined = config["statistics"]["combined"]
    names = set(load_structure_table("total_v1")["name"])
    for name, members in combined.items():
        assert name not in names
        assert len(members) >= 2 and set(members) <= names, name
