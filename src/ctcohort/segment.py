"""Segmentation with nnU-Net v2's predictor: models loaded once, many scans segmented.

A model folder is one of
- an nnU-Net v2 trained model folder (dataset.json, plans.json, fold_N/checkpoint_final.pth),
  label names from its dataset.json;
- a folder of such models (one or two levels down), e.g. TotalSegmentator's weights folder, which holds
  several tasks side by side: Dataset291_... to Dataset295_... (the 5-part 1.5 mm "total"), Dataset297_...
  (3 mm, "total_fast"), Dataset298_... (6 mm, "total_fastest") and others. ``task`` (segmentation.task)
  selects the models of one task: a name from ``TASKS`` (every dataset id of it required) or dataset ids.
  Without it the folder must hold a single model or the models of exactly one known task; anything else is
  refused with a list of what is there. Labels of TotalSegmentator's 5 parts map to global structures
  through its part table (checked against each part's dataset.json), other models' through dataset.json.
Parts run in turn on the same scan and are merged into one label map; where two parts claim a voxel,
the later part (in dataset id order) wins, as in TotalSegmentator.

Geometry: the CT is reoriented to the closest canonical (RAS) orientation, for every model: what
TotalSegmentator does before nnU-Net (its datasets name the NibabelIOWithReorient reader) and what
``ctcohort train`` trains on. Then each part gets the array the way its plans' image_reader_writer hands
it to nnU-Net (``nnunet_adapter.READER_AXES``: every supported reader gives (z, y, x), spacing likewise) and
its plans' transpose_forward, and its labels go back the same way. For the readers that do not reorient
(SimpleITKIO, NibabelIO) this equals nnU-Net's own file-based prediction for scans stored in RAS; a model
trained on scans stored in another orientation would see them mirrored (nnU-Net feeds the stored voxel order).
The label map is returned on the input's exact grid. Resampling (segmentation.resampling): ``trilinear``
resamples the CT to each part's spacing and its logits back (``predict_labels``); ``totalsegmentator`` resamples
the canonical CT once as TotalSegmentator 2.18.0 does, runs the parts on that grid and resamples the merged
labels back with order 0 (``ctcohort.totalseg_geometry``).

nnU-Net's internals live in ``ctcohort.nnunet_adapter`` (section 6, inference), which checks the installed
nnunetv2 version: building each part's predictor (``load_predictor``) and the pre- and postprocessing around
its sliding window, run on the predictor's device (``predict_labels``). This module finds and selects the
model folders, maps labels, merges parts, and reads and writes the files.
"""

import importlib.util
import json
import logging
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

from ctcohort import nnunet_adapter, totalseg_geometry
from ctcohort.imaging import (
    ScanChecks,
    check_ct,
    check_orientation,
    ct_hounsfield,
    load_image,
    sform_qform_disagreement,
    voxel_spacing_mm,
)
from ctcohort.measure import empty_measurements_and_qc, measure_and_qc, write_measurements_and_qc
from ctcohort.nnunet_adapter import READER_AXES, ModelFolderError, load_predictor, predict_labels
from ctcohort.qc import QCSettings
from ctcohort.resources import resources_dir
from ctcohort.scan_status import passed_on_failure, recording_failure, run_scan_step
from ctcohort.study_models import StudyModel, measuring_table, models_measurements_and_qc, study_models

log = logging.getLogger(__name__)

MODEL_FILES = ("dataset.json", "plans.json")
LABELS_EXTENSION_KEY = "ctcohort_labels"
TOTALSEG_PARTS_TABLE = "total_v2_parts.csv"

# TotalSegmentator's published v2 CT tasks by nnU-Net dataset id; segmentation.task names one of them.
TASKS = {
    "total": (291, 292, 293, 294, 295),  # 1.5 mm in five parts: organs, vertebrae, cardiac, muscles, ribs
    "total_fast": (297,),  # 3 mm, the same 117 classes in one model
    "total_fastest": (298,),  # 6 mm, the same
}


@dataclass
class ModelPart:
    """One nnU-Net trained model and where its labels go in the merged map."""

    folder: Path
    dataset_id: int | None
    global_labels: dict[int, int] = field(default_factory=dict)  # part label -> structure label
    reader: str = "SimpleITKIO"  # plans.json's image_reader_writer
    transpose_forward: tuple[int, ...] = (0, 1, 2)  # plans.json's: reader array axes -> network axes

    @property
    def network_axes(self) -> tuple[int, ...]:
        """The RAS voxel axis behind each axis of the network's input."""
        return nnunet_adapter.network_axes(self.reader, self.transpose_forward)


def _checkpoint_files(part: ModelPart, folds: Sequence, checkpoint: str) -> list[Path]:
    return [part.folder / f"fold_{fold}" / checkpoint for fold in folds]


def model_files(parts: Sequence[ModelPart], settings: "SegmentationSettings") -> list[Path]:
    """The files a segmentation depends on: each part's dataset.json, plans.json and fold checkpoints.
    The workflow's segmentation jobs take them as inputs, so that new weights segment the scans again."""
    return [
        path
        for part in parts
        for path in [part.folder / name for name in MODEL_FILES]
        + _checkpoint_files(part, settings.folds, settings.checkpoint)
    ]


def missing_segmentation_packages(packages: Sequence[str] = ("torch", "nnunetv2")) -> str | None:
    """What to install when nnU-Net inference cannot run here (None: all there, nnunetv2 of the version the
    adapter supports). Checked without importing them, so that a workflow stops at start-up, not in its first
    segmentation job."""
    missing = [name for name in packages if importlib.util.find_spec(name) is None]
    if missing:
        return (
            f"segmentation.method nnunet needs {' and '.join(missing)}, which this environment lacks: "
            "pip install -e '.[segment]' (or set segmentation.method: precomputed)"
        )
    if "nnunetv2" in packages:  # present, but maybe not the version the adapter is written against
        return nnunet_adapter.nnunet_version_problem(nnunet_adapter.installed_nnunet_version())
    return None


def _is_trained_model(folder: Path) -> bool:
    return all((folder / name).is_file() for name in MODEL_FILES) and any(folder.glob("fold_*/checkpoint*.pth"))


def _read_json(path: Path) -> dict:
    try:
        content = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ModelFolderError(f"model {path.parent}: {path.name} is not readable JSON ({err})") from err
    if not isinstance(content, dict):
        raise ModelFolderError(f"model {path.parent}: {path.name} is not a JSON object")
    return content


def _dataset_id(folder: Path, plans: dict | None = None) -> int | None:
    """The nnU-Net dataset id a model was trained on: its plans' dataset_name, else its folder's name."""
    names = [str(plans.get("dataset_name", ""))] if plans else []
    for name in names + [folder.name, folder.parent.name]:
        match = re.match(r"Dataset(\d+)_", name)
        if match:
            return int(match.group(1))
    return None


def _describe_expected(model_dir: Path) -> str:
    return (
        f"model folder {model_dir}: expected an nnU-Net v2 trained model folder (dataset.json, plans.json, "
        "fold_0/checkpoint_final.pth), or a folder of such models such as TotalSegmentator's weights "
        "(Dataset291_.../nnUNetTrainerNoMirroring__nnUNetPlans__3d_fullres/ ... Dataset295_..., or "
        "Dataset297_... for the 3 mm model). Nothing is downloaded: put the weights there and point "
        "segmentation.model at the folder"
    )


def bundled_model_dir() -> Path:
    """The bundled demo model (resources/models/demo), trained on phantom scans by ``ctcohort train``."""
    return resources_dir() / "models" / "demo"


def task_dataset_ids(task) -> tuple[str, tuple[int, ...]] | None:
    """(description, dataset ids) of a segmentation.task value; None for none given (None or "").

    A task is a name from ``TASKS``, a dataset id, or a list of dataset ids (ints or digit strings, as the
    command line gives them; a one-element list may also hold a name)."""
    if task is None or (isinstance(task, str) and not task.strip()):
        return None
    if isinstance(task, (list, tuple)) and len(task) == 1:
        task = task[0]
    if isinstance(task, str) and task.strip() in TASKS:
        return f"segmentation.task {task.strip()}", TASKS[task.strip()]
    values = list(task) if isinstance(task, (list, tuple)) else [task]
    ids = []
    for value in values:
        is_id = isinstance(value, int) or (isinstance(value, str) and value.strip().isdigit())
        if isinstance(value, bool) or not is_id:
            raise ModelFolderError(
                f"segmentation.task {task!r}: not a known task ({', '.join(TASKS)}) nor a list of nnU-Net dataset ids"
            )
        ids.append(int(value))
    if not ids:
        return None
    ids = tuple(sorted(set(ids)))
    return f"segmentation.task [{', '.join(map(str, ids))}]", ids


def _known_task(dataset_id: int | None) -> str | None:
    return next((name for name, ids in TASKS.items() if dataset_id in ids), None)


def _id_range(ids: Sequence[int]) -> str:
    ids = sorted(ids)
    if len(ids) > 2 and ids == list(range(ids[0], ids[-1] + 1)):
        return f"datasets {ids[0]}-{ids[-1]}"
    return f"dataset{'s' if len(ids) > 1 else ''} {', '.join(map(str, ids))}"


def _found_models(model_dir: Path) -> list[tuple[Path, dict]]:
    """(folder, plans) of every trained model: ``model_dir`` itself, or those one or two levels below it."""
    if _is_trained_model(model_dir):
        folders = [model_dir]
    else:
        folders = [
            folder
            for pattern in ("*", "*/*")
            for folder in model_dir.glob(pattern)
            if folder.is_dir() and _is_trained_model(folder)
        ]
    found = [(folder, _read_json(folder / "plans.json")) for folder in folders]
    return sorted(found, key=lambda item: (_dataset_id(*item) is None, _dataset_id(*item) or 0, str(item[0])))


def _listing(model_dir: Path, found: Sequence[tuple[Path, dict]]) -> str:
    lines = []
    for folder, plans in found:
        dataset_id = _dataset_id(folder, plans)
        name = folder.relative_to(model_dir) if folder != model_dir else folder.name
        task = _known_task(dataset_id)
        what = (
            "no dataset id"
            if dataset_id is None
            else f"dataset {dataset_id}, "
            + (f"part of task {task}" if task and len(TASKS[task]) > 1 else f"task {task}" if task else "no known task")
        )
        lines.append(f"  {name}: {what}")
    return "\n".join(lines)


def _select(model_dir: Path, found: list[tuple[Path, dict]], task) -> list[tuple[Path, dict]]:
    """The models of ``task`` among those found (see the module docstring); ModelFolderError where unclear."""
    wanted = task_dataset_ids(task)
    ids = [_dataset_id(folder, plans) for folder, plans in found]
    if wanted is None:
        if len(found) == 1:
            return found
        tasks = {_known_task(i) for i in ids}
        if len(tasks) == 1 and None not in tasks:
            name = tasks.pop()
            wanted = f"task {name} (the only task found; segmentation.task not given)", TASKS[name]
        else:
            known = sorted({i for i in ids if i is not None})
            values = []
            for name in (name for name in TASKS if set(TASKS[name]) & set(known)):
                absent = sorted(set(TASKS[name]) - set(known))
                values.append(
                    f"{name} ({_id_range(TASKS[name])}"
                    + (f"; {', '.join(map(str, absent))} missing here" if absent else "")
                    + ")"
                )
            others = [str(i) for i in known if _known_task(i) is None]
            if others:
                values.append(f"dataset ids, e.g. [{', '.join(others)}]")
            raise ModelFolderError(
                f"model folder {model_dir} holds {len(found)} models, not one model or the models of one task, and "
                "segmentation.task (ctcohort segment --task) does not say which to run:\n"
                f"{_listing(model_dir, found)}\n"
                f"set segmentation.task to {' or '.join(values) if values else 'their dataset ids'}"
                + (
                    "; a model without a dataset id is run by pointing segmentation.model at its own folder"
                    if None in ids
                    else ""
                )
            )
    description, wanted_ids = wanted
    selected = [(f, p) for (f, p), i in zip(found, ids) if i in wanted_ids]
    missing = sorted(set(wanted_ids) - {i for i in ids if i is not None})
    if missing:
        present = sorted({i for i in ids if i is not None})
        raise ModelFolderError(
            f"model folder {model_dir}: {description} needs dataset{'s' if len(wanted_ids) > 1 else ''} "
            f"{', '.join(map(str, wanted_ids))}; missing {', '.join(map(str, missing))} "
            f"(found: {', '.join(map(str, present)) or 'no model with a dataset id'}):\n{_listing(model_dir, found)}"
        )
    chosen = [i for i in ids if i in wanted_ids]
    doubled = sorted({i for i in chosen if chosen.count(i) > 1})
    if doubled:
        raise ModelFolderError(
            f"model folder {model_dir}: several models of dataset {', '.join(map(str, doubled))}; keep one, or point "
            f"segmentation.model at a folder that holds one:\n{_listing(model_dir, selected)}"
        )
    return selected


def find_model_parts(model_dir: str | Path | None, table: pd.DataFrame, task=None) -> list[ModelPart]:
    """The models under ``model_dir`` (empty or None: the bundled demo model) that ``task`` selects (see
    ``task_dataset_ids``; None: the folder's only model or only known task), in dataset id order, with their
    label -> structure label maps (against ``table``) and readers. ModelFolderError where anything is amiss."""
    model_dir = Path(model_dir) if model_dir else bundled_model_dir()
    if not model_dir.is_dir():
        raise ModelFolderError(_describe_expected(model_dir) + " (it does not exist)")
    found = _found_models(model_dir)
    if not found:
        raise ModelFolderError(_describe_expected(model_dir))
    return [_part(folder, plans, table) for folder, plans in _select(model_dir, found, task)]


def _part(folder: Path, plans: dict, table: pd.DataFrame) -> ModelPart:
    dataset_id = _dataset_id(folder, plans)
    names = _part_label_names(folder, dataset_id)
    label_of = dict(zip(table["name"], table["label"]))
    unknown = sorted(name for name in names.values() if name not in label_of)
    if unknown:
        raise ModelFolderError(
            f"model {folder}: label(s) {', '.join(unknown)} are not in the structure table; "
            "choose the table that matches the model (config key structures)"
        )
    reader = plans.get("image_reader_writer")
    if reader not in READER_AXES:
        raise ModelFolderError(
            f"model {folder}: plans.json's image_reader_writer {reader!r} is not supported; ctcohort feeds "
            f"3D CT as nnU-Net's {', '.join(READER_AXES)} do"
        )
    forward = plans.get("transpose_forward", [0, 1, 2])
    backward = plans.get("transpose_backward", [0, 1, 2])
    if sorted(forward) != [0, 1, 2] or [list(forward).index(i) for i in range(3)] != list(backward):
        raise ModelFolderError(
            f"model {folder}: plans.json's transpose_forward {forward} and transpose_backward "
            f"{backward} are not a 3D axis permutation and its inverse"
        )
    return ModelPart(
        folder,
        dataset_id,
        {local: int(label_of[name]) for local, name in names.items()},
        reader,
        tuple(int(i) for i in forward),
    )


def _dataset_json_labels(folder: Path) -> dict[int, str]:
    labels = _read_json(folder / "dataset.json").get("labels")
    if not isinstance(labels, dict):
        raise ModelFolderError(f"model {folder}: dataset.json has no 'labels'")
    names = {}
    for name, value in labels.items():
        if name == "background":
            continue
        if isinstance(value, list):  # region-based models list several labels per region
            raise ModelFolderError(f"model {folder}: region-based labels ({name}) are not supported")
        names[int(value)] = name
    return names


def _part_label_names(folder: Path, dataset_id: int | None) -> dict[int, str]:
    """Part label -> structure name: TotalSegmentator's part table for its datasets (which dataset.json must
    agree with: another model numbered 291 would otherwise get its names), dataset.json otherwise."""
    names = _dataset_json_labels(folder)
    parts = pd.read_csv(resources_dir() / "structures" / TOTALSEG_PARTS_TABLE)
    known = parts[parts["task_id"] == dataset_id]
    if not len(known):
        return names
    expected = dict(zip(known["part_label"].astype(int), known["name"]))
    if names != expected:
        differ = sorted(set(names) ^ set(expected) | {k for k in set(names) & set(expected) if names[k] != expected[k]})
        shown = ", ".join(f"{k}: {names.get(k, '-')} (published: {expected.get(k, '-')})" for k in differ[:5])
        raise ModelFolderError(
            f"model {folder}: dataset {dataset_id} is a part of TotalSegmentator's 'total' model, but its dataset.json "
            f"labels differ from that part's ({len(names)} labels, published {len(expected)}; {shown}"
            f"{', ...' if len(differ) > 5 else ''}): not the published weights"
        )
    return expected


def resolve_device(device: str):
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("segmentation.device is cuda but no CUDA device is visible to torch")
    return torch.device(device)


DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "float32", "bfloat16")
# trilinear: the CT and the logits resampled trilinearly, argmax on the CT's grid; totalsegmentator: as
# TotalSegmentator 2.18.0 does it (totalseg_geometry), for its labels from its weights
RESAMPLINGS = ("trilinear", "totalsegmentator")


@dataclass(frozen=True)
class SegmentationSettings:
    """How the models segment: config's ``segmentation`` keys of the same names (documented in
    config/README.md), which the workflow, ``ctcohort segment`` and ``Segmenter`` share. The field defaults
    are the only defaults (``ctcohort.config_defaults`` writes them into config/config.yaml)."""

    device: str = "auto"
    folds: tuple = (0,)  # fold_N folders to ensemble
    checkpoint: str = "checkpoint_final.pth"
    tile_step: float = 0.5
    mirroring: bool = False
    precision: str = "auto"
    resampling: str = "trilinear"
    threads: int = 2

    def __post_init__(self):
        object.__setattr__(self, "folds", tuple(self.folds))
        for name, allowed in (("device", DEVICES), ("precision", PRECISIONS), ("resampling", RESAMPLINGS)):
            if getattr(self, name) not in allowed:
                raise ValueError(
                    f"unknown segmentation.{name} {getattr(self, name)!r}; choose one of {', '.join(allowed)}"
                )

    @classmethod
    def from_config(cls, section: Mapping) -> "SegmentationSettings":
        """From config's ``segmentation`` block (its other keys say where models are and what jobs request); a key
        the block leaves out (segmentation.checkpoint, which configs older than it lack) keeps its default."""
        return cls(**{item.name: section[item.name] for item in fields(cls) if item.name in section})

    def per_job(self) -> dict:
        """The fields a segmentation job's output depends on: its params (threads follow the job's cores)."""
        return {name: value for name, value in asdict(self).items() if name != "threads"}


def cpu_bfloat16(precision: str, device) -> bool:
    """Whether a segmentation on ``device`` runs its networks in bfloat16 (autocast): on the CPU only (on a
    GPU nnU-Net autocasts to float16 itself); "auto" where the CPU computes bfloat16 natively (AVX512-BF16
    or AMX: a demo scan segments 1.4x faster, labels equal on 99.9995% of voxels, benchmarks/segment_precision.py;
    elsewhere bfloat16 is emulated and slower than float32)."""
    import torch

    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if device.type != "cpu" or precision == "float32":
        return False
    return precision == "bfloat16" or torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def _existing_checkpoint_files(part: ModelPart, folds: Sequence, checkpoint: str) -> list[Path]:
    """The part's checkpoint of each fold; ModelFolderError naming the first that is missing."""
    paths = _checkpoint_files(part, folds, checkpoint)
    for path in paths:
        if not path.is_file():
            raise ModelFolderError(f"model {part.folder}: no {path.relative_to(part.folder)} (segmentation.folds)")
    return paths


class Segmenter:
    """Every part of a model, loaded once; ``segment`` runs them all on one CT."""

    def __init__(
        self,
        model_dir: str | Path | None,
        table: pd.DataFrame,
        *,
        task=None,
        settings: SegmentationSettings = SegmentationSettings(),
    ):
        import torch

        torch.set_num_threads(max(1, settings.threads))
        self.table = table
        self.parts = find_model_parts(model_dir, table, task)
        self.device = resolve_device(settings.device)
        # TotalSegmentator computes in float32 on the CPU: auto means that in its mode
        resampling, precision, tile_step = settings.resampling, settings.precision, settings.tile_step
        auto = "float32" if resampling == "totalsegmentator" else "auto"
        self.bfloat16 = cpu_bfloat16(auto if precision == "auto" else precision, self.device)
        self.resampling = resampling
        if resampling == "totalsegmentator":
            total_ids = {i for ids in TASKS.values() for i in ids}
            tile_step = totalseg_geometry.tile_step([part.dataset_id for part in self.parts], total_ids, tile_step)
        self.predictors = [
            load_predictor(
                part.folder,
                _existing_checkpoint_files(part, settings.folds, settings.checkpoint),
                self.device,
                tile_step,
                settings.mirroring,
            )
            for part in self.parts
        ]
        self.dtype = np.uint8 if int(table["label"].max()) <= 255 else np.uint16
        log.info(
            "loaded %d model part(s) from %s on %s%s",
            len(self.parts),
            model_dir or bundled_model_dir(),
            self.device,
            " (bfloat16)" if self.bfloat16 else "",
        )

    def segment(self, ct: nib.Nifti1Image, hu: np.ndarray | None = None) -> np.ndarray:
        """Label map of ``ct`` on its own grid (same shape, same affine); ``hu``: its HU array, if read already."""
        import torch

        # closest canonical (RAS) orientation: a permutation and flips of the voxel axes, exact both ways
        orientation = nib.orientations.io_orientation(ct.affine)
        hu = ct_hounsfield(ct) if hu is None else hu
        hu = nib.orientations.apply_orientation(hu, orientation).astype(np.float32)
        spacing = np.empty(3)
        spacing[orientation[:, 0].astype(int)] = voxel_spacing_mm(ct.affine)
        image = torch.from_numpy(np.ascontiguousarray(hu)).to(self.device)  # RAS voxel order (x, y, z)
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bfloat16):
            if self.resampling == "totalsegmentator":
                merged = self._segment_as_totalsegmentator(image, spacing)
            else:
                merged = self._merged_parts(image, spacing)
        merged = merged.cpu().numpy().astype(self.dtype)
        back = nib.orientations.ornt_transform(nib.orientations.axcodes2ornt("RAS"), orientation)
        return np.ascontiguousarray(nib.orientations.apply_orientation(merged, back))

    def _merged_parts(self, image, spacing: np.ndarray):
        """Every part's labels of the RAS ``image`` (of ``spacing``), on its grid, merged: the later part wins."""
        import torch

        merged = torch.zeros(image.shape, dtype=torch.int32, device=self.device)
        for part, predictor in zip(self.parts, self.predictors):
            lookup = torch.zeros(max(part.global_labels, default=0) + 1, dtype=torch.int32, device=self.device)
            for part_label, label in part.global_labels.items():
                lookup[part_label] = label
            # the axes as the part's reader and transpose_forward give them to its network, and back
            axes = list(part.network_axes)
            labels = predict_labels(predictor, image.permute(axes), spacing[axes])
            claimed = lookup[labels.permute(np.argsort(axes).tolist())]
            merged = torch.where(claimed != 0, claimed, merged)
        return merged

    def _model_spacing(self) -> np.ndarray:
        """The first part's spacing (plans.json), per RAS axis: TotalSegmentator's resampling target."""
        spacing = np.empty(3)
        spacing[list(self.parts[0].network_axes)] = self.predictors[0].configuration_manager.spacing
        return spacing

    def _segment_as_totalsegmentator(self, image, spacing: np.ndarray):
        """Labels of the RAS ``image`` as TotalSegmentator 2.18.0 computes them (``totalseg_geometry``): the CT
        resampled to the model's spacing and truncated, split into slabs where it splits, each cropped to its
        non-zero voxels, the merged labels resampled back with order 0."""
        import torch

        target = self._model_spacing()
        resampled = totalseg_geometry.resample_ct(image, spacing, target)
        labels = torch.zeros(resampled.shape, dtype=torch.int32, device=self.device)
        for source, kept, destination in totalseg_geometry.slabs(
            resampled.shape[2], resampled.numel(), len(self.parts) > 1
        ):
            slab = resampled[:, :, source]
            box = totalseg_geometry.nonzero_box(slab)
            slab_labels = torch.zeros(slab.shape, dtype=torch.int32, device=self.device)
            slab_labels[box] = self._merged_parts(slab[box].contiguous(), target)
            labels[:, :, destination] = slab_labels[:, :, kept]
        return totalseg_geometry.zoom_nearest(labels, image.shape)


def label_map_image(labels: np.ndarray, reference: nib.Nifti1Image, table: pd.DataFrame) -> nib.Nifti1Image:
    """A label map on ``reference``'s grid, with label id -> name recorded in a JSON header extension."""
    img = nib.Nifti1Image(labels, reference.affine)
    img.header.set_qform(reference.affine, code=int(reference.header["qform_code"]) or 1)
    img.header.set_sform(reference.affine, code=int(reference.header["sform_code"]) or 1)
    img.header.set_xyzt_units("mm", "sec")
    present = set(np.unique(labels).tolist()) - {0}
    names = {int(k): v for k, v in zip(table["label"], table["name"]) if int(k) in present}
    text = json.dumps({LABELS_EXTENSION_KEY: names})
    img.header.extensions.append(nib.nifti1.Nifti1Extension("comment", text.encode()))
    return img


def recorded_label_names(img: nib.Nifti1Image) -> dict[int, str]:
    """The label names a ctcohort segmentation carries in its header (empty for other files)."""
    for extension in img.header.extensions:
        try:
            content = json.loads(extension.get_content())
        except (ValueError, TypeError, UnicodeDecodeError):
            continue
        if isinstance(content, dict) and LABELS_EXTENSION_KEY in content:
            return {int(k): v for k, v in content[LABELS_EXTENSION_KEY].items()}
    return {}


def _read_ct(path: str | Path, checks: ScanChecks | None = None) -> tuple[nib.Nifti1Image, np.ndarray]:
    """A CT and its HU; with ``checks``, a CT that is not plausibly one fails here, before the model sees it
    (a model fed raw scanner values or a broken header returns a confident label map all the same).
    Inflated in one call that lets the segmenting thread run (a streamed read holds the GIL per chunk)."""
    ct = load_image(path, in_memory=True)
    hu = ct_hounsfield(ct)
    if checks is not None:
        check_orientation(ct, path)
        check_ct(hu, ct.affine, path, checks)
    return ct, hu


def _write_label_map(labels: np.ndarray, ct: nib.Nifti1Image, table: pd.DataFrame, out_path: str | Path) -> None:
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    nib.save(label_map_image(labels, ct, table), out_path)


class ScanPipeline:
    """Segments scans in order while a thread reads (and decompresses) the next scan and another writes
    (and compresses) finished label maps, so that file I/O overlaps the models' work.

    ``segment(i)`` returns scan i's CT, HU array and label map (a read error surfaces here, for scan i);
    ``write(...)`` and ``in_background(...)`` return the task's future; at most two tasks are pending,
    which bounds memory.
    """

    def __init__(self, segmenter: "Segmenter", cts: Sequence[str | Path], checks: ScanChecks | None = ScanChecks()):
        from concurrent.futures import ThreadPoolExecutor

        self.segmenter, self.cts, self.checks = segmenter, list(cts), checks
        self._reader, self._writer = ThreadPoolExecutor(1), ThreadPoolExecutor(1)
        self._reads = {0: self._reader.submit(_read_ct, self.cts[0], checks)} if self.cts else {}
        self._pending = []

    def __enter__(self) -> "ScanPipeline":
        return self

    def __exit__(self, *exc) -> None:
        self._reader.shutdown(cancel_futures=True)
        self._writer.shutdown()

    def segment(self, i: int) -> tuple[nib.Nifti1Image, np.ndarray, np.ndarray]:
        """(CT, its HU array, label map on its grid) of scan i."""
        read = self._reads.pop(i, None) or self._reader.submit(_read_ct, self.cts[i], self.checks)
        if i + 1 < len(self.cts):
            self._reads[i + 1] = self._reader.submit(_read_ct, self.cts[i + 1], self.checks)
        ct, hu = read.result()
        return ct, hu, self.segmenter.segment(ct, hu)

    def in_background(self, task: Callable, *args):
        """Run ``task(*args)`` on the writer thread, after the tasks submitted before it."""
        while len(self._pending) >= 2:
            self._pending.pop(0).exception()  # wait; the caller sees errors through its own future
        future = self._writer.submit(task, *args)
        self._pending.append(future)
        return future

    def write(self, labels: np.ndarray, ct: nib.Nifti1Image, out_path: str | Path):
        return self.in_background(_write_label_map, labels, ct, self.segmenter.table, out_path)


def segment_files(segmenter: Segmenter, cts: Sequence[str | Path], outputs: Sequence[str | Path]) -> None:
    """Segment each CT into its output file, the models staying loaded between scans."""
    if len(cts) != len(outputs):
        raise ValueError(f"{len(cts)} CT files but {len(outputs)} output paths")
    with ScanPipeline(segmenter, cts) as pipeline:
        writes = []
        for i, out_path in enumerate(outputs):
            ct, _, labels = pipeline.segment(i)
            writes.append(pipeline.write(labels, ct, out_path))
        for ct_path, out_path, write in zip(cts, outputs, writes):
            write.result()
            log.info("segmented %s -> %s", ct_path, out_path)


def _write_placeholder(out_path: str | Path) -> None:
    nib.save(nib.Nifti1Image(np.zeros((1, 1, 1), np.uint8), np.eye(4)), out_path)


@dataclass(frozen=True)
class BatchMeasurement:
    """Where and how ``segment_batch`` measures each scan it segments, while the CT and its label map are
    in memory: no second job, process start-up or read per scan (the ``measure`` stage of the workflow)."""

    outputs: Sequence[str | Path]  # measurement tables (TSV), one per scan
    statuses: Sequence[str | Path]  # the scans' measure-stage status files
    qc_tables: Sequence[str | Path] = ()  # per scan: the QC table (TSV, qc.scan_qc); empty: none written
    previews: Sequence[str | Path] = ()  # per scan: the QC preview (PNG); empty: none made
    settings: QCSettings = QCSettings()  # the border margin and minimum voxel count of the measurement too

    @property
    def qc(self) -> QCSettings:
        return self.settings if self.previews else replace(self.settings, preview_width=None)


def _measure_segmented(
    ct: nib.Nifti1Image,
    hu: np.ndarray,
    label_maps: Sequence[np.ndarray],
    models: Sequence[StudyModel],
    measurement: BatchMeasurement,
    ct_path,
    seg_paths,
):
    # the CT passed the same checks when it was read for segmentation
    sform_qform_mm = sform_qform_disagreement(ct)
    results = [
        measure_and_qc(
            hu,
            labels,
            ct.affine,
            measuring_table(model),
            measurement.qc if k == 0 else replace(measurement.qc, preview_width=None),  # one preview
            source=seg_path,
            ct_source=ct_path,
            sform_qform_mm=sform_qform_mm,
        )
        for k, (model, labels, seg_path) in enumerate(zip(models, label_maps, seg_paths))
    ]
    return models_measurements_and_qc(results, list(models))


class StudySegmenter:
    """Every model of the study (``study_models``), each loaded once; ``segment`` gives each one's label map."""

    def __init__(self, models: Sequence[StudyModel], settings: SegmentationSettings = SegmentationSettings()):
        self.models = list(models)
        self.segmenters = [Segmenter(m.folder or None, m.table, task=m.task, settings=settings) for m in self.models]

    def segment(self, ct: nib.Nifti1Image, hu: np.ndarray | None = None) -> list[np.ndarray]:
        return [segmenter.segment(ct, hu) for segmenter in self.segmenters]


def _write_label_maps(
    label_maps: Sequence[np.ndarray], ct: nib.Nifti1Image, models: Sequence[StudyModel], out_paths: Sequence[str | Path]
) -> None:
    for labels, model, out_path in zip(label_maps, models, out_paths):
        _write_label_map(labels, ct, model.table, out_path)


def segment_batch(
    subjects: Sequence[str],
    cts: Sequence[str | Path],
    outputs: Sequence[str | Path | Sequence[str | Path]],
    statuses: Sequence[str | Path],
    *,
    model: str | Path | Mapping,
    structures: str | Mapping,
    task=None,
    on_error: str = "record",
    ct_checks: ScanChecks = ScanChecks(),
    measurement: BatchMeasurement | None = None,
    upstream: Sequence[str | Path] = (),
    settings: SegmentationSettings = SegmentationSettings(),
) -> None:
    """The workflow's batch job: load the model once, segment every scan, record each scan's status;
    with ``measurement``, measure each scan too. ``model``, ``task``, ``structures``: as the config keys
    (``study_models``); with several models, ``outputs`` holds per scan the label map path of each model, and
    a scan fails if any model fails on it. ``settings``: how every model segments (config's segmentation block).

    A scan that fails (reading, segmenting or writing) gets an empty label map (so the batch's outputs
    exist) and a failed status, which the scan's later stages pass on to failures.tsv. A scan's status is
    final once its label map is written. A CT that fails ``ct_checks`` fails here, at stage segment.
    A scan that fails to segment gets that failure as its measure status (and an empty table); one that
    fails to measure fails at stage measure. ``upstream``: per scan, the status file of an earlier stage (the
    DICOM import; "" for a scan without one), or none at all: a scan that failed there is not segmented, and
    its failure is passed on.
    """
    models = study_models(model, task, structures)
    segmenter = StudySegmenter(models, settings)
    outputs = [[paths] if isinstance(paths, (str, Path)) else list(paths) for paths in outputs]
    done = []
    with ScanPipeline(segmenter, cts, ct_checks) as pipeline:
        for i, (subject, ct_path, out_paths, status_path) in enumerate(zip(subjects, cts, outputs, statuses)):
            write = measured = None
            if upstream and passed_on_failure(subject, upstream[i : i + 1], status_path) is not None:
                done.append((i, subject, out_paths, status_path, write, measured))
                continue
            with recording_failure(subject, "segment", status_path, on_error) as status:
                ct, hu, label_maps = pipeline.segment(i)
            if status.ok:
                log.info("segmented %s (%d of %d)", ct_path, i + 1, len(cts))  # progress, as it happens
                write = pipeline.in_background(_write_label_maps, label_maps, ct, models, out_paths)
                if measurement is not None:
                    measured = pipeline.in_background(
                        _measure_segmented, ct, hu, label_maps, models, measurement, ct_path, out_paths
                    )
                del ct, hu, label_maps  # the background tasks hold them only as long as they need them
            done.append((i, subject, out_paths, status_path, write, measured))
        for i, subject, out_paths, status_path, write, measured in done:
            if write is not None:
                with recording_failure(subject, "segment", status_path, on_error) as status:
                    write.result()
                    log.info("wrote %s", ", ".join(map(str, out_paths)))
            if write is None or not status.ok:
                for out_path in out_paths:
                    _write_placeholder(out_path)
            if measurement is not None:
                _record_measurement(subject, status_path, measured, measurement, i, on_error)


def _record_measurement(
    subject, seg_status_path, measured, measurement: BatchMeasurement, i: int, on_error: str
) -> None:
    out_path, status_path = measurement.outputs[i], measurement.statuses[i]
    qc_path = measurement.qc_tables[i] if measurement.qc_tables else None
    preview = measurement.previews[i] if measurement.previews else None

    def write(result):
        write_measurements_and_qc(result, out_path, qc_path, preview)

    run_scan_step(
        subject,
        "measure",
        status_path,
        on_error,
        step=lambda: write(measured.result()),
        placeholder=lambda: write(empty_measurements_and_qc()),
        upstream=[seg_status_path],
    )
