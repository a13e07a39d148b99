"""The phantom cohort: anatomy, planted effects, determinism, files."""

import dataclasses
import itertools

import nibabel as nib
import numpy as np
import pytest
from conftest import SHEET_SCHEMA, real_example_v1

from ctcohort import phantom
from ctcohort.cli import main
from ctcohort.measure import measure_files
from ctcohort.sheet import load_cohort_sheet
from ctcohort.structures import load_structure_table

# The paper's 12 reported correlations, as phantom structures and measures (Wasserthal et al. 2023).
PAPER_EFFECTS = {
    ("aorta", "volume_ml"): +1,
    ("iliac_artery_left", "volume_ml"): +1,
    ("kidney_left", "volume_ml"): -1,
    ("pancreas", "volume_ml"): -1,
    ("iliopsoas_left", "volume_ml"): -1,
    ("autochthon_left", "hu_mean"): -1,
    ("gluteus_minimus_left", "hu_mean"): -1,
    ("gluteus_medius_left", "hu_mean"): -1,
    ("gluteus_maximus_left", "hu_mean"): -1,
    ("hip_left", "hu_mean"): -1,
    ("vertebrae_L4", "hu_mean"): -1,
    ("clavicula_left", "hu_mean"): -1,
}


def test_truth_has_the_papers_directions_null_controls_and_all_groups():
    truth = phantom.truth_table()
    direction = truth.set_index(["structure", "measure"])["direction"]
    for key, sign in PAPER_EFFECTS.items():
        assert direction[key] == sign, key
        assert direction[(key[0].replace("_left", "_right"), key[1])] == sign
    per_structure = truth.groupby("structure")["direction"].apply(lambda d: (d == 0).all())
    assert per_structure.sum() >= 5, "null controls: structures with no age effect at all"
    groups = load_structure_table("total_v1").set_index("name").loc[truth["structure"].unique(), "group"]
    assert set(groups) == {"organ", "bone", "muscle", "vessel"}
    assert truth["structure"].nunique() >= 20
    assert set(truth["measure"]) == {"volume_ml", "hu_mean"}


def test_structures_never_overlap_even_at_their_largest():
    shape, affine = phantom._grid((2.0, 2.0, 2.0), "")
    masks = {}
    for s in phantom.ANATOMY:
        box, mask = phantom.rasterize(s, phantom.MAX_VOLUME_FACTOR, affine, shape)
        full = np.zeros(shape, bool)
        full[box] = mask
        assert full.any(), s.name
        masks[s.name] = full
    for a, b in itertools.combinations(masks, 2):
        assert not (masks[a] & masks[b]).any(), f"{a} overlaps {b}"


def test_covariates_are_stable_when_the_cohort_grows():
    small, large = phantom.covariates(10, seed=4), phantom.covariates(30, seed=4)
    assert small.equals(large.head(10))
    assert not small.equals(phantom.covariates(10, seed=5))
    assert large["age"].between(18, 95).all()
    assert set(large["sex"]) == {"M", "F"} and set(large["contrast"]) <= {0, 1}


def test_render_is_deterministic_int16_with_v1_labels():
    draw = phantom.draw_subject(seed=2, index=0)
    ct, labels, affine = phantom.render_subject(draw)
    ct2, labels2, _ = phantom.render_subject(phantom.draw_subject(seed=2, index=0))
    assert ct.dtype == np.int16 and labels.dtype == np.uint8
    np.testing.assert_array_equal(ct, ct2)
    np.testing.assert_array_equal(labels, labels2)
    v1 = load_structure_table("total_v1").set_index("name")["label"]
    expected = {v1[s.name] for s in phantom.ANATOMY if not (s.name == "gallbladder" and draw.gallbladder_removed)}
    assert set(np.unique(labels)) - {0} == expected
    np.testing.assert_allclose(np.diag(affine)[:3], phantom.DEFAULT_SPACING)
    # tissue looks like CT: air outside, fat in the body, bone bright
    assert ct[0, 0, 0] < -900
    hip = labels == v1["hip_left"]
    assert ct[hip].mean() > 200


def _centroid_x_mm(labels, affine, label):
    return (affine[:3, :3] @ np.argwhere(labels == label).mean(axis=0) + affine[:3, 3])[0]


def test_anatomy_lies_on_the_sides_of_a_real_ct_in_ras():
    """Every structure off the midline of the real example CT (RAS+: the subject's right at x > 0) lies on the
    same side in a phantom scan, within 50 mm: kidney_right on the right, the liver right, the spleen left."""
    real_affine, _, real_labels = real_example_v1()
    _, labels, affine = phantom.render_subject(phantom.draw_subject(seed=1, index=0))
    v1 = load_structure_table("total_v1").set_index("name")["label"]
    compared = []
    for s in phantom.ANATOMY:
        if not (real_labels == v1[s.name]).any():
            continue
        real_x = _centroid_x_mm(real_labels, real_affine, v1[s.name])
        if abs(real_x) > 10.0:
            phantom_x = _centroid_x_mm(labels, affine, v1[s.name])
            assert np.sign(phantom_x) == np.sign(real_x) and abs(phantom_x - real_x) < 50.0, (s.name, phantom_x, real_x)
            compared.append(s.name)
    assert {"kidney_right", "kidney_left", "liver", "spleen", "aorta", "inferior_vena_cava"} <= set(compared)


def _find_subject(seed, predicate, limit=200):
    for index in range(limit):
        draw = phantom.draw_subject(seed, index)
        if predicate(draw):
            return index, draw
    raise AssertionError("no such subject drawn")


@pytest.mark.parametrize("crop, cut", [("top", "clavicula_left"), ("bottom", "gluteus_maximus_left")])
def test_cropped_field_of_view_is_flagged_cut_off(tmp_path, crop, cut):
    index, _ = _find_subject(1, lambda d: d.crop == crop)
    phantom.write_subject(tmp_path, 1, index)
    name = phantom.subject_id(index)
    got = measure_files(
        tmp_path / "ct" / f"{name}.nii.gz", tmp_path / "labels" / f"{name}.nii.gz", load_structure_table("total_v1")
    ).set_index("structure")
    assert got.at[cut, "exclusion_reason"] == "cut_off"
    assert np.isnan(got.at[cut, "volume_ml"])
    assert got.at["liver", "exclusion_reason"] == ""


def test_cli_writes_a_valid_cohort(tmp_path):
    assert main(["phantom", "-n", "3", "--seed", "7", "-o", str(tmp_path)]) == 0
    sheet = load_cohort_sheet(tmp_path / "cohort.tsv", SHEET_SCHEMA, required_files=("ct", "seg", "reference"))
    assert list(sheet["subject"]) == phantom.subject_ids(3)
    ct = nib.load(sheet["ct"].iloc[0])
    assert ct.get_data_dtype() == np.int16
    assert (tmp_path / "truth.tsv").read_text().startswith("structure\tmeasure\tdirection\teffect")


def test_accelerated_agers_follow_age_plus_ten_years():
    """A fifth of the subjects (seeded) carry every age effect ACCELERATED_YEARS ahead; truth_subjects.tsv says who."""
    truth = phantom.subject_truth(500, 1)
    assert 0.15 < truth["accelerated"].mean() < 0.25
    assert (truth["biological_age"] - truth["age"] == phantom.ACCELERATED_YEARS * truth["accelerated"]).all()
    draw = next(d for d in (phantom.draw_subject(1, i) for i in range(50)) if d.accelerated)
    older = dataclasses.replace(draw, age=draw.age + int(phantom.ACCELERATED_YEARS), accelerated=False)
    for k, s in enumerate(phantom.ANATOMY):
        assert phantom._attenuation(s, "muscle", draw, k) == phantom._attenuation(s, "muscle", older, k)
        assert phantom._volume_factor(s, "organ", draw, k) == phantom._volume_factor(s, "organ", older, k)
