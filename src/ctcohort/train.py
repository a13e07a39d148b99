"""Training a small nnU-Net v2 model on data in the TotalSegmentator release layout.

The chain is: a release folder (``<subject>/ct.nii.gz``, ``<subject>/segmentations/<structure>.nii.gz``,
``meta.csv``; the phantom can write one) -> nnU-Net raw dataset -> fingerprint, plans and preprocessing
(with an extra small configuration) -> training with the built-in ``nnUNetTrainer`` -> an exported model
folder holding only what inference needs.

nnU-Net is driven in-process through its Python API, with its folders and process counts set as
environment variables only while it runs (``nnunet_environment``). Two constraints of nnunetv2 2.8.1 on
CPU machines shape the code:

* Only the built-in trainer class ``nnUNetTrainer`` is used: any other trainer name makes nnU-Net (and the
  predictor, which looks the trainer up by the name stored in the checkpoint) import every trainer module,
  some of which need timm/torchvision. Changes to the training (no mirroring, optionally no augmentation)
  are therefore made on the trainer *instance*; the checkpoint still names ``nnUNetTrainer`` because
  ``save_checkpoint`` stores ``self.__class__.__name__``.
* nnU-Net's default 3d_fullres plan is sized for a GPU (~7 s per iteration on 2 CPU cores). ``3d_small``
  inherits the preprocessed data of 3d_fullres but has a slimmer U-Net and a patch of a chosen size: small
  to train on a CPU, or the whole image for a model that segments a small scan in one tile.

nnU-Net and torch are imported inside the functions that need them, so that ``ctcohort`` works without
the optional ``segment`` dependencies. Code that calls into nnU-Net must run under an
``if __name__ == "__main__":`` guard, because nnU-Net starts ``spawn`` process pools.
"""

import contextlib
import io
import json
import logging
import os
import shutil
import time
import types
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

from ctcohort import phantom
from ctcohort.imaging import ct_hounsfield, load_image, seg_on_ct_grid
from ctcohort.parallel import map_processes
from ctcohort.structures import load_structure_table

LOG = logging.getLogger(__name__)
NNUNET_LOG = logging.getLogger(__name__ + ".nnunet")  # nnU-Net's own console output, at DEBUG

META_FILE = "meta.csv"
META_SEPARATOR = ";"  # the TotalSegmentator release writes semicolon-separated meta.csv
SPLITS = ("train", "val", "test")
# Phantom subjects for training are drawn at indices from here on, so that they never coincide with the
# demo cohort's subjects (indices 0..n-1) even when the same seed is passed: the demo cohort stays unseen.
RELEASE_INDEX_OFFSET = 1_000_000
SPLIT_STREAM = 0x5EED  # third element of the split generator's seed, apart from the subjects' streams

TRAINER = "nnUNetTrainer"
PLANS_IDENTIFIER = "nnUNetPlans"
SMALL_CONFIGURATION = "3d_small"
DEFAULT_DATASET_ID = 901
DEFAULT_DATASET_NAME = "CTCohort"
FILE_ENDING = ".nii.gz"
RELEASE_SPLITS_FILE = "splits_final.json"  # in the raw dataset folder; nnU-Net's planner copies it too
NNUNET_FOLDERS = {"raw": "nnUNet_raw", "preprocessed": "nnUNet_preprocessed", "results": "nnUNet_results"}
# What the predictor reads from a checkpoint; the rest (optimizer, logging) only serves to resume training.
INFERENCE_CHECKPOINT_KEYS = ("network_weights", "init_args", "trainer_name", "inference_allowed_mirroring_axes",
                             "current_epoch")


# ---------------------------------------------------------------------------------------------------------
# 1. A phantom release
# ---------------------------------------------------------------------------------------------------------

def release_subject_id(index: int) -> str:
    """Subject names like the release's (s0000, s0001, ...), distinct from the demo cohort's demoNNN."""
    return f"s{index:04d}"


def assign_splits(n: int, seed: int, val_fraction: float = 0.2, test_fraction: float = 0.0) -> list[str]:
    """train/val/test for n subjects: exact counts (at least one where a fraction is > 0), seeded order."""
    if not 0 <= val_fraction < 1 or not 0 <= test_fraction < 1 or val_fraction + test_fraction >= 1:
        raise ValueError(f"val_fraction {val_fraction} and test_fraction {test_fraction} must leave training cases")
    n_val = max(1, round(n * val_fraction)) if val_fraction > 0 else 0
    n_test = max(1, round(n * test_fraction)) if test_fraction > 0 else 0
    if n - n_val - n_test < 1:
        raise ValueError(f"{n} subjects are too few for {n_val} validation and {n_test} test case(s)")
    splits = np.array(["train"] * n, dtype=object)
    order = np.random.default_rng([seed, SPLIT_STREAM]).permutation(n)
    splits[order[:n_val]] = "val"
    splits[order[n_val:n_val + n_test]] = "test"
    return splits.tolist()


def _save_nifti(array: np.ndarray, affine: np.ndarray, path: Path) -> None:
    img = nib.Nifti1Image(array, affine)
    img.header.set_xyzt_units("mm", "sec")
    nib.save(img, path)


def write_release_subject(out_dir: Path, subject: str, draw: phantom.SubjectDraw, spacing) -> None:
    """ct.nii.gz and one binary mask per phantom structure, as the release stores a subject.

    Every structure gets a mask file, empty where the subject lacks it (removed gallbladder, cropped field
    of view), as in the release: a missing file would be ambiguous.
    """
    ct, labels, affine = phantom.render_subject(draw, spacing)
    table = load_structure_table("total_v1").set_index("name")
    seg_dir = out_dir / subject / "segmentations"
    seg_dir.mkdir(parents=True, exist_ok=True)
    _save_nifti(ct, affine, out_dir / subject / "ct.nii.gz")
    for structure in phantom.ANATOMY:
        mask = (labels == table.at[structure.name, "label"]).astype(np.uint8)
        _save_nifti(mask, affine, seg_dir / f"{structure.name}.nii.gz")


def write_phantom_release(out_dir: str | Path, n: int, seed: int, spacing=phantom.DEFAULT_SPACING,
                          val_fraction: float = 0.2, test_fraction: float = 0.0, processes: int = 1) -> Path:
    """n phantom scans in the TotalSegmentator release layout under out_dir; returns out_dir.

    ``out_dir/<subject>/ct.nii.gz``, ``out_dir/<subject>/segmentations/<v1 name>.nii.gz`` and
    ``out_dir/meta.csv`` (image_id;age;gender;split). Subjects are drawn from the phantom at indices
    ``RELEASE_INDEX_OFFSET + i``, so a training release never contains a demo-cohort scan; still, pass a
    seed other than the demo cohort's. ``processes``: subjects written in parallel.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    splits = assign_splits(n, seed, val_fraction, test_fraction)
    subjects = [release_subject_id(index) for index in range(n)]
    draws = [phantom.draw_subject(seed, RELEASE_INDEX_OFFSET + index) for index in range(n)]
    map_processes(write_release_subject, [out_dir] * n, subjects, draws, [spacing] * n, processes=processes)
    rows = [(subject, draw.age, draw.sex.lower(), split) for subject, draw, split in zip(subjects, draws, splits)]
    meta = pd.DataFrame(rows, columns=["image_id", "age", "gender", "split"])
    meta.to_csv(out_dir / META_FILE, sep=META_SEPARATOR, index=False)
    LOG.info("phantom release: %d subjects (%s) in %s", n,
             ", ".join(f"{(meta['split'] == s).sum()} {s}" for s in SPLITS), out_dir)
    return out_dir


# ---------------------------------------------------------------------------------------------------------
# 2. Release -> nnU-Net raw dataset
# ---------------------------------------------------------------------------------------------------------

def dataset_folder_name(dataset_id: int, dataset_name: str) -> str:
    if not 1 <= dataset_id <= 999:
        raise ValueError(f"nnU-Net dataset ids have three digits (1..999), got {dataset_id}")
    return f"Dataset{dataset_id:03d}_{dataset_name}"


def read_release_meta(release_dir: str | Path) -> pd.DataFrame:
    """meta.csv of a release: image_id and split (train/val/test) checked; other columns kept."""
    path = Path(release_dir) / META_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no {META_FILE} in the release folder {release_dir}")
    meta = pd.read_csv(path, sep=META_SEPARATOR, dtype={"image_id": str})
    missing = {"image_id", "split"} - set(meta.columns)
    if missing:
        raise ValueError(f"{path}: missing column(s) {sorted(missing)} (is it ';'-separated?)")
    meta["split"] = meta["split"].astype(str).str.strip().str.lower()
    unknown = sorted(set(meta["split"]) - set(SPLITS))
    if unknown:
        raise ValueError(f"{path}: unknown split value(s) {unknown}; expected {', '.join(SPLITS)}")
    dupes = meta["image_id"][meta["image_id"].duplicated()].tolist()
    if dupes:
        raise ValueError(f"{path}: duplicate image_id {dupes}")
    return meta


def default_structures(release_dir: str | Path, subject: str) -> list[str]:
    """Structures with a mask in ``subject``, in v1 label order; names the v1 table lacks follow, sorted."""
    seg_dir = Path(release_dir) / subject / "segmentations"
    names = sorted(p.name[:-len(FILE_ENDING)] for p in seg_dir.glob(f"*{FILE_ENDING}"))
    if not names:
        raise FileNotFoundError(f"no masks ({FILE_ENDING}) in {seg_dir}")
    table = load_structure_table("total_v1")
    v1_label = dict(zip(table["name"], table["label"]))
    return sorted(names, key=lambda name: (name not in v1_label, v1_label.get(name, 0), name))


def merge_masks(release_dir: Path, subject: str, structures: list[str], ct: nib.Nifti1Image) -> np.ndarray:
    """One label map (1..K in ``structures`` order) from a subject's binary masks, on the CT's grid.

    Where masks overlap, the structure later in the list wins: nnU-Net trains one label per voxel, and the
    release's masks overlap only along a few boundary voxels.
    """
    if len(structures) > np.iinfo(np.uint16).max:
        raise ValueError(f"{len(structures)} structures are too many for a label map")
    labels = np.zeros(ct.shape, np.uint8 if len(structures) <= 255 else np.uint16)
    for k, name in enumerate(structures, start=1):
        path = release_dir / subject / "segmentations" / f"{name}{FILE_ENDING}"
        if not path.is_file():
            # absent structures have empty masks in the release; a missing file is a broken subject
            raise FileNotFoundError(f"subject {subject}: no mask for structure {name!r} ({path})")
        mask = seg_on_ct_grid(load_image(path), ct, source=f"subject {subject}, mask {path.name}")
        labels[mask > 0] = k
    return labels


def canonical_case(ct: nib.Nifti1Image, labels: np.ndarray) -> tuple[nib.Nifti1Image, np.ndarray]:
    """CT and labels in the closest canonical (RAS) orientation, the way ctcohort.segment feeds nnU-Net.

    Training and inference must see the voxel axes in the same order; a permutation and flips, exact.
    """
    orientation = nib.orientations.io_orientation(ct.affine)
    if np.array_equal(orientation, nib.orientations.axcodes2ornt("RAS")):
        return ct, labels
    hu = nib.orientations.apply_orientation(ct_hounsfield(ct), orientation)
    affine = ct.affine @ nib.orientations.inv_ornt_aff(orientation, ct.shape)
    canonical = nib.Nifti1Image(np.ascontiguousarray(hu), affine)
    canonical.header.set_xyzt_units("mm", "sec")
    return canonical, np.ascontiguousarray(nib.orientations.apply_orientation(labels, orientation))


def _label_image(labels: np.ndarray, ct: nib.Nifti1Image) -> nib.Nifti1Image:
    """The label map with the CT's header geometry (sform and qform), so readers see the same grid."""
    header = ct.header.copy()
    header.set_data_dtype(labels.dtype)
    img = nib.Nifti1Image(labels, ct.affine, header)
    img.header.set_slope_inter(1.0, 0.0)
    return img


def _case_files(dataset_dir: Path, case: str, split: str) -> tuple[Path, Path]:
    images, targets = ("imagesTs", "labelsTs") if split == "test" else ("imagesTr", "labelsTr")
    return dataset_dir / images / f"{case}_0000{FILE_ENDING}", dataset_dir / targets / f"{case}{FILE_ENDING}"


def _convert_case(release_dir: Path, subject: str, split: str, structures: list[str], dataset_dir: Path) -> None:
    ct = load_image(release_dir / subject / "ct.nii.gz")
    labels = merge_masks(release_dir, subject, structures, ct)
    image_file, label_file = _case_files(dataset_dir, subject, split)
    ct, labels = canonical_case(ct, labels)
    nib.save(ct, image_file)
    nib.save(_label_image(labels, ct), label_file)


def release_to_nnunet_raw(release_dir: str | Path, raw_root: str | Path, dataset_id: int,
                          dataset_name: str, structures: list[str] | None = None, processes: int = 1) -> Path:
    """Convert a release into the nnU-Net raw dataset ``raw_root/DatasetXXX_<name>``; returns its folder.

    train and val subjects go to imagesTr/labelsTr (case id = image_id), test subjects to
    imagesTs/labelsTs, which nnU-Net never trains on. Labels are 1..K in the order of ``structures``
    (default: ``default_structures`` of the first subject). ``splits_final.json`` holds one fold, the
    release's train/val; ``train`` makes it nnU-Net's fold 0. ``processes``: cases converted in parallel.
    """
    release_dir = Path(release_dir)
    meta = read_release_meta(release_dir)
    if meta.empty:
        raise ValueError(f"{release_dir / META_FILE} lists no subjects")
    structures = list(structures) if structures is not None else \
        default_structures(release_dir, meta["image_id"].iloc[0])
    if len(set(structures)) != len(structures):
        raise ValueError("structures: duplicate names")
    dataset_dir = Path(raw_root) / dataset_folder_name(dataset_id, dataset_name)
    for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
        # a rerun must not leave cases of an earlier release behind
        shutil.rmtree(dataset_dir / sub, ignore_errors=True)
        (dataset_dir / sub).mkdir(parents=True)

    n = len(meta)
    arguments = ([release_dir] * n, meta["image_id"], meta["split"], [structures] * n, [dataset_dir] * n)
    map_processes(_convert_case, *arguments, processes=processes)

    trained = meta[meta["split"] != "test"]
    dataset_json = {
        "channel_names": {"0": "CT"},
        "labels": {"background": 0, **{name: k for k, name in enumerate(structures, start=1)}},
        "numTraining": int(len(trained)),
        "file_ending": FILE_ENDING,
        "name": dataset_name,
        "description": f"converted from the release {release_dir.name} by ctcohort",
    }
    (dataset_dir / "dataset.json").write_text(json.dumps(dataset_json, indent=2))
    splits = [{"train": trained["image_id"][trained["split"] == "train"].tolist(),
               "val": trained["image_id"][trained["split"] == "val"].tolist()}]
    (dataset_dir / RELEASE_SPLITS_FILE).write_text(json.dumps(splits, indent=2))
    LOG.info("nnU-Net raw dataset %s: %d training, %d validation, %d test cases, %d structures",
             dataset_dir, len(splits[0]["train"]), len(splits[0]["val"]), len(meta) - len(trained),
             len(structures))
    return dataset_dir


# ---------------------------------------------------------------------------------------------------------
# nnU-Net's environment
# ---------------------------------------------------------------------------------------------------------

def nnunet_dirs(work_dir: str | Path) -> dict[str, Path]:
    """raw, preprocessed and results folders of nnU-Net under work_dir."""
    return {key: Path(work_dir) / folder for key, folder in NNUNET_FOLDERS.items()}


class _LogWriter(io.TextIOBase):
    """A text stream that sends complete lines to a logger: nnU-Net prints, library code must not."""

    def __init__(self, logger: logging.Logger, level: int = logging.DEBUG):
        self.logger, self.level, self.buffer = logger, level, ""

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        self.buffer += text
        *lines, self.buffer = self.buffer.split("\n")
        for line in lines:
            if line.strip():
                self.logger.log(self.level, line.rstrip())
        return len(text)

    def flush(self) -> None:
        if self.buffer.strip():
            self.logger.log(self.level, self.buffer.rstrip())
        self.buffer = ""


@contextlib.contextmanager
def nnunet_environment(work_dir: str | Path, threads: int = 1, n_proc_da: int = 0):
    """nnU-Net's folders and process counts as environment variables for this block only; yields the folders.

    nnunetv2.paths reads nnUNet_raw/_preprocessed/_results when they are used, so setting them here is
    enough. ``nnUNet_def_n_proc`` is read when nnunetv2.configuration is first imported; the functions here
    therefore pass process counts explicitly (spawned workers re-import it and see ``threads``).
    ``n_proc_da``: 0 runs data augmentation in the main process (training); planning needs >= 1.
    torch's thread count is set to ``threads`` and restored; nnU-Net's console output goes to the log.
    """
    import torch

    dirs = nnunet_dirs(work_dir)
    for path in dirs.values():
        path.mkdir(parents=True, exist_ok=True)
    values = {
        "nnUNet_raw": str(dirs["raw"]), "nnUNet_preprocessed": str(dirs["preprocessed"]),
        "nnUNet_results": str(dirs["results"]), "nnUNet_def_n_proc": str(threads),
        "nnUNet_n_proc_DA": str(n_proc_da),
        "nnUNet_compile": "false",  # no torch.compile (off on CPU anyway)
        "nnUNet_wandb_enabled": "0",  # no network access
    }
    saved_env = {key: os.environ.get(key) for key in values}
    saved_threads = torch.get_num_threads()
    os.environ.update(values)
    torch.set_num_threads(threads)
    writer = _LogWriter(NNUNET_LOG)
    try:
        with contextlib.redirect_stdout(writer):
            yield dirs
    finally:
        writer.flush()
        torch.set_num_threads(saved_threads)
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _dataset_name(dataset_id: int) -> str:
    from nnunetv2.utilities.dataset_name_id_conversion import convert_id_to_dataset_name

    return convert_id_to_dataset_name(dataset_id)


# ---------------------------------------------------------------------------------------------------------
# 3. Fingerprint, plans (+ the small configuration), preprocessing
# ---------------------------------------------------------------------------------------------------------

def make_small_configuration(plans: dict, parent: str = "3d_fullres", patch_voxels: int = 48 ** 3,
                      base_features: int = 16, max_features: int = 256, batch_size: int = 2) -> dict:
    """A CPU-sized configuration that ``inherits_from`` ``parent`` and reuses its preprocessed data.

    The patch keeps the parent spacing's physical aspect (as nnU-Net's planner does) with about
    ``patch_voxels`` voxels, clipped to the median image; nnU-Net's own topology rule then sets pooling,
    kernels and the padding of the patch to a multiple of the total stride, so the network and the patch
    stay consistent. Features start at ``base_features`` (nnU-Net: 32) and double per stage up to
    ``max_features`` (nnU-Net: 320).
    """
    from nnunetv2.experiment_planning.experiment_planners.network_topology import get_pool_and_conv_props

    parent_config = plans["configurations"][parent]
    if "inherits_from" in parent_config:
        raise ValueError(f"configuration {parent!r} inherits itself; pick a planned configuration")
    spacing = np.asarray(parent_config["spacing"], float)
    median_shape = np.asarray(parent_config["median_image_size_in_voxels"], float)
    aspect = 1.0 / spacing
    initial = aspect * (patch_voxels / np.prod(aspect)) ** (1.0 / len(spacing))
    initial = np.minimum(np.round(initial), median_shape).astype(int)
    _, strides, kernel_sizes, patch_size, _ = get_pool_and_conv_props(spacing, initial, 4, 999999)
    n_stages = len(strides)

    architecture = json.loads(json.dumps(parent_config["architecture"]))  # a deep copy
    arch_kwargs = architecture["arch_kwargs"]
    convs_encoder, convs_decoder = arch_kwargs["n_conv_per_stage"][0], arch_kwargs["n_conv_per_stage_decoder"][0]
    arch_kwargs.update({
        "n_stages": n_stages,
        "features_per_stage": [min(max_features, base_features * 2 ** i) for i in range(n_stages)],
        "kernel_sizes": [list(k) for k in kernel_sizes],
        "strides": [list(s) for s in strides],
        "n_conv_per_stage": [convs_encoder] * n_stages,
        "n_conv_per_stage_decoder": [convs_decoder] * (n_stages - 1),
    })
    return {
        "inherits_from": parent,
        # same resampling and normalisation as the parent, so its preprocessed folder serves both
        "data_identifier": parent_config["data_identifier"],
        "patch_size": [int(p) for p in patch_size],
        "batch_size": batch_size,
        "architecture": architecture,
    }


def add_small_configuration(plans_file: str | Path, name: str = SMALL_CONFIGURATION, **kwargs) -> dict:
    """Write ``make_small_configuration(plans, **kwargs)`` into a plans JSON as configuration ``name``; returns it."""
    plans_file = Path(plans_file)
    plans = json.loads(plans_file.read_text())
    plans["configurations"][name] = make_small_configuration(plans, **kwargs)
    plans_file.write_text(json.dumps(plans, indent=4))
    return plans["configurations"][name]


def plan_and_preprocess(dataset_id: int, work_dir: str | Path, threads: int = 1,
                        small_configuration: bool = True, **small_kwargs) -> str:
    """Fingerprint, plan and preprocess a raw dataset under ``work_dir/nnUNet_raw``; returns the plans identifier.

    Only 3d_fullres is preprocessed: the small configuration (added when ``small_configuration``; keyword
    arguments go to ``make_small_configuration()``) reads the same data, and 2d/3d_lowres are not used here.
    """
    from nnunetv2.experiment_planning.plan_and_preprocess_api import (extract_fingerprints, plan_experiments,
                                                                      preprocess)

    started = time.perf_counter()
    # planning instantiates networks with torch threads = nnUNet_n_proc_DA, and 0 breaks it
    with nnunet_environment(work_dir, threads, n_proc_da=1) as dirs:
        dataset_name = _dataset_name(dataset_id)
        preprocessed_dir = dirs["preprocessed"] / dataset_name
        # the planner copies the raw splits file unless one exists, and then insists they match: start afresh
        if (dirs["raw"] / dataset_name / RELEASE_SPLITS_FILE).is_file():
            (preprocessed_dir / "splits_final.json").unlink(missing_ok=True)
        extract_fingerprints([dataset_id], num_processes=threads, check_dataset_integrity=True, clean=True,
                             verbose=False, show_progress_bar=False)
        plans_identifier = plan_experiments([dataset_id])
        if small_configuration:
            config = add_small_configuration(preprocessed_dir / f"{plans_identifier}.json", **small_kwargs)
            LOG.info("plans: added %s (patch %s, features %s, batch %d)", SMALL_CONFIGURATION, config["patch_size"],
                     config["architecture"]["arch_kwargs"]["features_per_stage"], config["batch_size"])
        preprocess([dataset_id], plans_identifier, configurations=["3d_fullres"], num_processes=[threads],
                   verbose=False, show_progress_bar=False)
    LOG.info("planned and preprocessed %s in %.1f s", dataset_name, time.perf_counter() - started)
    return plans_identifier


# ---------------------------------------------------------------------------------------------------------
# 4. Training
# ---------------------------------------------------------------------------------------------------------

def write_release_splits(raw_dataset_dir: Path, preprocessed_dataset_dir: Path, fold: int) -> None:
    """Make nnU-Net's fold ``fold`` the release's train/val split (splits_final.json in the preprocessed folder).

    nnU-Net would otherwise draw a 5-fold cross-validation over all cases. Only fold 0 has a release split.
    """
    source = raw_dataset_dir / RELEASE_SPLITS_FILE
    if not source.is_file():
        LOG.warning("no %s in %s: nnU-Net makes its own 5-fold split", RELEASE_SPLITS_FILE, raw_dataset_dir)
        return
    splits = json.loads(source.read_text())
    if fold >= len(splits):
        raise ValueError(f"fold {fold}: the release split defines fold(s) 0..{len(splits) - 1} only")
    if not splits[fold]["train"] or not splits[fold]["val"]:
        raise ValueError(f"{source}: fold {fold} needs training and validation cases "
                         f"(has {len(splits[fold]['train'])} and {len(splits[fold]['val'])})")
    (preprocessed_dataset_dir / "splits_final.json").write_text(json.dumps(splits, indent=2))


def _without_mirroring(trainer, augmentation: bool) -> None:
    """Turn off mirroring (and, if not ``augmentation``, all augmentation) on this trainer instance.

    Mirroring would swap left and right, and the structure table names sides (kidney_left ...); this is
    what TotalSegmentator's nnUNetTrainerNoMirroring does. It also sets inference_allowed_mirroring_axes
    to None, which the checkpoint carries to the predictor. Patching the instance, not subclassing, keeps
    the class name and hence the checkpoint's trainer_name 'nnUNetTrainer'.
    """
    configure = type(trainer).configure_rotation_dummyDA_mirroring_and_inital_patch_size

    def no_mirroring(self):
        rotation, dummy_2d, initial_patch_size, _ = configure(self)
        self.inference_allowed_mirroring_axes = None
        if not augmentation:
            initial_patch_size = self.configuration_manager.patch_size  # no spatial transform: no margin
        return rotation, dummy_2d, initial_patch_size, None

    trainer.configure_rotation_dummyDA_mirroring_and_inital_patch_size = types.MethodType(no_mirroring, trainer)
    if not augmentation:
        # nnUNetTrainerNoDA's choice: the validation transforms (deep supervision targets only)
        def validation_transforms(patch_size, rotation_for_DA, deep_supervision_scales, mirror_axes,
                                  do_dummy_2d_data_aug, use_mask_for_norm=None, is_cascaded=False,
                                  foreground_labels=None, regions=None, ignore_label=None):
            return type(trainer).get_validation_transforms(deep_supervision_scales, is_cascaded,
                                                           foreground_labels, regions, ignore_label)

        trainer.get_training_transforms = validation_transforms


OPTIMIZERS = ("sgd", "adam")


def _use_optimizer(trainer, name: str) -> None:
    """``adam``: AdamW (AMSGrad) at lr 1e-3 with nnU-Net's polynomial decay, as nnUNetTrainerAdam1en3 does;
    set on the instance, so the checkpoint keeps the built-in trainer name. ``sgd``: nnU-Net's default."""
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer {name!r}: choose one of {', '.join(OPTIMIZERS)}")
    if name == "sgd":
        return
    from torch.optim import AdamW
    from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler

    def configure_optimizers(self):
        optimizer = AdamW(self.network.parameters(), lr=self.initial_lr, weight_decay=self.weight_decay,
                          amsgrad=True)
        return optimizer, PolyLRScheduler(optimizer, self.initial_lr, self.num_epochs)

    trainer.initial_lr = 1e-3
    trainer.configure_optimizers = types.MethodType(configure_optimizers, trainer)


@contextlib.contextmanager
def _trainer_module_global(name: str, value):
    """Within: the global ``name`` of nnU-Net's trainer module is ``value`` (restored on exit). Some of its
    behaviour hangs on module globals rather than on the trainer instance."""
    import nnunetv2.training.nnUNetTrainer.nnUNetTrainer as trainer_module

    saved = getattr(trainer_module, name)
    setattr(trainer_module, name, value)
    try:
        yield
    finally:
        setattr(trainer_module, name, saved)


def _validation_processes(threads: int):
    """nnU-Net's final validation sizes its worker pool by a module constant read at import; set it."""
    return _trainer_module_global("default_num_processes", threads)


LOSSES = ("dice_ce", "dice_topk10")


def _use_loss(trainer, name: str) -> None:
    """``dice_ce``: nnU-Net's Dice + cross-entropy. ``dice_topk10``: Dice + cross-entropy over the 10% hardest
    voxels (nnU-Net's nnUNetTrainerDiceTopK10Loss), set on the instance like the optimizer."""
    if name not in LOSSES:
        raise ValueError(f"loss {name!r}: choose one of {', '.join(LOSSES)}")
    if name == "dice_topk10":
        from nnunetv2.training.nnUNetTrainer.variants.loss.nnUNetTrainerTopkLoss import nnUNetTrainerDiceTopK10Loss

        trainer._build_loss = types.MethodType(nnUNetTrainerDiceTopK10Loss._build_loss, trainer)


@contextlib.contextmanager
def bfloat16_autocast_on_cpu(enabled: bool = True):
    """Within: nnU-Net's train and validation steps on the CPU compute in bfloat16 mixed precision.

    nnU-Net autocasts (float16) on CUDA only and enters ``dummy_context()`` on other devices (2.8.1);
    this swaps that name in its trainer module for torch's CPU bfloat16 autocast, restored on exit.
    Worth it on CPUs with bfloat16 instructions (AVX512-BF16, AMX): on such a 2-core machine a whole-image
    3d_small training step ran 1.58x faster (benchmarks/train_precision.py), a training iteration 1.5x."""
    if not enabled:
        yield
        return
    import torch

    with _trainer_module_global("dummy_context", lambda: torch.autocast("cpu", dtype=torch.bfloat16)):
        yield


def load_initial_weights(trainer, model_dir: str | Path, fold: int = 0) -> None:
    """Start training from an exported model's weights (all layers): to continue training a model.

    The model must have the trainer's labels and network (same plans configuration); anything else is a
    ValueError that says what differs.
    """
    import torch

    model_dir = Path(model_dir)
    checkpoint_file = model_dir / f"fold_{fold}" / "checkpoint_final.pth"
    if not checkpoint_file.is_file():
        raise ValueError(f"initial weights: no {checkpoint_file}")
    labels = json.loads((model_dir / "dataset.json").read_text())["labels"]
    if labels != trainer.dataset_json["labels"]:
        raise ValueError(f"initial weights {model_dir}: its labels differ from the training data's")
    weights = torch.load(checkpoint_file, map_location="cpu", weights_only=False)["network_weights"]
    try:
        trainer.network.load_state_dict(weights)
    except RuntimeError as err:
        raise ValueError(f"initial weights {model_dir}: not the network of this configuration ({err})") from None
    LOG.info("training starts from the weights of %s", model_dir)


def run_training_within(trainer, budget_s: float | None, initial_weights: str | Path | None = None) -> None:
    """``trainer.run_training()``, with the number of epochs cut to fit ``budget_s`` seconds (None: no limit).

    After each epoch the epochs still affordable are estimated from the mean duration of the epochs so far
    (the first, with its warm-up, left out once there are others) and ``num_epochs`` is lowered to fit,
    never raised; the learning-rate schedule (nnU-Net's polynomial decay over ``num_epochs``) is shortened
    with it, so a cut run still ends at a low learning rate. The hooks are nnU-Net's own, in the order its
    ``run_training`` calls them (2.8.1). ``initial_weights``: a model folder to start from
    (``load_initial_weights``).
    """
    import torch

    trainer.on_train_start()
    if initial_weights is not None:
        load_initial_weights(trainer, initial_weights)
    started = time.perf_counter()
    durations = []
    while trainer.current_epoch < trainer.num_epochs:
        epoch_started = time.perf_counter()
        trainer.on_epoch_start()
        trainer.on_train_epoch_start()
        outputs = [trainer.train_step(next(trainer.dataloader_train))
                   for _ in range(trainer.num_iterations_per_epoch)]
        trainer.on_train_epoch_end(outputs)
        with torch.no_grad():
            trainer.on_validation_epoch_start()
            outputs = [trainer.validation_step(next(trainer.dataloader_val))
                       for _ in range(trainer.num_val_iterations_per_epoch)]
            trainer.on_validation_epoch_end(outputs)
        trainer.on_epoch_end()
        durations.append(time.perf_counter() - epoch_started)
        if budget_s is not None:
            per_epoch = np.mean(durations[1:] if len(durations) > 1 else durations)
            left = budget_s - (time.perf_counter() - started)
            affordable = trainer.current_epoch + max(0, int(left // per_epoch))
            if affordable < trainer.num_epochs:
                LOG.info("time budget: %d epochs instead of %d (%.1f s per epoch)", affordable,
                         trainer.num_epochs, per_epoch)
                trainer.num_epochs = affordable
                trainer.lr_scheduler.max_steps = affordable
    trainer.on_train_end()


def train(dataset_id: int, work_dir: str | Path, configuration: str = SMALL_CONFIGURATION, fold: int = 0,
          epochs: int = 20, iterations_per_epoch: int = 50, val_iterations_per_epoch: int | None = None,
          device: str = "cpu", threads: int = 1, augmentation: bool = True, validate: bool = False,
          plans_identifier: str = PLANS_IDENTIFIER, data_workers: int = 0,
          time_budget_min: float | None = None, optimizer: str = "sgd",
          initial_weights: str | Path | None = None, loss: str = "dice_ce", bf16: bool = False) -> Path:
    """Train nnU-Net's built-in trainer in-process; returns the results folder
    (``nnUNet_results/DatasetXXX_Name/nnUNetTrainer__nnUNetPlans__<configuration>``).

    Fold 0 is the release's train/val split. Mirroring is always off (left/right structures), other
    augmentation unless ``augmentation=False``. ``val_iterations_per_epoch`` (default: a fifth of the
    training iterations, at least 1) sets the per-epoch pseudo-Dice estimate. ``validate`` runs nnU-Net's
    full validation afterwards (``fold_<k>/validation/summary.json``: Dice per structure of the val cases).

    ``threads`` (torch threads) must not exceed the cores that are really free: on 2 cores with another
    busy process, 2 threads made an iteration ~8x slower than 1. ``data_workers``: nnU-Net's data loading
    and augmentation processes (0: in the main process, best on a CPU; on a GPU machine give it cores).
    ``time_budget_min``: train at most ``epochs``, fewer if they would not fit this wall-clock budget
    (see ``run_training_within``); the log says how many ran. ``optimizer``: ``sgd`` (nnU-Net's SGD, lr 0.01,
    Nesterov momentum 0.99) or ``adam`` (AdamW with AMSGrad, lr 1e-3: nnU-Net's nnUNetTrainerAdam1en3 recipe,
    which learns much faster in short runs). ``initial_weights``: continue from an exported model folder of the
    same labels and configuration. ``bf16``: on the CPU, bfloat16 mixed precision (``bfloat16_autocast_on_cpu``;
    CUDA always trains in nnU-Net's float16 mixed precision).
    """
    import torch
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    if bf16 and device != "cpu":
        raise ValueError(f"bf16 is for CPU training; on {device} nnU-Net trains in float16 mixed precision already")
    if val_iterations_per_epoch is None:
        val_iterations_per_epoch = max(1, iterations_per_epoch // 5)
    with nnunet_environment(work_dir, threads, n_proc_da=data_workers) as dirs, bfloat16_autocast_on_cpu(bf16):
        dataset_name = _dataset_name(dataset_id)
        preprocessed_dir = dirs["preprocessed"] / dataset_name
        write_release_splits(dirs["raw"] / dataset_name, preprocessed_dir, fold)
        plans = json.loads((preprocessed_dir / f"{plans_identifier}.json").read_text())
        if configuration not in plans["configurations"]:
            raise ValueError(f"configuration {configuration!r} is not in the plans "
                             f"({', '.join(plans['configurations'])}); plan with small_configuration=True?")
        plans["continue_training"] = False  # the 2.8.1 trainer pops this from the plans
        dataset_json = json.loads((preprocessed_dir / "dataset.json").read_text())
        trainer = nnUNetTrainer(plans, configuration, fold, dataset_json, device=torch.device(device))
        trainer.num_epochs = epochs
        trainer.num_iterations_per_epoch = iterations_per_epoch
        trainer.num_val_iterations_per_epoch = val_iterations_per_epoch
        _without_mirroring(trainer, augmentation)
        _use_optimizer(trainer, optimizer)
        _use_loss(trainer, loss)

        started = time.perf_counter()
        run_training_within(trainer, None if time_budget_min is None else 60.0 * time_budget_min, initial_weights)
        seconds = time.perf_counter() - started
        dice = trainer.logger.get_value("mean_fg_dice", step=-1)
        LOG.info("trained %s %s fold %d on %s: %d epochs x %d iterations in %.1f s (%.3f s/iteration incl. "
                 "validation), last pseudo Dice %.3f", dataset_name, configuration, fold, device,
                 trainer.num_epochs, iterations_per_epoch, seconds,
                 seconds / max(1, trainer.num_epochs * iterations_per_epoch), dice)
        if validate:
            with _validation_processes(threads):
                trainer.perform_actual_validation()
        return Path(trainer.output_folder_base)


# ---------------------------------------------------------------------------------------------------------
# 5. Export
# ---------------------------------------------------------------------------------------------------------

def export_model(results_folder: str | Path, out_dir: str | Path, fold: int = 0,
                 checkpoint_name: str = "checkpoint_final.pth", half: bool = False) -> Path:
    """Copy what inference needs into out_dir, in nnU-Net's layout; returns out_dir.

    ``dataset.json``, ``plans.json`` and ``fold_<k>/<checkpoint_name>`` with only the keys the predictor
    reads (``INFERENCE_CHECKPOINT_KEYS``): the optimizer state, about twice the weights, is dropped.
    ``half`` stores floating-point weights as float16 (half the size; loading casts them back to the
    network's float32, and a segmentation model loses nothing that shows in its argmax). Load
    with ``nnUNetPredictor.initialize_from_trained_model_folder(out_dir, use_folds=(fold,),
    checkpoint_name=checkpoint_name)``.
    """
    import torch

    results_folder, out_dir = Path(results_folder), Path(out_dir)
    source = results_folder / f"fold_{fold}" / checkpoint_name
    if not source.is_file():
        raise FileNotFoundError(f"no checkpoint {source}: has training finished?")
    (out_dir / f"fold_{fold}").mkdir(parents=True, exist_ok=True)
    for name in ("dataset.json", "plans.json"):
        shutil.copyfile(results_folder / name, out_dir / name)
    checkpoint = torch.load(source, map_location="cpu", weights_only=False)
    missing = {"network_weights", "init_args", "trainer_name"} - set(checkpoint)
    if missing:
        raise ValueError(f"{source}: not an nnU-Net checkpoint (lacks {sorted(missing)})")
    slim = {key: checkpoint[key] for key in INFERENCE_CHECKPOINT_KEYS if key in checkpoint}
    if half:
        # nnU-Net's state dicts hold each conv weight under two names (one tensor): convert each tensor once,
        # or torch.save would store both copies
        converted = {}
        slim["network_weights"] = {
            key: converted.setdefault(value.data_ptr(), value.half()) if value.is_floating_point() else value
            for key, value in slim["network_weights"].items()}
    target = out_dir / f"fold_{fold}" / checkpoint_name
    torch.save(slim, target)
    LOG.info("exported %s to %s: checkpoint %.2f MB (was %.2f MB)", results_folder, out_dir,
             target.stat().st_size / 1e6, source.stat().st_size / 1e6)
    return out_dir


# ---------------------------------------------------------------------------------------------------------
# 6. The whole chain
# ---------------------------------------------------------------------------------------------------------

def train_from_release(release_dir: str | Path, out_dir: str | Path, work_dir: str | Path,
                       dataset_id: int = DEFAULT_DATASET_ID, name: str = DEFAULT_DATASET_NAME,
                       epochs: int = 20, iterations: int = 50, threads: int = 1,
                       structures: list[str] | None = None, configuration: str = SMALL_CONFIGURATION,
                       device: str = "cpu", validate: bool = True, augmentation: bool = True,
                       data_workers: int = 0, time_budget_min: float | None = None,
                       small_configuration: dict | None = None, half: bool = False,
                       optimizer: str = "sgd", initial_weights: str | Path | None = None,
                       loss: str = "dice_ce", bf16: bool = False) -> Path:
    """Release folder -> exported nnU-Net model in out_dir (returned); nnU-Net's folders live in work_dir.

    ``small_configuration``: keyword arguments of ``make_small_configuration`` (patch size, features, batch);
    ``half``: export the weights as float16. The other arguments are ``train()``'s.
    """
    raw_root = nnunet_dirs(work_dir)["raw"]
    release_to_nnunet_raw(release_dir, raw_root, dataset_id, name, structures, processes=max(threads, data_workers))
    plan_and_preprocess(dataset_id, work_dir, threads, small_configuration=configuration == SMALL_CONFIGURATION,
                        **(small_configuration or {}))
    results = train(dataset_id, work_dir, configuration, fold=0, epochs=epochs, iterations_per_epoch=iterations,
                    device=device, threads=threads, validate=validate, augmentation=augmentation,
                    data_workers=data_workers, time_budget_min=time_budget_min, optimizer=optimizer,
                    initial_weights=initial_weights, loss=loss, bf16=bf16)
    return export_model(results, out_dir, fold=0, half=half)


TINY_SPACING = (6.0, 6.0, 8.0)


def train_tiny_model(out_dir: str | Path, n: int = 6, seed: int = 7, spacing=TINY_SPACING, epochs: int = 1,
                     iterations: int = 2, threads: int = 1, dataset_id: int = 999,
                     structures: list[str] | None = None) -> Path:
    """A real but barely trained nnU-Net model, quickly (well under a minute on 2 cores), for tests.

    Writes ``out_dir/release`` (n coarse phantom scans, one val case), ``out_dir/nnunet`` (nnU-Net's
    folders) and returns ``out_dir/model``, an exported model folder with fold_0/checkpoint_final.pth and
    the small configuration; its labels are the phantom's structures (``structures``: a subset, in order).
    Call it under an ``if __name__ == "__main__":`` guard or from pytest.
    """
    out_dir = Path(out_dir)
    release = write_phantom_release(out_dir / "release", n, seed, spacing, val_fraction=0.2)
    return train_from_release(release, out_dir / "model", out_dir / "nnunet", dataset_id=dataset_id,
                              name="PhantomTiny", epochs=epochs, iterations=iterations, threads=threads,
                              structures=structures, validate=False)
