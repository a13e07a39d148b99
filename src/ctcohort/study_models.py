"""The segmentation models of a study: one (``segmentation.model`` a folder, or empty for the bundled model) or
several by name (``segmentation.model`` a mapping name -> folder, or name -> {folder, task}), each scan segmented
by each of them in the same job.

With several models every measurement carries a ``segmentation_model`` column (columns.MODEL_COLUMN), and the label
maps lie in
results/seg/{model}/. A structure is named as in its model's structure table, except where an earlier model of
the mapping has a structure of that name: then it is ``{model}:{name}``, so that adding a model to a study never
renames a structure the study had, and every structure name stays one key for the tables downstream.
"""

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

import pandas as pd

from ctcohort.columns import MODEL_COLUMN
from ctcohort.measure import MeasurementsAndQC
from ctcohort.qc import ScanQC
from ctcohort.structures import load_structure_table, model_structure_name

MODEL_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")  # a folder name in results/seg/ and a table value


@dataclass(frozen=True)
class StudyModel:
    """One segmentation model of the study and the structure table it segments into."""

    name: str | None  # None: the study's only model (its tables have no model column)
    folder: str  # "": the bundled demo model
    task: object  # which models of the folder (segment.task_dataset_ids)
    structures: str  # a structure table (structures.load_structure_table)
    table: pd.DataFrame = field(compare=False, repr=False)  # label, name, group: the names the model gives
    names: dict = field(compare=False, repr=False)  # name in table -> the structure's name in the study


def study_models(model, task, structures) -> list[StudyModel]:
    """The study's models from the config keys ``segmentation.model``, ``segmentation.task`` and ``structures``
    (one table for every model, or a mapping model name -> table). ValueError names the key at fault."""
    if not isinstance(model, Mapping):
        if isinstance(structures, Mapping):
            raise ValueError(
                "structures is a mapping per model, but segmentation.model names one folder: "
                "give structures one table, or segmentation.model a mapping name -> folder"
            )
        table = load_structure_table(structures)
        return [StudyModel(None, model or "", task, str(structures), table, dict(zip(table["name"], table["name"])))]
    if not model:
        raise ValueError("segmentation.model is an empty mapping: name at least one model folder")
    models, taken = [], set()
    for name, spec in model.items():
        if not MODEL_NAME.match(str(name)):
            raise ValueError(
                f"segmentation.model: model name {name!r} must start with a letter and hold only "
                "letters, digits and _ (it names a folder of results/seg/)"
            )
        folder, model_task = _folder_and_task(name, spec, task)
        table_spec = _table_spec(name, structures, model)
        table = load_structure_table(table_spec)
        names = {n: n if n not in taken else model_structure_name(name, n) for n in table["name"]}
        taken.update(names.values())
        models.append(StudyModel(str(name), folder, model_task, str(table_spec), table, names))
    return models


def _folder_and_task(name, spec, task):
    if isinstance(spec, Mapping):
        unknown = set(spec) - {"folder", "task"}
        if unknown or "folder" not in spec:
            raise ValueError(
                f"segmentation.model.{name}: give a folder, or {{folder: ..., task: ...}} "
                f"(not {sorted(unknown) or 'no folder'})"
            )
        return str(spec["folder"]), spec.get("task", task)
    return str(spec or ""), task


def _table_spec(name, structures, model):
    if not isinstance(structures, Mapping):
        return structures
    if name not in structures:
        raise ValueError(
            f"structures: no table for model {name!r} (structures names {', '.join(map(str, structures))})"
        )
    extra = sorted(set(map(str, structures)) - set(map(str, model)))
    if extra:
        raise ValueError(f"structures: {', '.join(extra)} is not a model of segmentation.model")
    return structures[name]


def study_structure_table(models: list[StudyModel]) -> pd.DataFrame:
    """Every structure of the study: label, name (the study's), group, and its model where there are several."""
    return pd.concat([with_model_column(measuring_table(m), m) for m in models], ignore_index=True)


def measuring_table(model: StudyModel) -> pd.DataFrame:
    """The model's structure table with each structure under its name in the study (what its measurements say)."""
    return model.table.assign(name=model.table["name"].map(model.names))


def label_map_path(subject: str, model: StudyModel) -> str:
    """Where the workflow writes the scan's label map from ``model``."""
    return f"results/seg/{subject}.nii.gz" if model.name is None else f"results/seg/{model.name}/{subject}.nii.gz"


def with_model_column(frame: pd.DataFrame, model: StudyModel) -> pd.DataFrame:
    """``frame`` with the model's name as its first column, MODEL_COLUMN (none for the study's only model)."""
    return frame if model.name is None else frame.assign(**{MODEL_COLUMN: model.name})[[MODEL_COLUMN, *frame.columns]]


def models_measurements_and_qc(results: list[MeasurementsAndQC], models: list[StudyModel]) -> MeasurementsAndQC:
    """One scan's measurements and QC from each model in one table each, the preview of the first model."""
    if len(results) == 1:
        return results[0]
    measurements = pd.concat([with_model_column(r.measurements, m) for r, m in zip(results, models)], ignore_index=True)
    qc = pd.concat([with_model_column(r.qc.table, m) for r, m in zip(results, models)], ignore_index=True)
    return MeasurementsAndQC(measurements, ScanQC(qc, results[0].qc.preview))


def models_description(models: list[StudyModel]) -> str:
    """The structure tables in words, without paths: "total_v2", or "total: total_v2; body: body.csv"."""

    def table_name(model):
        return os.path.basename(model.structures)

    if len(models) == 1:
        return table_name(models[0])
    return "; ".join(f"{m.name}: {table_name(m)}" for m in models)


def with_segmentation_model(table: pd.DataFrame, measurements: pd.DataFrame) -> pd.DataFrame:
    """A table of the statistics, one row per structure and more, with the model of each structure (from
    ``measurements``) before its structure column; unchanged in a study of one model."""
    if MODEL_COLUMN not in measurements.columns or MODEL_COLUMN in table.columns:
        return table
    model_of = measurements.drop_duplicates("structure").set_index("structure")[MODEL_COLUMN]
    at = list(table.columns).index("structure")
    return pd.concat(
        [table.iloc[:, :at], table["structure"].map(model_of).rename(MODEL_COLUMN), table.iloc[:, at:]], axis=1
    )
