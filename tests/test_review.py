"""The sanity checks, the review score and the reviewer's decisions (review.py), and the geometry they are made
from (qc.structure_geometry), on tables and arrays whose answers are known."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from scipy import ndimage, stats

from ctcohort.columns import HU_COLUMNS
from ctcohort.qc import ONE_PIECE, QCSettings, geometry_strides, structure_geometry
from ctcohort.review import (
    REVIEW_REASON,
    apply_review_decisions,
    check_decisions,
    count_sentence,
    laterality_flags,
    review_column,
    review_flags,
    review_scans,
    sanity_flags,
    twin_name,
    vertebra_order_flags,
    volume_z,
)

REPO = Path(__file__).resolve().parents[1]
LUMBAR = ["vertebrae_T12", "vertebrae_L1", "vertebrae_L2", "vertebrae_L3", "vertebrae_L4"]


def spine(subject, z_by_name, n_voxels=1000):
    return pd.DataFrame(
        {
            "subject": subject,
            "structure": list(z_by_name),
            "n_voxels": n_voxels,
            "centroid_z_mm": list(z_by_name.values()),
        }
    )


def test_qc_settings_defaults_are_the_shipped_config():
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    assert QCSettings.from_config(config) == QCSettings()
    assert QCSettings.from_config({**config, "qc": {**config["qc"], "preview": False}}).preview_width is None
    assert QCSettings().per_scan() == {"border_margin": 3, "min_voxels": 10, "preview_width": 600}
    with pytest.raises(ValueError, match="volume_outlier_min_scans"):
        QCSettings(volume_outlier_min_scans=2)


# --- geometry ---------------------------------------------------------------------------------------------


def test_centres_of_mass_in_world_millimetres_match_scipy_on_a_flipped_affine():
    rng = np.random.default_rng(3)
    labels = np.zeros((60, 50, 40), np.uint8)
    labels[5:20, 10:30, 3:9] = 1
    labels[30:55, 2:12, 20:39] = 2
    labels[rng.random(labels.shape) < 0.01] = 3  # scattered voxels: the grid samples them
    affine = np.array([[-0.7, 0, 0, 10.0], [0, 0.7, 0, -5.0], [0, 0, 2.5, 100.0], [0, 0, 0, 1]])
    assert geometry_strides(affine) == (4, 4, 1)
    table = structure_geometry(
        labels, affine, [1, 2, 3, 4], ["liver", "spleen", "colon", "stomach"], [True, True, True, False]
    )
    for row, label in ((0, 1), (1, 2)):
        centre = np.append(ndimage.center_of_mass(labels == label), 1.0)
        expected = (affine @ centre)[:3]
        # on every 4th voxel along x and y (2.8 mm): within a grid step of the exact centre
        assert table.loc[row, ["centroid_x_mm", "centroid_y_mm", "centroid_z_mm"]].to_numpy() == pytest.approx(
            expected, abs=2.8
        )
    assert table.loc[3].isna().all()  # not present
    assert np.isnan(table.loc[2, "second_piece_ml"])  # colon: not a one-piece structure
    assert table.loc[0, "second_piece_ml"] == 0 and table.loc[1, "second_piece_ml"] == 0


def test_second_piece_volume_on_a_fine_grid():
    # a 0.5 mm grid is checked on every 6th voxel: a 12 mm cube on the grid is 4^3 points of 3 mm, 1.728 ml
    labels = np.zeros((120, 60, 60), np.uint8)
    labels[0:48, 0:48, 0:48] = 5  # the liver's main piece
    labels[84:108, 24:48, 24:48] = 5  # a 12 mm cube apart from it
    affine = np.diag([0.5, 0.5, 0.5, 1.0])
    assert geometry_strides(affine) == (6, 6, 6)
    table = structure_geometry(labels, affine, [5], ["liver"], [True])
    assert table.loc[0, "second_piece_ml"] == pytest.approx(12.0**3 / 1000)
    assert "liver" in ONE_PIECE and "colon" not in ONE_PIECE


# --- the checks -------------------------------------------------------------------------------------------


def test_twin_names():
    assert twin_name("kidney_left", "left", "right") == "kidney_right"
    assert twin_name("rib_left_3", "left", "right") == "rib_right_3"
    assert twin_name("lung_upper_lobe_left", "left", "right") == "lung_upper_lobe_right"
    assert twin_name("liver", "left", "right") is None


def test_laterality_flags_both_twins_of_a_swapped_pair_and_respects_the_margin():
    qc = pd.DataFrame(
        {
            "subject": ["a", "a", "b", "b", "b", "b", "c"],
            "structure": [
                "kidney_left",
                "kidney_right",
                "kidney_left",
                "kidney_right",
                "rib_left_3",
                "rib_right_3",
                "kidney_left",
            ],
            # RAS+: x grows to the subject's right, so a left kidney has the smaller x
            "centroid_x_mm": [-70.0, 70.0, 68.0, -72.0, -90.0, 91.0, 5.0],
        }
    )
    assert laterality_flags(qc).tolist() == [False, False, True, True, False, False, False]
    # a left structure 3 mm right of its twin: flagged at margin 0, not at margin 5
    near = pd.DataFrame(
        {
            "subject": ["d", "d", "e", "e", "f", "f"],
            "structure": ["iliopsoas_left", "iliopsoas_right"] * 3,
            "centroid_x_mm": [1.0, -2.0, -60.0, 60.0, -61.0, 59.0],
        }
    )
    assert laterality_flags(near, 0.0).tolist()[:2] == [True, True]
    assert laterality_flags(near, 5.0).tolist()[:2] == [False, False]


def test_a_pair_on_the_wrong_side_in_most_scans_is_a_mirrored_cohort_not_a_flag(caplog):
    qc = pd.DataFrame(
        {
            "subject": np.repeat(["a", "b", "c"], 2),
            "structure": ["kidney_left", "kidney_right"] * 3,
            "centroid_x_mm": [75.0, -75.0, 74.0, -76.0, -70.0, 70.0],
        }
    )
    with caplog.at_level("WARNING", logger="ctcohort.review"):
        assert not laterality_flags(qc).any()
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "look mirrored" in warnings[0].getMessage()
    assert "kidney_left 67%, kidney_right 67%" in warnings[0].getMessage()


def test_vertebra_order_flags_the_vertebrae_of_an_inversion():
    z = dict(zip(LUMBAR, [400.0, 370.0, 340.0, 310.0, 280.0]))
    normal = spine("ok", z)
    swapped = spine("swapped", {**z, "vertebrae_L1": 310.0, "vertebrae_L3": 370.0})
    table = pd.concat([normal, swapped], ignore_index=True)
    flags = vertebra_order_flags(table)
    assert not flags[:5].any()
    assert dict(zip(swapped["structure"], flags[5:])) == {
        "vertebrae_T12": False,
        "vertebrae_L1": True,
        "vertebrae_L2": True,
        "vertebrae_L3": True,
        "vertebrae_L4": False,
    }


def test_vertebra_order_ignores_small_inversions_and_tiny_vertebrae():
    z = dict(zip(LUMBAR, [400.0, 370.0, 372.0, 310.0, 280.0]))  # L2 2 mm above L1: within the 5 mm margin
    assert not vertebra_order_flags(spine("a", z)).any()
    assert vertebra_order_flags(spine("a", z), margin_mm=1.0).sum() == 2
    tiny = spine("b", {**z, "vertebrae_L2": 340.0, "vertebrae_L4": 450.0})
    tiny.loc[tiny["structure"] == "vertebrae_L4", "n_voxels"] = 5  # below min_voxels: not compared
    assert not vertebra_order_flags(tiny, min_voxels=10).any()


def _volumes(n, rng, sex="F", age=55.0, structure="liver"):
    return pd.DataFrame(
        {
            "subject": [f"{sex}{age}_{i}" for i in range(n)],
            "structure": structure,
            "volume_ml_measured": np.exp(rng.normal(7.3, 0.15, n)),
            "complete": True,
            "exclusion_reason": "",
            "sex": sex,
            "age": age,
        }
    )


def test_volume_z_is_the_robust_z_of_the_log_volume_within_sex_and_decade():
    rng = np.random.default_rng(7)
    table = pd.concat(
        [_volumes(30, rng, "F", 55.0), _volumes(25, rng, "M", 52.0), _volumes(8, rng, "M", 71.0)], ignore_index=True
    )
    table.loc[3, "volume_ml_measured"] *= 3.0
    z = volume_z(table, min_scans=20)
    women = np.log(table.loc[:29, "volume_ml_measured"].to_numpy())
    expected = (women - np.median(women)) / stats.median_abs_deviation(women, scale="normal")
    assert z[:30] == pytest.approx(expected)
    assert z[3] > 5
    # the 8 men in their seventies are too few for their decade: the men of any age are their reference
    men = np.log(table.loc[30:, "volume_ml_measured"].to_numpy())
    expected_men = (men - np.median(men)) / stats.median_abs_deviation(men, scale="normal")
    assert z[55:] == pytest.approx(expected_men[25:])
    assert np.isnan(volume_z(table, min_scans=40)).all()


def test_volume_z_leaves_cut_off_and_absent_structures_out():
    rng = np.random.default_rng(8)
    table = _volumes(25, rng)
    table.loc[0, "complete"] = False
    table.loc[1, "exclusion_reason"] = "absent"
    table.loc[1, "volume_ml_measured"] = 0.0
    z = volume_z(table, min_scans=20)
    assert np.isnan(z[:2]).all() and np.isfinite(z[2:]).all()


def test_sanity_flags_fragments_and_orientation():
    qc = pd.DataFrame(
        {
            "subject": ["a", "a", "b"],
            "structure": ["liver", "spleen", "liver"],
            "n_voxels": 100,
            "centroid_x_mm": 0.0,
            "centroid_z_mm": 0.0,
            "second_piece_ml": [0.5, 2.0, np.nan],
            "sform_qform_mm": [np.nan, np.nan, 10.0],
            "volume_ml_measured": 1000.0,
            "complete": True,
            "exclusion_reason": "",
        }
    )
    flags = sanity_flags(qc, QCSettings(fragment_min_ml=1.0))
    assert flags["fragments"].tolist() == [False, True, False]
    assert flags["orientation"].tolist() == [False, False, True]
    assert flags["volume_z"].isna().all() and not flags["volume_outlier"].any()


# --- score and page tables --------------------------------------------------------------------------------


def _cohort_qc():
    rows = []
    for subject in ("s1", "s2", "s3", "s4"):
        for structure in ("kidney_left", "kidney_right", "liver"):
            rows.append(
                {
                    "subject": subject,
                    "structure": structure,
                    "cut_faces": "",
                    "volume_implausible": False,
                    "hu_implausible": False,
                    "laterality": False,
                    "vertebra_order": False,
                    "fragments": False,
                    "volume_outlier": False,
                    "orientation": False,
                    "volume_z": 0.5,
                    "second_piece_ml": 0.0,
                    "sform_qform_mm": np.nan,
                    "centroid_x_mm": 0.0,
                    "centroid_z_mm": 0.0,
                }
            )
    qc = pd.DataFrame(rows)
    qc.loc[(qc["subject"] == "s2") & qc["structure"].str.startswith("kidney"), "laterality"] = True
    qc.loc[(qc["subject"] == "s3") & (qc["structure"] == "liver"), ["volume_outlier", "volume_z"]] = [True, 6.0]
    qc.loc[(qc["subject"] == "s4") & (qc["structure"] == "liver"), "cut_faces"] = "z+"
    return qc


def test_review_scans_ranks_label_mixups_first_and_failed_scans_last():
    qc = _cohort_qc()
    flags = review_flags(qc)
    assert sorted(flags["flag"]) == ["cut_off", "laterality", "laterality", "volume_outlier"]
    assert flags.loc[flags["flag"] == "volume_outlier", "detail"].item() == "robust z = 6.0"
    failures = pd.DataFrame({"subject": ["s5"], "stage": ["segment"], "error": ["out of memory"]})
    scans = review_scans(["s1", "s2", "s3", "s4", "s5"], qc, flags, failures)
    assert scans["subject"].tolist() == ["s2", "s3", "s1", "s4", "s5"]
    assert scans["score"].iloc[0] == pytest.approx(2 * 3 + 0.05)  # two laterality flags + |z| 0.5 / 10
    assert scans["score"].iloc[1] == pytest.approx(1 + 0.6)
    assert scans["n_flags"].tolist() == [2, 1, 0, 0, 0]  # the cut-off weighs nothing
    assert np.isnan(scans["score"].iloc[-1]) and scans["status"].iloc[-1] == "segment: out of memory"


# --- decisions --------------------------------------------------------------------------------------------


def _measurements():
    return pd.DataFrame(
        {
            "subject": ["a", "a", "b", "b"],
            "structure": ["liver", "spleen", "liver", "spleen"],
            "volume_ml": [1500.0, 200.0, 1400.0, 180.0],
            "hu_mean": 50.0,
            "hu_median": 50.0,
            "hu_std": 10.0,
            "hu_mean_eroded": 51.0,
            "exclusion_reason": ["", "cut_off", "", ""],
        }
    )


def _decisions(rows):
    return pd.DataFrame(rows, columns=["subject", "structure", "decision", "reason"])


def test_decisions_exclude_a_structure_or_a_whole_scan_and_accept_changes_nothing():
    decisions = _decisions(
        [("a", "", "exclude", "motion"), ("b", "spleen", "exclude", "swapped"), ("b", "liver", "accept", "")]
    )
    out = apply_review_decisions(_measurements(), decisions)
    assert out["exclusion_reason"].tolist() == [REVIEW_REASON, REVIEW_REASON, "", REVIEW_REASON]
    assert out.loc[[0, 1, 3], ["volume_ml", *HU_COLUMNS]].isna().all().all()
    assert out.loc[2, "volume_ml"] == 1400.0
    assert review_column(_measurements(), decisions).tolist() == ["exclude", "exclude", "accept", "exclude"]
    assert count_sentence(decisions) == (
        "A reviewer excluded 1 scan and 1 further structure measurement after "
        "looking at the QC review page (reviewer_excluded)."
    )
    assert apply_review_decisions(_measurements(), None).equals(_measurements())


def test_decisions_about_unknown_scans_or_structures_name_them():
    decisions = _decisions([("a", "", "exclude", ""), ("zz", "", "exclude", ""), ("b", "livr", "exclude", "")])
    with pytest.raises(ValueError) as err:
        check_decisions(decisions, {"a", "b"}, {"liver", "spleen"}, "decisions.tsv")
    assert str(err.value) == (
        "review decisions decisions.tsv: subject 'zz' is not a scan of the cohort; "
        "structure 'livr' (subject 'b') is not a structure of the table"
    )
