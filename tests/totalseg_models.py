"""nnU-Net v2 model folders with tiny, seeded random networks, for segmentation tests that run in seconds.

``write_model`` writes one trained-model folder (dataset.json, plans.json, fold_N/checkpoint_final.pth) with
the reader, spacing, transpose and patch asked for; ``write_release`` writes folders shaped exactly like
TotalSegmentator's published weights (folder and trainer names, dataset.json labels as published: datasets
291-295 from resources/structures/total_v2_parts.csv, 297/298 the 117 v2 class names in label order, reader
NibabelIOWithReorient as TotalSegmentator's dataset conversion sets it). ``nnunet_own_labels`` segments a
scan file with nnU-Net's own predictor, loaded by nnU-Net from the folder and fed by the plans' reader class,
as an independent reference.
"""

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

STRUCTURES = Path(__file__).resolve().parents[1] / "resources" / "structures"
RELEASE_FOLDERS = {
    291: "Dataset291_TotalSegmentator_part1_organs_1559subj",
    292: "Dataset292_TotalSegmentator_part2_vertebrae_1532subj",
    293: "Dataset293_TotalSegmentator_part3_cardiac_1559subj",
    294: "Dataset294_TotalSegmentator_part4_muscles_1559subj",
    295: "Dataset295_TotalSegmentator_part5_ribs_1559subj",
    297: "Dataset297_TotalSegmentator_total_3mm_1559subj",
    298: "Dataset298_TotalSegmentator_total_6mm_1559subj",
}
RELEASE_TRAINERS = {
    **{i: "nnUNetTrainerNoMirroring" for i in range(291, 296)},
    297: "nnUNetTrainer_4000epochs_NoMirroring",
    298: "nnUNetTrainer_4000epochs_NoMirroring",
}
RELEASE_SPACING_MM = {**{i: 1.5 for i in range(291, 296)}, 297: 3.0, 298: 6.0}
CT_INTENSITIES = {
    "max": 3000.0,
    "mean": 50.0,
    "median": 40.0,
    "min": -1024.0,
    "percentile_00_5": -1000.0,
    "percentile_99_5": 1500.0,
    "std": 400.0,
}


def release_labels(dataset_id: int) -> dict[str, int]:
    """dataset.json labels (name -> part label, background excluded) of a published TotalSegmentator dataset."""
    parts = pd.read_csv(STRUCTURES / "total_v2_parts.csv")
    part = parts[parts["task_id"] == dataset_id]
    if len(part):
        return dict(zip(part["name"], part["part_label"].astype(int)))
    classes = pd.read_csv(STRUCTURES / "total_v2_classes.csv")
    return dict(zip(classes["name"], classes["label"].astype(int)))


def plain_conv_unet(features, kernels, strides, convs_per_stage: int) -> dict:
    """A plans configuration's ``architecture``: nnU-Net's plain 3D U-Net (instance norm, leaky ReLU, no dropout)
    with these features, kernel sizes and strides per stage."""
    n_stages = len(features)
    return {
        "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
        "arch_kwargs": {
            "n_stages": n_stages,
            "features_per_stage": list(features),
            "conv_op": "torch.nn.modules.conv.Conv3d",
            "kernel_sizes": [list(k) for k in kernels],
            "strides": [list(s) for s in strides],
            "n_conv_per_stage": [convs_per_stage] * n_stages,
            "n_conv_per_stage_decoder": [convs_per_stage] * (n_stages - 1),
            "conv_bias": True,
            "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
            "norm_op_kwargs": {"eps": 1e-05, "affine": True},
            "dropout_op": None,
            "dropout_op_kwargs": None,
            "nonlin": "torch.nn.LeakyReLU",
            "nonlin_kwargs": {"inplace": True},
        },
        "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
    }


def _plans(dataset_name: str, reader: str, spacing, patch, transpose_forward, features, strides=None) -> dict:
    n_stages = len(features)
    strides = strides or [[1, 1, 1]] + [[2, 2, 2]] * (n_stages - 1)
    backward = [list(transpose_forward).index(i) for i in range(3)]
    return {
        "dataset_name": dataset_name,
        "plans_name": "nnUNetPlans",
        "original_median_spacing_after_transp": list(spacing),
        "original_median_shape_after_transp": list(patch),
        "image_reader_writer": reader,
        "transpose_forward": list(transpose_forward),
        "transpose_backward": backward,
        "experiment_planner_used": "ExperimentPlanner",
        "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {"0": CT_INTENSITIES},
        "configurations": {
            "3d_fullres": {
                "data_identifier": "nnUNetPlans_3d_fullres",
                "preprocessor_name": "DefaultPreprocessor",
                "batch_size": 2,
                "patch_size": list(patch),
                "median_image_size_in_voxels": list(patch),
                "spacing": list(spacing),
                "normalization_schemes": ["CTNormalization"],
                "use_mask_for_norm": [False],
                "resampling_fn_data": "resample_data_or_seg_to_shape",
                "resampling_fn_seg": "resample_data_or_seg_to_shape",
                "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None},
                "resampling_fn_seg_kwargs": {"is_seg": True, "order": 1, "order_z": 0, "force_separate_z": None},
                "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
                "resampling_fn_probabilities_kwargs": {
                    "is_seg": False,
                    "order": 1,
                    "order_z": 0,
                    "force_separate_z": None,
                },
                "architecture": plain_conv_unet(features, [[3, 3, 3]] * n_stages, strides, convs_per_stage=1),
                "batch_dice": False,
            }
        },
    }


def write_model(
    folder,
    labels: dict[str, int],
    *,
    dataset_name: str,
    trainer: str = "nnUNetTrainer",
    reader: str = "SimpleITKIO",
    spacing=(2.0, 1.5, 1.5),
    patch=(8, 12, 16),
    transpose_forward=(0, 1, 2),
    features=(4, 8, 8),
    strides=None,
    folds=(0,),
    seed: int = 0,
    force_label: int | None = None,
    active_labels=None,
    mirror_axes=None,
) -> Path:
    """One nnU-Net trained model folder with seeded random weights; returns ``folder``.

    ``labels``: name -> label (background added); ``spacing``, ``patch`` and ``strides`` (per stage; default 1,
    then 2 along every axis) in the network's axis order (after ``transpose_forward``, as plans.json holds them);
    each fold's weights drawn from ``seed`` + fold.
    ``force_label``: that label wins everywhere (the last layer's weights zeroed, its bias decides);
    ``active_labels``: only these labels can win (the others' bias pushed far down), so that a random
    network predicts a few labels, background among them, each in many voxels.
    ``mirror_axes``: the checkpoint's inference_allowed_mirroring_axes (None: a NoMirroring trainer's).
    """
    import torch
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    plans = _plans(dataset_name, reader, spacing, patch, transpose_forward, features, strides)
    dataset = {
        "channel_names": {"0": "CT"},
        "labels": {"background": 0, **labels},
        "numTraining": 1,
        "file_ending": ".nii.gz",
    }
    if reader != "SimpleITKIO":
        dataset["overwrite_image_reader_writer"] = reader
    (folder / "plans.json").write_text(json.dumps(plans, indent=2))
    (folder / "dataset.json").write_text(json.dumps(dataset, indent=2))
    architecture = plans["configurations"]["3d_fullres"]["architecture"]
    for fold in folds:
        torch.manual_seed(seed + fold)
        network = get_network_from_plans(
            architecture["network_class_name"],
            architecture["arch_kwargs"],
            architecture["_kw_requires_import"],
            1,
            len(labels) + 1,
            allow_init=True,
            deep_supervision=False,
        )
        last = network.decoder.seg_layers[-1]
        with torch.no_grad():
            if force_label is not None:
                last.weight.zero_()
                last.bias.fill_(-10.0)
                last.bias[force_label] = 10.0
            elif active_labels is not None:
                inactive = torch.ones(len(labels) + 1, dtype=torch.bool)
                inactive[list(active_labels)] = False
                last.bias[inactive] = -50.0  # far below any random logit, and finite in float16
        (folder / f"fold_{fold}").mkdir(exist_ok=True)
        torch.save(
            {
                "network_weights": network.state_dict(),
                "trainer_name": trainer,
                "init_args": {"configuration": "3d_fullres", "fold": fold},
                "inference_allowed_mirroring_axes": mirror_axes,
            },
            folder / f"fold_{fold}" / "checkpoint_final.pth",
        )
    return folder


def release_model_dir(root, dataset_id: int) -> Path:
    """Where TotalSegmentator's weights hold dataset ``dataset_id``'s model under the weights folder ``root``."""
    return Path(root) / RELEASE_FOLDERS[dataset_id] / f"{RELEASE_TRAINERS[dataset_id]}__nnUNetPlans__3d_fullres"


def write_release(root, dataset_ids=(291, 292, 293, 294, 295, 297), settings: dict | None = None, **common) -> Path:
    """A weights folder shaped like TotalSegmentator's release (``root``, returned); ``settings``: per dataset id,
    ``write_model`` arguments (force_label, active_labels, seed, ...) on top of ``common``."""
    for dataset_id in dataset_ids:
        spacing = RELEASE_SPACING_MM[dataset_id]
        kwargs = {"spacing": (spacing,) * 3, "seed": dataset_id, **common, **(settings or {}).get(dataset_id, {})}
        write_model(
            release_model_dir(root, dataset_id),
            release_labels(dataset_id),
            dataset_name=RELEASE_FOLDERS[dataset_id],
            trainer=RELEASE_TRAINERS[dataset_id],
            reader="NibabelIOWithReorient",
            **kwargs,
        )
    return Path(root)


def trainer_class(name: str):
    """nnU-Net's trainer class of that name, imported from its own module. nnU-Net's lookup by name imports
    every trainer module, and through the Primus trainers timm and torchvision, which need a torchvision
    built for the installed torch; the classes themselves are nnU-Net's either way."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.training.nnUNetTrainer.variants.data_augmentation.nnUNetTrainerNoMirroring import (
        nnUNetTrainerNoMirroring,
    )
    from nnunetv2.training.nnUNetTrainer.variants.training_length.nnUNetTrainer_Xepochs_NoMirroring import (
        nnUNetTrainer_4000epochs_NoMirroring,
    )

    classes = {
        cls.__name__: cls for cls in (nnUNetTrainer, nnUNetTrainerNoMirroring, nnUNetTrainer_4000epochs_NoMirroring)
    }
    return classes[name]


def nnunet_own_labels(
    model_folder, ct_path, tmp_dir, *, folds=(0,), mirroring: bool = False, tile_step: float = 0.5
) -> np.ndarray:
    """nnU-Net's own segmentation of a scan file, in the file's stored voxel order: the predictor loaded by
    nnU-Net from the folder, the image read and the labels written by the plans' reader class, preprocessing
    and export by nnU-Net (``predict_single_npy_array``: predict_from_files' steps without its worker processes)."""
    import contextlib
    import io
    from unittest import mock

    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    with (
        contextlib.redirect_stdout(io.StringIO()),
        mock.patch("nnunetv2.inference.predict_from_raw_data.recursive_find_trainer_class_by_name", trainer_class),
    ):
        predictor = nnUNetPredictor(
            tile_step_size=tile_step,
            use_gaussian=True,
            use_mirroring=mirroring,
            perform_everything_on_device=False,
            device=torch.device("cpu"),
            verbose=False,
            allow_tqdm=False,
        )
        predictor.initialize_from_trained_model_folder(str(model_folder), use_folds=tuple(folds))
        reader = predictor.plans_manager.image_reader_writer_class()
        data, properties = reader.read_images([str(ct_path)])
        labels = predictor.predict_single_npy_array(data, properties, None, None, False)
        out = Path(tmp_dir) / "nnunet_own.nii.gz"
        reader.write_seg(labels, str(out), properties)
    return np.asanyarray(nib.load(out).dataobj)


TOTALSEGMENTATOR_VERSION = "2.18.0"
# Where the tests and benchmarks find TotalSegmentator's code: installed in the environment, or in a folder
# named by this variable (pip install --no-deps --target FOLDER totalsegmentator==2.18.0 dicom2nifti)
TOTALSEGMENTATOR_PACKAGES = "CTCOHORT_TOTALSEGMENTATOR"


def totalsegmentator_environment(weights, home, packages=None) -> dict:
    """Environment of a process that runs TotalSegmentator's code on ``weights`` (its release layout) with
    nothing downloaded: nnU-Net's results folder is the weights folder, TotalSegmentator's home ``home``."""
    import os

    env = dict(
        os.environ,
        nnUNet_results=str(weights),
        nnUNet_raw=str(home),
        nnUNet_preprocessed=str(home),
        TOTALSEG_HOME_DIR=str(home),
        TOTALSEG_WEIGHTS_PATH=str(weights),
    )
    packages = packages or os.environ.get(TOTALSEGMENTATOR_PACKAGES)
    if packages:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(packages), env.get("PYTHONPATH", "")) if p)
    return env


def totalsegmentator_problem(env: dict) -> str | None:
    """Why TotalSegmentator's inference code cannot run in ``env`` (None: it imports, at the pinned version)."""
    import subprocess
    import sys

    check = "import importlib.metadata as m, totalsegmentator.nnunet; print(m.version('totalsegmentator'))"
    done = subprocess.run([sys.executable, "-c", check], env=env, capture_output=True, text=True)
    if done.returncode:
        return f"TotalSegmentator's code does not import: {done.stderr.strip().splitlines()[-1:]}"
    version = done.stdout.strip().splitlines()[-1]
    if version != TOTALSEGMENTATOR_VERSION:
        return f"TotalSegmentator {version} installed, the comparison is written against {TOTALSEGMENTATOR_VERSION}"
    return None


def totalsegmentator_labels(
    env: dict, scans, outputs, *, task_ids, trainer: str, resample, device: str = "cpu", timings=None
) -> list[np.ndarray]:
    """TotalSegmentator's own label maps of ``scans`` (written to ``outputs``), by tests/totalsegmentator_driver.py
    in a process of its own; ``timings``: a JSON file for its seconds per scan."""
    import subprocess
    import sys

    command = [
        sys.executable,
        str(Path(__file__).with_name("totalsegmentator_driver.py")),
        "--trainer",
        trainer,
        "--resample",
        *map(str, resample),
        "--device",
        device,
    ]
    command += [arg for task_id in task_ids for arg in ("--task-id", str(task_id))]
    command += ["--timings", str(timings)] if timings else []
    command += [str(path) for pair in zip(scans, outputs) for path in pair]
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(
            f"TotalSegmentator failed ({done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
        )
    return [np.asanyarray(nib.load(path).dataobj) for path in outputs]
