"""nnU-Net training: the settings and their one source of defaults, CPU plans, real tiny training runs."""

import dataclasses
import json
import os

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import REPO
from tiny_model import TINY_NETWORK, train_tiny_model, write_test_release
from totalseg_models import nnunet_own_labels

from ctcohort import phantom, train
from ctcohort.cli import main
from ctcohort.nnunet_adapter import INFERENCE_CHECKPOINT_KEYS
from ctcohort.release import release_subject_id
from ctcohort.structures import load_structure_table

try:
    import nnunetv2  # noqa: F401

    NNUNET_MISSING = None
except Exception as err:  # a broken install fails in many ways
    NNUNET_MISSING = f"nnunetv2 cannot be imported ({err}); pip install 'ctcohort[segment]'"
needs_nnunet = pytest.mark.skipif(NNUNET_MISSING is not None, reason=NNUNET_MISSING or "")

STRUCTURE_NAMES = [s.name for s in phantom.ANATOMY]


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """Six coarse phantom scans in the release layout, one of them val and one test."""
    return write_test_release(tmp_path_factory.mktemp("release"))


def test_shipped_config_states_the_settings_defaults():
    """config/config.yaml's training block (explicit, as the schema requires) equals TrainingSettings' defaults,
    key for key: the two cannot drift apart."""
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())["training"]
    defaults = dataclasses.asdict(train.TrainingSettings())
    command_line_only = {"name"}
    assert set(defaults) - set(config) == command_line_only
    assert {key: defaults[key] for key in config} == config
    assert train.TrainingSettings.from_config(config) == train.TrainingSettings()


def test_command_line_defaults_are_the_settings_defaults(monkeypatch):
    received = []
    monkeypatch.setattr(train, "train_model", lambda out, work, settings, **kwargs: received.append(settings) or out)
    assert main(["train", "-o", "model", "--work", "work"]) == 0
    assert received.pop() == train.TrainingSettings()
    assert (
        main(
            [
                "train",
                "-o",
                "model",
                "--work",
                "work",
                "--epochs",
                "3",
                "--bf16",
                "--no-augmentation",
                "--patch-voxels",
                "4096",
                "--name",
                "Other",
                "--release",
                "data",
            ]
        )
        == 0
    )
    assert received.pop() == dataclasses.replace(
        train.TrainingSettings(),
        epochs=3,
        bf16=True,
        augmentation=False,
        name="Other",
        release="data",
        small_configuration=dataclasses.replace(train.SmallConfiguration(), patch_voxels=4096),
    )
    assert main(["train", "-o", "model", "--work", "work", "--device", "cuda", "--bf16"]) == 1  # before any work
    assert not received


def test_schema_choices_are_the_settings():
    schema = yaml.safe_load((REPO / "workflow" / "schemas" / "config.schema.yaml").read_text())
    training = schema["properties"]["training"]["properties"]
    assert tuple(training["optimizer"]["enum"]) == train.OPTIMIZERS and tuple(training["loss"]["enum"]) == train.LOSSES
    assert tuple(training["device"]["enum"]) == train.DEVICES


def test_contradictory_settings_are_errors_before_any_work():
    with pytest.raises(ValueError, match="bf16 is for CPU training"):
        train.TrainingSettings(device="cuda", bf16=True)
    with pytest.raises(ValueError, match="optimizer 'rmsprop'"):
        train.TrainingSettings(optimizer="rmsprop")
    with pytest.raises(ValueError, match="loss 'focal'"):
        train.TrainingSettings(loss="focal")
    with pytest.raises(ValueError, match="device 'mps'"):
        train.TrainingSettings(device="mps")


@needs_nnunet
def test_small_configuration_is_consistent():
    """On a plans dict like the planner's: patch divisible by the total stride, one entry per stage."""
    arch = {
        "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
        "arch_kwargs": {
            "n_stages": 6,
            "features_per_stage": [32, 64, 128, 256, 320, 320],
            "kernel_sizes": [[3, 3, 3]] * 6,
            "strides": [[1, 1, 1]] + [[2, 2, 2]] * 5,
            "n_conv_per_stage": [2] * 6,
            "n_conv_per_stage_decoder": [2] * 5,
        },
        "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
    }
    plans = {
        "configurations": {
            "3d_fullres": {
                "data_identifier": "nnUNetPlans_3d_fullres",
                "spacing": [4.0, 2.5, 2.5],
                "median_image_size_in_voxels": [132, 112, 152],
                "patch_size": [96, 160, 160],
                "batch_size": 2,
                "architecture": arch,
            }
        }
    }
    config = train.make_small_configuration(plans)
    kwargs = config["architecture"]["arch_kwargs"]
    n = kwargs["n_stages"]
    assert len(kwargs["features_per_stage"]) == len(kwargs["kernel_sizes"]) == len(kwargs["strides"]) == n
    assert len(kwargs["n_conv_per_stage"]) == n and len(kwargs["n_conv_per_stage_decoder"]) == n - 1
    assert kwargs["features_per_stage"][0] == 16 and max(kwargs["features_per_stage"]) <= 256
    total_stride = np.prod(kwargs["strides"], axis=0)
    assert all(p % s == 0 for p, s in zip(config["patch_size"], total_stride))
    assert 0.5 * 48**3 <= np.prod(config["patch_size"]) <= 2 * 48**3
    assert config["inherits_from"] == "3d_fullres" and config["data_identifier"] == "nnUNetPlans_3d_fullres"
    assert config["batch_size"] == 2
    assert arch["arch_kwargs"]["n_stages"] == 6  # the parent is left alone


def test_mirrored_checkpoint_computes_the_mirror_image_through_strided_and_transposed_convolutions():
    """A strided convolution (on an odd size, where its samples are symmetric), instance norm and a transposed
    convolution: with mirror_checkpoint's weights, the output on the input flipped along an axis is the output
    flipped along it; the original weights are not mirror-symmetric."""
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)

    def network():
        return torch.nn.Sequential(
            torch.nn.Conv3d(2, 4, 3, stride=2, padding=1),
            torch.nn.InstanceNorm3d(4, affine=True),
            torch.nn.LeakyReLU(),
            torch.nn.ConvTranspose3d(4, 3, 2, stride=2),
        ).eval()

    original, mirrored = network(), network()
    image = torch.randn(1, 2, 7, 9, 5)
    for axis in range(3):
        checkpoint = {"network_weights": original.state_dict(), "trainer_name": "nnUNetTrainer"}
        flipped = train.mirror_checkpoint(checkpoint, axis)
        assert flipped["trainer_name"] == "nnUNetTrainer"
        mirrored.load_state_dict(flipped["network_weights"])
        with torch.no_grad():
            expected = original(image).flip(2 + axis)
            torch.testing.assert_close(mirrored(image.flip(2 + axis)), expected, rtol=1e-5, atol=1e-5)
            assert (original(image.flip(2 + axis)) - expected).abs().max() > 0.1


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """One real, tiny nnU-Net training (1 epoch x 2 iterations) for all the tests below; its out_dir."""
    if NNUNET_MISSING:
        pytest.skip(NNUNET_MISSING)
    import torch

    out = tmp_path_factory.mktemp("tiny")
    env_before = {key: os.environ.get(key) for key in ("nnUNet_raw", "nnUNet_results", "nnUNet_n_proc_DA")}
    threads_before = torch.get_num_threads()
    model = train_tiny_model(out, threads=2)
    assert model == out / "model"
    # nnU-Net's settings were for the training only
    assert {key: os.environ.get(key) for key in env_before} == env_before
    assert torch.get_num_threads() == threads_before
    return out


@pytest.mark.slow
def test_tiny_training_results_and_plans(tiny):
    results = tiny / "nnunet" / "nnUNet_results" / "Dataset999_PhantomTiny" / "nnUNetTrainer__nnUNetPlans__3d_small"
    assert (results / "fold_0" / "checkpoint_final.pth").is_file()
    preprocessed = tiny / "nnunet" / "nnUNet_preprocessed" / "Dataset999_PhantomTiny"
    splits = json.loads((preprocessed / "splits_final.json").read_text())
    meta = pd.read_csv(tiny / "release" / "meta.csv", sep=";")
    assert set(splits[0]["val"]) == set(meta["image_id"][meta["split"] == "val"])
    assert set(splits[0]["train"]) == set(meta["image_id"][meta["split"] == "train"])
    plans = json.loads((preprocessed / "nnUNetPlans.json").read_text())
    cpu = plans["configurations"]["3d_small"]
    assert cpu["inherits_from"] == "3d_fullres"
    assert cpu["data_identifier"] == plans["configurations"]["3d_fullres"]["data_identifier"]
    assert (preprocessed / cpu["data_identifier"]).is_dir()


@pytest.mark.slow
def test_exported_model_is_small_and_complete(tiny):
    import torch

    model = tiny / "model"
    files = sorted(str(p.relative_to(model)) for p in model.rglob("*") if p.is_file())
    assert files == ["dataset.json", "fold_0/checkpoint_final.pth", "plans.json"]
    checkpoint = torch.load(model / "fold_0" / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert set(checkpoint) <= set(INFERENCE_CHECKPOINT_KEYS)
    assert checkpoint["trainer_name"] == "nnUNetTrainer"
    assert checkpoint["init_args"]["configuration"] == "3d_small"
    assert checkpoint["inference_allowed_mirroring_axes"] is None  # left/right structures: never mirror
    full = tiny / "nnunet" / "nnUNet_results" / "Dataset999_PhantomTiny" / "nnUNetTrainer__nnUNetPlans__3d_small"
    assert (model / "fold_0" / "checkpoint_final.pth").stat().st_size < 0.6 * (
        full / "fold_0" / "checkpoint_final.pth"
    ).stat().st_size


@pytest.mark.slow
def test_exported_model_predicts(tiny, tmp_path):
    model = tiny / "model"
    n_labels = len(json.loads((model / "dataset.json").read_text())["labels"]) - 1
    meta = pd.read_csv(tiny / "release" / "meta.csv", sep=";")
    subject = meta["image_id"][meta["split"] == "val"].iloc[0]
    ct = tiny / "release" / subject / "ct.nii.gz"
    seg = nnunet_own_labels(model, ct, tmp_path)  # nnU-Net's own predictor, loaded from the exported folder
    assert seg.shape == nib.load(ct).shape
    assert seg.min() >= 0 and seg.max() <= n_labels


def short_adam_run(dataset_id: int, name: str, epochs: int, **settings) -> train.TrainingSettings:
    """Settings of a short run of the tiny network: one iteration an epoch, AdamW, no augmentation."""
    return train.TrainingSettings(
        dataset_id=dataset_id,
        name=name,
        epochs=epochs,
        iterations=1,
        augmentation=False,
        optimizer="adam",
        small_configuration=TINY_NETWORK,
        **settings,
    )


@pytest.fixture(scope="module")
def budgeted(release, tmp_path_factory):
    """A real tiny training run with AdamW, the top-k loss and bfloat16 mixed precision, a time budget far too
    small for its 5 epochs, float16 export."""
    if NNUNET_MISSING:
        pytest.skip(NNUNET_MISSING)
    out = tmp_path_factory.mktemp("budgeted")
    settings = short_adam_run(998, "Budgeted", 5, time_budget_min=1e-4, loss="dice_topk10", half=True, bf16=True)
    model = train.train_from_release(release, out / "model", out / "nnunet", settings, threads=2, validate=False)
    return out, model


@pytest.mark.slow
def test_time_budget_cuts_epochs_and_adam_and_topk_are_used(budgeted):
    import torch

    out, _ = budgeted
    results = out / "nnunet" / "nnUNet_results" / "Dataset998_Budgeted" / "nnUNetTrainer__nnUNetPlans__3d_small"
    checkpoint = torch.load(results / "fold_0" / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert checkpoint["current_epoch"] == 1  # one epoch ran: the budget allowed no second
    assert np.isfinite(checkpoint["logging"]["train_losses"]).all()  # bfloat16 steps gave real losses
    groups = checkpoint["optimizer_state"]["param_groups"]
    assert groups[0]["amsgrad"] is True and groups[0]["initial_lr"] == pytest.approx(1e-3)
    assert "TopKLoss" in json.loads((results / "fold_0" / "debug.json").read_text())["loss"]
    plans = json.loads((results / "plans.json").read_text())
    small = plans["configurations"]["3d_small"]
    # whole-image patches: the patch covers the median image
    assert all(
        p >= m
        for p, m in zip(small["patch_size"], plans["configurations"]["3d_fullres"]["median_image_size_in_voxels"])
    )
    assert small["architecture"]["arch_kwargs"]["features_per_stage"][0] == 8
    assert max(small["architecture"]["arch_kwargs"]["features_per_stage"]) == 32


@pytest.mark.slow
def test_half_export_stores_each_tensor_once_and_segments(budgeted, release):
    import torch

    from ctcohort.segment import SegmentationSettings, Segmenter

    _, model = budgeted
    path = model / "fold_0" / "checkpoint_final.pth"
    weights = torch.load(path, map_location="cpu", weights_only=False)["network_weights"]
    assert {w.dtype for w in weights.values() if w.is_floating_point()} == {torch.float16}
    unique_bytes = sum(w.numel() * w.element_size() for w in {w.data_ptr(): w for w in weights.values()}.values())
    assert path.stat().st_size < unique_bytes + 200_000  # shared conv weights are not stored twice

    ct = nib.load(release / release_subject_id(0) / "ct.nii.gz")
    labels = Segmenter(
        model, load_structure_table("total_v1"), settings=SegmentationSettings(device="cpu", threads=1)
    ).segment(ct)
    assert labels.shape == ct.shape


@pytest.mark.slow
def test_training_continues_from_a_model_and_rejects_another_network(budgeted, release, tiny, tmp_path):
    import torch

    _, start = budgeted
    settings = short_adam_run(997, "Continued", 1)
    continued = train.train_from_release(
        release, tmp_path / "model", tmp_path / "nnunet", settings, threads=2, validate=False, initial_weights=start
    )

    def weights(model):
        return torch.load(model / "fold_0" / "checkpoint_final.pth", map_location="cpu", weights_only=False)[
            "network_weights"
        ]

    before, after = weights(start), weights(continued)
    key = "encoder.stages.0.0.convs.0.conv.weight"
    # one AdamW step at lr 1e-3 moves a weight by about 1e-3; a fresh initialisation would differ by ~0.1
    assert (after[key].float() - before[key].float()).abs().max() < 0.01
    with pytest.raises(ValueError, match="not the network of this configuration"):
        other = train.TrainingSettings(
            dataset_id=996, name="Other", epochs=1, iterations=1, small_configuration=TINY_NETWORK
        )
        train.train_from_release(
            release,
            tmp_path / "model2",
            tmp_path / "nnunet2",
            other,
            threads=2,
            validate=False,
            initial_weights=tiny / "model",
        )


@pytest.mark.slow
def test_snakemake_train_target_writes_a_model(tmp_path):
    import torch
    from conftest import run_workflow

    if NNUNET_MISSING:
        pytest.skip(NNUNET_MISSING)
    training = {
        "phantom_n": 5,
        "epochs": 1,
        "iterations": 1,
        "optimizer": "adam",
        "augmentation": False,
        "half": True,
        "time_budget_min": 10,
        "small_configuration": {"patch_voxels": 32**3, "base_features": 8, "max_features": 32, "batch_size": 1},
    }
    run_workflow(tmp_path, {"training": training}, "train")
    model = tmp_path / "results" / "train" / "model"
    files = sorted(str(p.relative_to(model)) for p in model.rglob("*") if p.is_file())
    assert files == [".snakemake_timestamp", "dataset.json", "fold_0/checkpoint_final.pth", "plans.json"]
    checkpoint = torch.load(model / "fold_0" / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert checkpoint["init_args"]["configuration"] == "3d_small"
    assert next(iter(checkpoint["network_weights"].values())).dtype == torch.float16
    labels = json.loads((model / "dataset.json").read_text())["labels"]
    assert set(labels) == {"background", *STRUCTURE_NAMES}
    assert "trained Dataset901_CTCohort 3d_small" in (tmp_path / "results" / "logs" / "train.log").read_text()
