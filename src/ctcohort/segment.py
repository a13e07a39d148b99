"""Segmentation with nnU-Net v2's predictor: models loaded once, many scans segmented.

A model folder is one of
- an nnU-Net v2 trained model folder (dataset.json, plans.json, fold_N/checkpoint_final.pth),
  label names from its dataset.json;
- a folder of several such models (TotalSegmentator's weights: Dataset291_... to Dataset295_...
  for the 5-part 1.5 mm model, Dataset297_... for the 3 mm one), each a part whose labels map to
  global structures (TotalSegmentator's part tables for its dataset ids, label names otherwise).
Parts run in turn on the same scan and are merged into one label map; where two parts
claim a voxel, the later part (in dataset id order) wins, as in TotalSegmentator.

Geometry: the CT is reoriented to the closest canonical (RAS) orientation and taken in nnU-Net's
SimpleITK axis order (z, y, x). Preprocessing and postprocessing run on the predictor's device
(the GPU where there is one) instead of nnU-Net's numpy/scipy code: CT normalisation with the
model's intensity statistics, trilinear resampling to the model's spacing, nnU-Net's own sliding
window, then the logits resampled trilinearly onto the input grid in slabs and argmaxed. On the
model's own spacing no resampling happens and the result equals nnU-Net's. The label map is
returned on the input's exact grid.

The networks are built with nnU-Net's default architecture builder rather than by looking up
the trainer class named in the checkpoint: TotalSegmentator's trainers differ from the default
only in training (epochs, mirroring), and the lookup imports every trainer module nnU-Net has.
"""

import contextlib
import importlib.util
import io
import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

from ctcohort.imaging import ct_hounsfield, load_image, voxel_spacing_mm
from ctcohort.resources import resources_dir
from ctcohort.scan_status import recording_failure
from ctcohort.structures import load_structure_table

log = logging.getLogger(__name__)

MODEL_FILES = ("dataset.json", "plans.json")
LABELS_EXTENSION_KEY = "ctcohort_labels"
TOTALSEG_PARTS_TABLE = "total_v2_parts.csv"


class ModelFolderError(ValueError):
    """The model folder is missing or does not hold an nnU-Net v2 model."""


@dataclass
class ModelPart:
    """One nnU-Net trained model and where its labels go in the merged map."""

    folder: Path
    dataset_id: int | None
    global_labels: dict[int, int] = field(default_factory=dict)  # part label -> structure label


def model_files(parts: Sequence[ModelPart], folds: Sequence[int], checkpoint: str = "checkpoint_final.pth") -> list[Path]:
    """The files a segmentation depends on: each part's dataset.json, plans.json and fold checkpoints.
    The workflow's segmentation jobs take them as inputs, so that new weights segment the scans again."""
    return [path for part in parts
            for path in [part.folder / name for name in MODEL_FILES]
            + [part.folder / f"fold_{fold}" / checkpoint for fold in folds]]


def missing_segmentation_packages(packages: Sequence[str] = ("torch", "nnunetv2")) -> str | None:
    """What to install when nnU-Net inference cannot run here (None: all there). Checked without importing
    them, so that a workflow stops at start-up, not in its first segmentation job."""
    missing = [name for name in packages if importlib.util.find_spec(name) is None]
    if not missing:
        return None
    return (f"segmentation.method nnunet needs {' and '.join(missing)}, which this environment lacks: "
            "pip install -e '.[segment]' (or set segmentation.method: precomputed)")


def _is_trained_model(folder: Path) -> bool:
    return all((folder / name).is_file() for name in MODEL_FILES) and any(folder.glob("fold_*/checkpoint*.pth"))


def _dataset_id(folder: Path) -> int | None:
    for part in (folder.name, folder.parent.name):
        match = re.match(r"Dataset(\d+)_", part)
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


def find_model_parts(model_dir: str | Path | None, table: pd.DataFrame) -> list[ModelPart]:
    """The models under ``model_dir`` (empty or None: the bundled demo model) with their label -> structure
    label maps (against ``table``)."""
    model_dir = Path(model_dir) if model_dir else bundled_model_dir()
    if not model_dir.is_dir():
        raise ModelFolderError(_describe_expected(model_dir) + " (it does not exist)")
    if _is_trained_model(model_dir):
        folders = [model_dir]
    else:
        folders = sorted(
            (f for f in model_dir.glob("*") if f.is_dir() and _is_trained_model(f)),
            key=lambda f: (_dataset_id(f) or 0, f.name),
        ) or sorted(
            (f for f in model_dir.glob("*/*") if f.is_dir() and _is_trained_model(f)),
            key=lambda f: (_dataset_id(f) or 0, str(f)),
        )
    if not folders:
        raise ModelFolderError(_describe_expected(model_dir))
    return [_part(folder, table) for folder in folders]


def _part(folder: Path, table: pd.DataFrame) -> ModelPart:
    dataset_id = _dataset_id(folder)
    names = _part_label_names(folder, dataset_id)
    label_of = dict(zip(table["name"], table["label"]))
    unknown = sorted(name for name in names.values() if name not in label_of)
    if unknown:
        raise ModelFolderError(
            f"model {folder}: label(s) {', '.join(unknown)} are not in the structure table; "
            "choose the table that matches the model (config key structures)"
        )
    return ModelPart(folder, dataset_id, {local: int(label_of[name]) for local, name in names.items()})


def _part_label_names(folder: Path, dataset_id: int | None) -> dict[int, str]:
    """Part label -> structure name: TotalSegmentator's part table for its datasets, dataset.json otherwise."""
    parts = pd.read_csv(resources_dir() / "structures" / TOTALSEG_PARTS_TABLE)
    known = parts[parts["task_id"] == dataset_id]
    if len(known):
        return dict(zip(known["part_label"].astype(int), known["name"]))
    try:
        labels = json.loads((folder / "dataset.json").read_text())["labels"]
    except (KeyError, json.JSONDecodeError) as err:
        raise ModelFolderError(f"model {folder}: dataset.json has no readable 'labels' ({err})") from err
    names = {}
    for name, value in labels.items():
        if name == "background":
            continue
        if isinstance(value, list):  # region-based models list several labels per region
            raise ModelFolderError(f"model {folder}: region-based labels ({name}) are not supported")
        names[int(value)] = name
    return names


def resolve_device(device: str):
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("segmentation.device is cuda but no CUDA device is visible to torch")
    return torch.device(device)


def _load_predictor(part: ModelPart, device, folds: Sequence, checkpoint: str, tile_step: float, mirroring: bool):
    """An nnUNetPredictor for one part, its weights loaded once."""
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    dataset_json = json.loads((part.folder / "dataset.json").read_text())
    plans_manager = PlansManager(json.loads((part.folder / "plans.json").read_text()))
    parameters, first = [], None
    for fold in folds:
        path = part.folder / f"fold_{fold}" / checkpoint
        if not path.is_file():
            raise ModelFolderError(f"model {part.folder}: no {path.relative_to(part.folder)} (segmentation.folds)")
        state = torch.load(path, map_location="cpu", weights_only=False)
        first = first or state
        parameters.append(state["network_weights"])
    configuration = plans_manager.get_configuration(first["init_args"]["configuration"])
    network = nnUNetTrainer.build_network_architecture(
        plans_manager, configuration,
        determine_num_input_channels(plans_manager, configuration, dataset_json),
        plans_manager.get_label_manager(dataset_json).num_segmentation_heads,
        enable_deep_supervision=False,
    )
    network.load_state_dict(parameters[0])
    # 2.8.1 prints "perform_everything_on_device=True is only supported for cuda" for any non-CUDA device,
    # even when it is False: kept out of the job logs, where it would read as a problem
    with contextlib.redirect_stdout(io.StringIO()):
        predictor = nnUNetPredictor(
            tile_step_size=tile_step, use_gaussian=True, use_mirroring=mirroring,
            perform_everything_on_device=device.type == "cuda", device=device, verbose=False, allow_tqdm=False,
        )
    predictor.manual_initialization(
        network, plans_manager, configuration, parameters, dataset_json, first["trainer_name"],
        first.get("inference_allowed_mirroring_axes"),
    )
    _check_normalization(part, configuration)
    return predictor


NORMALIZATIONS = ("CTNormalization", "ZScoreNormalization")


def _check_normalization(part: ModelPart, configuration) -> None:
    schemes = configuration.normalization_schemes
    if len(schemes) != 1 or schemes[0] not in NORMALIZATIONS or any(configuration.use_mask_for_norm):
        raise ModelFolderError(f"model {part.folder}: one CT channel with {' or '.join(NORMALIZATIONS)} "
                               f"(no mask) is supported, not {schemes}")


def _normalized_input(hu, spacing: Sequence[float], predictor):
    """CT (z, y, x) as the network's input (1, z', y', x'): normalised as nnU-Net does, on the model's spacing."""
    import torch
    import torch.nn.functional as F

    configuration = predictor.configuration_manager
    if configuration.normalization_schemes[0] == "CTNormalization":
        props = predictor.plans_manager.foreground_intensity_properties_per_channel["0"]
        hu = hu.clamp(props["percentile_00_5"], props["percentile_99_5"])
        image = (hu - props["mean"]) / max(props["std"], 1e-8)
    else:
        image = (hu - hu.mean()) / torch.clamp(hu.std(), min=1e-8)
    # nnU-Net's compute_new_shape: round(old spacing / new spacing * old shape)
    shape = [int(round(sp / t * n)) for sp, t, n in zip(spacing, configuration.spacing, hu.shape)]
    if list(hu.shape) != shape:
        image = F.interpolate(image[None, None], size=shape, mode="trilinear", align_corners=False)[0, 0]
    return image[None]


def _labels_on_grid(logits, shape: Sequence[int], max_bytes: int = 1 << 28):
    """argmax of (K, z', y', x') logits resampled trilinearly onto ``shape`` (z, y, x), in slabs of output z."""
    import torch
    import torch.nn.functional as F

    if list(logits.shape[1:]) == list(shape):
        return logits.argmax(0)
    labels = torch.empty(tuple(shape), dtype=torch.int64, device=logits.device)
    # with align_corners=False, output voxel o of n lies at normalised coordinate 2 (o + 0.5) / n - 1
    y, x = (2 * (torch.arange(n, device=logits.device, dtype=torch.float32) + 0.5) / n - 1 for n in shape[1:])
    slab = max(1, max_bytes // (4 * logits.shape[0] * shape[1] * shape[2]))
    source = logits[None].float()
    for z0 in range(0, shape[0], slab):
        z = 2 * (torch.arange(z0, min(shape[0], z0 + slab), device=logits.device, dtype=torch.float32) + 0.5) \
            / shape[0] - 1
        grid = torch.stack(torch.meshgrid(z, y, x, indexing="ij")[::-1], dim=-1)[None]  # (x, y, z) last
        values = F.grid_sample(source, grid, mode="bilinear", padding_mode="border", align_corners=False)
        labels[z0:z0 + len(z)] = values[0].argmax(0)
    return labels


def _predict_part(predictor, hu, spacing: Sequence[float]):
    """Part labels (z, y, x) of a CT tensor on the predictor's device: its folds' mean logits, argmaxed."""
    image = _normalized_input(hu, spacing, predictor)
    logits = None
    for parameters in predictor.list_of_parameters:
        if len(predictor.list_of_parameters) > 1:
            predictor.network.load_state_dict(parameters)
        fold_logits = predictor.predict_sliding_window_return_logits(image)
        logits = fold_logits if logits is None else logits + fold_logits
    return _labels_on_grid(logits, hu.shape)  # the fold mean has the same argmax as the sum


class Segmenter:
    """Every part of a model, loaded once; ``segment`` runs them all on one CT."""

    def __init__(
        self,
        model_dir: str | Path | None,
        table: pd.DataFrame,
        *,
        device: str = "auto",
        folds: Sequence = (0,),
        checkpoint: str = "checkpoint_final.pth",
        tile_step: float = 0.5,
        mirroring: bool = False,
        threads: int = 1,
    ):
        import torch

        torch.set_num_threads(max(1, threads))
        self.table = table
        self.parts = find_model_parts(model_dir, table)
        self.device = resolve_device(device)
        self.predictors = [
            _load_predictor(part, self.device, folds, checkpoint, tile_step, mirroring) for part in self.parts
        ]
        self.dtype = np.uint8 if int(table["label"].max()) <= 255 else np.uint16
        log.info("loaded %d model part(s) from %s on %s", len(self.parts), model_dir or bundled_model_dir(),
                 self.device)

    def segment(self, ct: nib.Nifti1Image, hu: np.ndarray | None = None) -> np.ndarray:
        """Label map of ``ct`` on its own grid (same shape, same affine); ``hu``: its HU array, if read already."""
        import torch

        # closest canonical (RAS) orientation: a permutation and flips of the voxel axes, exact both ways
        orientation = nib.orientations.io_orientation(ct.affine)
        hu = ct_hounsfield(ct) if hu is None else hu
        hu = nib.orientations.apply_orientation(hu, orientation).astype(np.float32)
        spacing = np.empty(3)
        spacing[orientation[:, 0].astype(int)] = voxel_spacing_mm(ct.affine)
        # nnU-Net's SimpleITK axis order (z, y, x)
        image = torch.from_numpy(np.ascontiguousarray(hu.transpose(2, 1, 0))).to(self.device)
        merged = torch.zeros(image.shape, dtype=torch.int32, device=self.device)
        with torch.inference_mode():
            for part, predictor in zip(self.parts, self.predictors):
                lookup = torch.zeros(max(part.global_labels, default=0) + 1, dtype=torch.int32, device=self.device)
                for part_label, label in part.global_labels.items():
                    lookup[part_label] = label
                claimed = lookup[_predict_part(predictor, image, spacing[::-1])]
                merged = torch.where(claimed != 0, claimed, merged)  # the later part wins
        merged = merged.cpu().numpy().astype(self.dtype).transpose(2, 1, 0)
        back = nib.orientations.ornt_transform(nib.orientations.axcodes2ornt("RAS"), orientation)
        return np.ascontiguousarray(nib.orientations.apply_orientation(merged, back))


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


def _read_scan(path: str | Path) -> tuple[nib.Nifti1Image, np.ndarray]:
    ct = load_image(path)
    return ct, ct_hounsfield(ct)


def _write_label_map(labels: np.ndarray, ct: nib.Nifti1Image, table: pd.DataFrame, out_path: str | Path) -> None:
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    nib.save(label_map_image(labels, ct, table), out_path)


class ScanPipeline:
    """Segments scans in order while a thread reads (and decompresses) the next scan and another writes
    (and compresses) finished label maps, so that file I/O overlaps the models' work.

    ``segment(i)`` returns scan i's CT and label map (a read error surfaces here, for scan i);
    ``write(...)`` returns the write's future; at most two writes are pending, which bounds memory.
    """

    def __init__(self, segmenter: "Segmenter", cts: Sequence[str | Path]):
        from concurrent.futures import ThreadPoolExecutor

        self.segmenter, self.cts = segmenter, list(cts)
        self._reader, self._writer = ThreadPoolExecutor(1), ThreadPoolExecutor(1)
        self._reads = {0: self._reader.submit(_read_scan, self.cts[0])} if self.cts else {}
        self._writes = []

    def __enter__(self) -> "ScanPipeline":
        return self

    def __exit__(self, *exc) -> None:
        self._reader.shutdown(cancel_futures=True)
        self._writer.shutdown()

    def segment(self, i: int) -> tuple[nib.Nifti1Image, np.ndarray]:
        """(CT, label map on its grid) of scan i."""
        read = self._reads.pop(i, None) or self._reader.submit(_read_scan, self.cts[i])
        if i + 1 < len(self.cts):
            self._reads[i + 1] = self._reader.submit(_read_scan, self.cts[i + 1])
        ct, hu = read.result()
        return ct, self.segmenter.segment(ct, hu)

    def write(self, labels: np.ndarray, ct: nib.Nifti1Image, out_path: str | Path):
        while len(self._writes) >= 2:
            self._writes.pop(0).exception()  # wait; the caller sees errors through its own future
        future = self._writer.submit(_write_label_map, labels, ct, self.segmenter.table, out_path)
        self._writes.append(future)
        return future


def segment_files(segmenter: Segmenter, cts: Sequence[str | Path], outputs: Sequence[str | Path]) -> None:
    """Segment each CT into its output file, the models staying loaded between scans."""
    if len(cts) != len(outputs):
        raise ValueError(f"{len(cts)} CT files but {len(outputs)} output paths")
    with ScanPipeline(segmenter, cts) as pipeline:
        writes = []
        for i, out_path in enumerate(outputs):
            ct, labels = pipeline.segment(i)
            writes.append(pipeline.write(labels, ct, out_path))
        for ct_path, out_path, write in zip(cts, outputs, writes):
            write.result()
            log.info("segmented %s -> %s", ct_path, out_path)


def _write_placeholder(out_path: str | Path) -> None:
    nib.save(nib.Nifti1Image(np.zeros((1, 1, 1), np.uint8), np.eye(4)), out_path)


def segment_batch(
    subjects: Sequence[str],
    cts: Sequence[str | Path],
    outputs: Sequence[str | Path],
    statuses: Sequence[str | Path],
    *,
    model: str | Path,
    structures: str,
    on_error: str = "record",
    **settings,
) -> None:
    """The workflow's batch job: load the model once, segment every scan, record each scan's status.

    A scan that fails (reading, segmenting or writing) gets an empty label map (so the batch's outputs
    exist) and a failed status, which the scan's later stages pass on to failures.tsv. A scan's status is
    final once its label map is written.
    """
    table = load_structure_table(structures)
    segmenter = Segmenter(model, table, **settings)
    writes = []
    with ScanPipeline(segmenter, cts) as pipeline:
        for i, (subject, ct_path, out_path, status_path) in enumerate(zip(subjects, cts, outputs, statuses)):
            with recording_failure(subject, "segment", status_path, on_error) as status:
                ct, labels = pipeline.segment(i)
            if status.ok:
                log.info("segmented %s (%d of %d)", ct_path, i + 1, len(cts))  # progress, as it happens
                writes.append((subject, ct_path, out_path, status_path, pipeline.write(labels, ct, out_path)))
            else:
                _write_placeholder(out_path)
        for subject, ct_path, out_path, status_path, write in writes:
            with recording_failure(subject, "segment", status_path, on_error) as status:
                write.result()
                log.info("wrote %s", out_path)
            if not status.ok:
                _write_placeholder(out_path)
