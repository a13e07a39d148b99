"""One scan per patient: the rule that chooses it, and what the statistics then count."""

import numpy as np
import pandas as pd
import pytest

from ctcohort.patients import PatientSettings, choose_scans, cross_sectional, patient_counts, patient_of, scan_selection


def scans(**columns) -> pd.DataFrame:
    return pd.DataFrame(columns)


def chosen(table: pd.DataFrame) -> list[str]:
    return table.loc[table["chosen"], "subject"].tolist()


def test_without_a_patient_column_every_scan_is_its_own_patient():
    table = choose_scans(scans(subject=["a", "b", "c"], age=[50, 60, 70]))
    assert chosen(table) == ["a", "b", "c"]
    assert table["patient"].tolist() == ["a", "b", "c"]
    assert (table["scans_of_patient"] == 1).all()


def test_a_blank_patient_cell_is_its_own_patient():
    frame = scans(subject=["a", "b", "c"], patient=["p1", np.nan, " "], age=[50, 60, 70])
    assert patient_of(frame).tolist() == ["p1", "b", "c"]


@pytest.mark.parametrize("rule, expected", [("first", ["s2", "s4"]), ("last", ["s3", "s4"])])
def test_first_and_last_by_age(rule, expected):
    frame = scans(subject=["s1", "s2", "s3", "s4"], patient=["p", "p", "p", "q"], age=[61, 60, 63, 40])
    table = choose_scans(frame, PatientSettings(rule))
    assert chosen(table) == expected
    assert table["scans_of_patient"].tolist() == [3, 3, 3, 1]


def test_years_since_first_study_orders_before_age():
    # ages rounded to whole years tie; the sheet's years column tells the order
    frame = scans(subject=["s1", "s2", "s3"], patient=["p"] * 3, age=[60, 60, 60], years=[0.8, 0.0, 0.4])
    assert chosen(choose_scans(frame, PatientSettings("first"))) == ["s2"]
    assert chosen(choose_scans(frame, PatientSettings("last"))) == ["s1"]


def test_ties_go_to_the_scan_listed_first():
    frame = scans(subject=["s1", "s2"], patient=["p", "p"], age=[60, 60])
    assert chosen(choose_scans(frame, PatientSettings("first"))) == ["s1"]
    assert chosen(choose_scans(frame, PatientSettings("last"))) == ["s1"]


def test_a_scan_with_an_age_is_preferred_to_one_without():
    frame = scans(subject=["s1", "s2", "s3"], patient=["p", "p", "q"], age=[np.nan, 70, np.nan])
    table = choose_scans(frame, PatientSettings("first"))
    assert chosen(table) == ["s2", "s3"]  # q has no scan with an age and keeps its only one


def test_random_is_seeded_and_stable_when_the_cohort_grows():
    rng = np.random.default_rng(5)
    frame = scans(
        subject=[f"s{i}" for i in range(300)], patient=[f"p{i // 3}" for i in range(300)], age=rng.uniform(20, 90, 300)
    )
    one = chosen(choose_scans(frame, PatientSettings("random", seed=7)))
    assert one == chosen(choose_scans(frame, PatientSettings("random", seed=7)))
    assert one != chosen(choose_scans(frame, PatientSettings("random", seed=8)))
    assert len(one) == 100
    # neither always the first nor always the last of each patient's three
    positions = pd.Series([int(s[1:]) % 3 for s in one]).value_counts()
    assert set(positions.index) == {0, 1, 2} and positions.min() > 15
    # more patients join: the others keep their choice
    grown = pd.concat([frame, scans(subject=["t1", "t2"], patient=["new", "new"], age=[30, 31])])
    assert set(one) <= set(chosen(choose_scans(grown.reset_index(drop=True), PatientSettings("random", seed=7))))


def test_unknown_rule():
    with pytest.raises(ValueError, match="scan_per_patient must be one of first, last, random"):
        PatientSettings("median")


def test_cross_sectional_keeps_every_structure_of_the_chosen_scans_and_counts():
    frame = scans(subject=["s1", "s2", "s3"], patient=["p", "p", "q"], age=[50, 52, 40])
    long = frame.loc[frame.index.repeat(2)].assign(structure=["liver", "spleen"] * 3).reset_index(drop=True)
    selection = scan_selection(long)
    table = cross_sectional(long, selection)
    assert table["subject"].tolist() == ["s1", "s1", "s3", "s3"]
    assert patient_counts(selection) == {"scans": 3, "patients": 2, "patients_with_repeats": 1, "patients_with_age": 2}


def test_cross_sectional_reads_a_written_selection(tmp_path):
    from ctcohort.patients import read_cross_sectional
    from ctcohort.tables import STATS_DIGITS, write_tsv

    frame = scans(
        subject=["001", "002"],
        patient=["7", "7"],
        age=[50, 52],
        structure=["liver", "liver"],
        volume_ml=[1500.0, 1490.0],
    )
    frame.to_csv(tmp_path / "m.tsv", sep="\t", index=False)
    write_tsv(scan_selection(frame), tmp_path / "s.tsv", STATS_DIGITS)
    table = read_cross_sectional(tmp_path / "m.tsv", tmp_path / "s.tsv")
    assert table["subject"].astype(str).tolist() == ["001"]
