"""Several segmentation models per scan: the study's models and structure names, the batch job segmenting
with each, and a study of two models end to end."""

import json

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from conftest import run_workflow

from ctcohort import phantom
from ctcohort.columns import MODEL_COLUMN
from ctcohort.measure import measure_files, read_measurements
from ctcohort.qc import QCSettings, read_qc
from ctcohort.segment import BatchMeasurement, SegmentationSettings, segment_batch
from ctcohort.structures import load_structure_table
from ctcohort.study_models import (
    label_map_path,
    study_models,
    study_structure_table,
    with_segmentation_model,
)


@pytest.fixture
def body_table(tmp_path):
    """A second model's table: two names of its own and one (liver) that total_v1 has too."""
    path = tmp_path / "body.csv"
    path.write_text("label,name,group\n1,body_trunc,\n2,skin,\n3,liver,organ\n")
    return str(path)


def test_one_model_keeps_the_names_and_adds_no_column():
    (model,) = study_models("/models/ts", "total", "total_v1")
    table = study_structure_table([model])
    assert model.name is None and model.folder == "/models/ts" and model.task == "total"
    assert MODEL_COLUMN not in table.columns
    assert table["name"].tolist() == load_structure_table("total_v1")["name"].tolist()
    assert label_map_path("s1", model) == "results/seg/s1.nii.gz"


def test_a_later_model_names_only_the_structures_an_earlier_one_has(body_table):
    models = study_models(
        {"total": "/models/ts", "body": {"folder": "/models/body", "task": 299}},
        "total",
        {"total": "total_v1", "body": body_table},
    )
    assert [(m.name, m.folder, m.task) for m in models] == [
        ("total", "/models/ts", "total"),
        ("body", "/models/body", 299),
    ]
    table = study_structure_table(models)
    body = table[table[MODEL_COLUMN] == "body"]
    assert body["name"].tolist() == ["body_trunc", "skin", "body:liver"]
    assert "liver" in table.loc[table[MODEL_COLUMN] == "total", "name"].tolist()
    assert table["name"].is_unique  # one key per structure downstream
    assert label_map_path("s1", models[1]) == "results/seg/body/s1.nii.gz"
    # the model's own table keeps the names its dataset.json gives (the label map's header)
    assert models[1].table["name"].tolist() == ["body_trunc", "skin", "liver"]


@pytest.mark.parametrize(
    "model, structures, message",
    [
        ({"1st": "/m"}, "total_v1", "must start with a letter"),
        ({"total": "/m", "body": "/b"}, {"total": "total_v1"}, "no table for model 'body'"),
        ({"total": "/m"}, {"total": "total_v1", "bdy": "total_v1"}, "bdy is not a model"),
        ("/m", {"total": "total_v1"}, "segmentation.model names one folder"),
        ({}, "total_v1", "empty mapping"),
        ({"total": {"task": 297}}, "total_v1", "give a folder"),
    ],
)
def test_a_bad_model_mapping_names_the_key(model, structures, message):
    with pytest.raises(ValueError, match=message):
        study_models(model, None, structures)


def test_statistics_get_each_structures_model_before_it():
    measurements = pd.DataFrame(
        {
            "subject": ["a", "a", "a"],
            MODEL_COLUMN: ["total", "total", "body"],
            "structure": ["liver", "kidneys", "skin"],
        }
    )
    table = pd.DataFrame(
        {"structure": ["skin", "liver", "kidneys"], "group": ["", "organ", "organ"], "rs": [0.1, 0.2, 0.3]}
    )
    out = with_segmentation_model(table, measurements)
    assert out.columns.tolist() == [MODEL_COLUMN, "structure", "group", "rs"]
    assert out[MODEL_COLUMN].tolist() == ["body", "total", "total"]
    assert with_segmentation_model(table, measurements.drop(columns=MODEL_COLUMN)) is table


@pytest.fixture(scope="module")
def phantom_scan(tmp_path_factory):
    folder = tmp_path_factory.mktemp("scan")
    ct, _, affine = phantom.render_subject(phantom.draw_subject(seed=11, index=0), spacing=(6.0, 5.0, 8.0))
    nib.save(nib.Nifti1Image(ct, affine), folder / "ct.nii.gz")
    return folder / "ct.nii.gz"


@pytest.mark.slow
def test_the_batch_job_segments_and_measures_with_each_model(phantom_scan, tmp_path):
    outputs = [[tmp_path / "demo" / "a.nii.gz", tmp_path / "copy" / "a.nii.gz"]]
    measurement = BatchMeasurement(
        [tmp_path / "a.tsv"],
        [tmp_path / "a.measure.json"],
        qc_tables=[tmp_path / "a.qc.tsv"],
        settings=QCSettings(min_voxels=5),
    )
    segment_batch(
        ["a"],
        [phantom_scan],
        outputs,
        [tmp_path / "a.json"],
        model={"demo": "", "copy": ""},
        structures="total_v1",
        measurement=measurement,
        settings=SegmentationSettings(device="cpu", precision="float32", threads=1),
    )
    assert json.loads((tmp_path / "a.json").read_text())["ok"]
    first, second = (np.asanyarray(nib.load(p).dataobj) for p in outputs[0])
    assert first.any() and np.array_equal(first, second)  # the same weights under two names
    table = read_measurements(tmp_path / "a.tsv")
    demo, copy = (table[table[MODEL_COLUMN] == name] for name in ("demo", "copy"))
    assert len(demo) == len(copy) == len(load_structure_table("total_v1"))
    assert (copy["structure"] == "copy:" + demo["structure"].to_numpy()).all()
    # each model's rows equal a measurement of its label map from the files
    from_files = measure_files(phantom_scan, outputs[0][1], load_structure_table("total_v1"), min_voxels=5)
    assert np.allclose(copy["volume_ml"].to_numpy(), from_files["volume_ml"].to_numpy(), equal_nan=True)
    assert (from_files["n_voxels"] > 0).sum() > 5
    qc = read_qc(tmp_path / "a.qc.tsv")
    assert qc["structure"].is_unique and len(qc) == len(table)


@pytest.mark.slow
def test_a_study_of_two_models_has_both_in_every_table(tmp_path):
    """The bundled model under two names: equal values, every table downstream keyed by the study's names."""
    # the tables and statistics that carry the model column, and a figure that reads them (Methods: test_methods)
    run_workflow(
        tmp_path,
        {"demo": {"n_subjects": 4, "seed": 3}, "segmentation": {"model": {"demo": "", "again": ""}}},
        "results/tables/qc.tsv",
        *(f"results/stats/{name}.tsv" for name in ("by_sex", "partial_correlations", "regression", "longitudinal")),
        "results/figures/rs_forest_plot.png",
    )
    measurements = pd.read_csv(tmp_path / "results/tables/measurements.tsv", sep="\t")
    by_model = {
        name: rows.set_index(["subject", rows["structure"].str.removeprefix(f"{name}:")])
        for name, rows in measurements.groupby(MODEL_COLUMN)
    }
    assert set(by_model) == {"demo", "again"} and by_model["again"].index.isin(by_model["demo"].index).all()
    shared = by_model["again"].index
    assert np.allclose(
        by_model["demo"].loc[shared, "volume_ml"], by_model["again"].loc[shared, "volume_ml"], equal_nan=True
    )
    assert (tmp_path / "results/seg/again/demo001.nii.gz").exists()
    assert not list((tmp_path / "results/seg").glob("*.nii.gz"))  # each model's label maps in its folder
    qc = pd.read_csv(tmp_path / "results/tables/qc.tsv", sep="\t")
    assert set(qc[MODEL_COLUMN]) == {"demo", "again"}
    correlations = pd.read_csv(tmp_path / "results/stats/age_correlations.tsv", sep="\t")
    again = correlations[correlations[MODEL_COLUMN] == "again"]
    assert len(again) and again["structure"].str.startswith("again:").all()
    for name in ("by_sex", "partial_correlations", "regression", "longitudinal"):
        table = pd.read_csv(tmp_path / f"results/stats/{name}.tsv", sep="\t")
        assert table.columns[0] == MODEL_COLUMN and set(table[MODEL_COLUMN]) == {"demo", "again"}, name
