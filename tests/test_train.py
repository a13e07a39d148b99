"""Training data and nnU-Net training: phantom release, raw conversion, CPU plans, a real tiny training run."""

import json
import os

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from ctcohort import phantom, train
from ctcohort.imaging import GridMismatchError
from ctcohort.structures import load_structure_table

try:
    import nnunetv2  # noqa: F401

    NNUNET_MISSING = None
except Exception as err:  # a broken install fails in many ways
    NNUNET_MISSING = f"nnunetv2 cannot be imported ({err}); pip install 'ctcohort[segment]'"
needs_nnunet = pytest.mark.skipif(NNUNET_MISSING is not None, reason=NNUNET_MISSING or "")

SPACING = train.TINY_SPACING
STRUCTURE_NAMES = [s.name for s in phantom.ANATOMY]


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """Six coarse phantom scans in the release layout, one of them val and one test."""
    out = tmp_path_factory.mktemp("release")
    return train.write_phantom_release(out, 6, seed=3, spacing=SPACING, val_fraction=0.2, test_fraction=0.1)


def read(path):
    return np.asanyarray(nib.load(path).dataobj)


def test_assign_splits_exact_counts_seeded():
    splits = train.assign_splits(10, seed=1, val_fraction=0.2, test_fraction=0.1)
    assert (splits.count("train"), splits.count("val"), splits.count("test")) == (7, 2, 1)
    assert splits == train.assign_splits(10, seed=1, val_fraction=0.2, test_fraction=0.1)
    assert train.assign_splits(3, seed=1, val_fraction=0.01).count("val") == 1  # at least one
    assert train.assign_splits(3, seed=1, val_fraction=0.0) == ["train"] * 3
    with pytest.raises(ValueError, match="too few"):
        train.assign_splits(2, seed=1, val_fraction=0.4, test_fraction=0.4)


def test_phantom_release_layout(release):
    meta = pd.read_csv(release / "meta.csv", sep=";")
    assert list(meta.columns) == ["image_id", "age", "gender", "split"]
    assert meta["image_id"].tolist() == [train.release_subject_id(i) for i in range(6)]
    assert sorted(meta["split"]) == ["test", "train", "train", "train", "train", "val"]
    assert set(meta["gender"]) <= {"m", "f"}
    table = load_structure_table("total_v1").set_index("name")
    for subject in meta["image_id"]:
        ct = nib.load(release / subject / "ct.nii.gz")
        assert ct.get_data_dtype() == np.int16
        masks = sorted(p.name for p in (release / subject / "segmentations").iterdir())
        assert masks == sorted(f"{name}.nii.gz" for name in STRUCTURE_NAMES)
    # the masks are the phantom's label map, split by structure
    index = 0
    draw = phantom.draw_subject(3, train.RELEASE_INDEX_OFFSET + index)
    _, labels, affine = phantom.render_subject(draw, SPACING)
    for name in STRUCTURE_NAMES:
        img = nib.load(release / "s0000" / "segmentations" / f"{name}.nii.gz")
        assert img.get_data_dtype() == np.uint8
        np.testing.assert_allclose(img.affine, affine)
        np.testing.assert_array_equal(read(img.get_filename()), labels == table.at[name, "label"])
    assert meta.at[index, "age"] == draw.age


def test_phantom_release_never_repeats_the_demo_cohort(release):
    demo_ct, _, _ = phantom.render_subject(phantom.draw_subject(3, 0), SPACING)
    assert not np.array_equal(read(release / "s0000" / "ct.nii.gz"), demo_ct)


def test_release_to_nnunet_raw(release, tmp_path):
    dataset = train.release_to_nnunet_raw(release, tmp_path / "raw", 42, "Phantom")
    assert dataset == tmp_path / "raw" / "Dataset042_Phantom"
    spec = json.loads((dataset / "dataset.json").read_text())
    table = load_structure_table("total_v1")
    expected_order = [name for name in table["name"] if name in STRUCTURE_NAMES]  # v1 label order
    assert spec["labels"] == {"background": 0, **{name: k for k, name in enumerate(expected_order, start=1)}}
    assert spec["channel_names"] == {"0": "CT"} and spec["file_ending"] == ".nii.gz"
    meta = pd.read_csv(release / "meta.csv", sep=";")
    trained = meta[meta["split"] != "test"]
    assert spec["numTraining"] == len(trained) == 5
    assert sorted(p.name for p in (dataset / "imagesTr").iterdir()) == \
        sorted(f"{s}_0000.nii.gz" for s in trained["image_id"])
    test_subject = meta["image_id"][meta["split"] == "test"].item()
    assert (dataset / "imagesTs" / f"{test_subject}_0000.nii.gz").is_file()
    assert (dataset / "labelsTs" / f"{test_subject}.nii.gz").is_file()
    splits = json.loads((dataset / "splits_final.json").read_text())
    assert splits == [{"train": trained["image_id"][trained["split"] == "train"].tolist(),
                       "val": trained["image_id"][trained["split"] == "val"].tolist()}]

    for subject in trained["image_id"]:
        label_img = nib.load(dataset / "labelsTr" / f"{subject}.nii.gz")
        ct_img = nib.load(release / subject / "ct.nii.gz")
        assert label_img.shape == ct_img.shape
        np.testing.assert_allclose(label_img.affine, ct_img.affine)
        labels = read(label_img.get_filename())
        union = np.zeros(labels.shape, bool)
        for k, name in enumerate(expected_order, start=1):
            mask = read(release / subject / "segmentations" / f"{name}.nii.gz") > 0
            np.testing.assert_array_equal(labels == k, mask)  # the phantom's masks do not overlap
            union |= mask
        np.testing.assert_array_equal(labels > 0, union)
        np.testing.assert_array_equal(read(dataset / "imagesTr" / f"{subject}_0000.nii.gz"),
                                      read(release / subject / "ct.nii.gz"))


def write_mini_release(root, masks: dict, ct_affine=None, mask_affine=None, split="train"):
    """One subject 's0000' with a 4x4x4 CT and the given masks."""
    affine = np.diag([2.0, 2.0, 3.0, 1.0]) if ct_affine is None else ct_affine
    (root / "s0000" / "segmentations").mkdir(parents=True)
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.int16), affine), root / "s0000" / "ct.nii.gz")
    for name, mask in masks.items():
        nib.save(nib.Nifti1Image(mask.astype(np.uint8), affine if mask_affine is None else mask_affine),
                 root / "s0000" / "segmentations" / f"{name}.nii.gz")
    (root / "meta.csv").write_text(f"image_id;age;gender;split\ns0000;50;f;{split}\n")
    return root


def test_overlapping_masks_later_structure_wins(tmp_path):
    first, second = np.zeros((4, 4, 4), bool), np.zeros((4, 4, 4), bool)
    first[:3], second[2:] = True, True
    release = write_mini_release(tmp_path / "release", {"liver": first, "spleen": second})
    dataset = train.release_to_nnunet_raw(release, tmp_path / "raw", 1, "Mini", structures=["liver", "spleen"])
    labels = read(dataset / "labelsTr" / "s0000.nii.gz")
    assert (labels[:2] == 1).all() and (labels[2:] == 2).all()
    dataset = train.release_to_nnunet_raw(release, tmp_path / "raw", 1, "Mini", structures=["spleen", "liver"])
    labels = read(dataset / "labelsTr" / "s0000.nii.gz")
    assert (labels[:3] == 2).all() and (labels[3:] == 1).all()
    assert json.loads((dataset / "dataset.json").read_text())["labels"] == {"background": 0, "spleen": 1, "liver": 2}


def test_default_structures_v1_order_then_unknown_names(tmp_path):
    empty = np.zeros((4, 4, 4), bool)
    release = write_mini_release(tmp_path, {"zzz_custom": empty, "liver": empty, "spleen": empty, "aaa": empty})
    assert train.default_structures(release, "s0000") == ["spleen", "liver", "aaa", "zzz_custom"]


def test_masks_off_the_ct_grid_are_an_error_naming_the_subject(tmp_path):
    mask = np.zeros((4, 4, 4), bool)
    release = write_mini_release(tmp_path / "release", {"liver": mask}, mask_affine=np.diag([1.0, 1.0, 1.0, 1.0]))
    with pytest.raises(GridMismatchError, match="s0000"):
        train.release_to_nnunet_raw(release, tmp_path / "raw", 1, "Mini")


def test_missing_mask_and_bad_meta_are_errors(tmp_path):
    release = write_mini_release(tmp_path / "release", {"liver": np.zeros((4, 4, 4), bool)})
    with pytest.raises(FileNotFoundError, match="s0000.*spleen"):
        train.release_to_nnunet_raw(release, tmp_path / "raw", 1, "Mini", structures=["liver", "spleen"])
    (release / "meta.csv").write_text("image_id;split\ns0000;holdout\n")
    with pytest.raises(ValueError, match="holdout"):
        train.release_to_nnunet_raw(release, tmp_path / "raw", 1, "Mini")


@needs_nnunet
def test_small_configuration_is_consistent():
    """On a plans dict like the planner's: patch divisible by the total stride, one entry per stage."""
    arch = {"network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
            "arch_kwargs": {"n_stages": 6, "features_per_stage": [32, 64, 128, 256, 320, 320],
                            "kernel_sizes": [[3, 3, 3]] * 6, "strides": [[1, 1, 1]] + [[2, 2, 2]] * 5,
                            "n_conv_per_stage": [2] * 6, "n_conv_per_stage_decoder": [2] * 5},
            "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]}
    plans = {"configurations": {"3d_fullres": {
        "data_identifier": "nnUNetPlans_3d_fullres", "spacing": [4.0, 2.5, 2.5],
        "median_image_size_in_voxels": [132, 112, 152], "patch_size": [96, 160, 160], "batch_size": 2,
        "architecture": arch}}}
    config = train.make_small_configuration(plans)
    kwargs = config["architecture"]["arch_kwargs"]
    n = kwargs["n_stages"]
    assert len(kwargs["features_per_stage"]) == len(kwargs["kernel_sizes"]) == len(kwargs["strides"]) == n
    assert len(kwargs["n_conv_per_stage"]) == n and len(kwargs["n_conv_per_stage_decoder"]) == n - 1
    assert kwargs["features_per_stage"][0] == 16 and max(kwargs["features_per_stage"]) <= 256
    total_stride = np.prod(kwargs["strides"], axis=0)
    assert all(p % s == 0 for p, s in zip(config["patch_size"], total_stride))
    assert 0.5 * 48 ** 3 <= np.prod(config["patch_size"]) <= 2 * 48 ** 3
    assert config["inherits_from"] == "3d_fullres" and config["data_identifier"] == "nnUNetPlans_3d_fullres"
    assert config["batch_size"] == 2
    assert arch["arch_kwargs"]["n_stages"] == 6  # the parent is left alone


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """One real, tiny nnU-Net training (1 epoch x 2 iterations) for all the tests below; its out_dir."""
    if NNUNET_MISSING:
        pytest.skip(NNUNET_MISSING)
    import torch

    out = tmp_path_factory.mktemp("tiny")
    env_before = {key: os.environ.get(key) for key in ("nnUNet_raw", "nnUNet_results", "nnUNet_n_proc_DA")}
    threads_before = torch.get_num_threads()
    model = train.train_tiny_model(out, threads=2)
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
    assert set(checkpoint) <= set(train.INFERENCE_CHECKPOINT_KEYS)
    assert checkpoint["trainer_name"] == "nnUNetTrainer"
    assert checkpoint["init_args"]["configuration"] == "3d_small"
    assert checkpoint["inference_allowed_mirroring_axes"] is None  # left/right structures: never mirror
    full = tiny / "nnunet" / "nnUNet_results" / "Dataset999_PhantomTiny" / "nnUNetTrainer__nnUNetPlans__3d_small"
    assert (model / "fold_0" / "checkpoint_final.pth").stat().st_size < \
        0.6 * (full / "fold_0" / "checkpoint_final.pth").stat().st_size


@pytest.mark.slow
def test_exported_model_predicts(tiny):
    import torch
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    model = tiny / "model"
    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=False,
                                perform_everything_on_device=False, device=torch.device("cpu"),
                                verbose=False, verbose_preprocessing=False, allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(str(model), use_folds=(0,), checkpoint_name="checkpoint_final.pth")
    n_labels = len(json.loads((model / "dataset.json").read_text())["labels"]) - 1
    meta = pd.read_csv(tiny / "release" / "meta.csv", sep=";")
    subject = meta["image_id"][meta["split"] == "val"].iloc[0]
    image, properties = SimpleITKIO().read_images([str(tiny / "release" / subject / "ct.nii.gz")])
    seg = predictor.predict_single_npy_array(image, properties, None, None, False)
    assert seg.shape == image.shape[1:]
    assert seg.min() >= 0 and seg.max() <= n_labels


def test_cases_are_stored_canonical_like_inference_sees_them():
    from ctcohort.train import canonical_case

    rng = np.random.default_rng(0)
    hu = rng.integers(-1000, 1000, (5, 6, 7)).astype(np.int16)
    labels = (hu > 500).astype(np.uint8)
    affine = np.diag([-0.8, -0.9, 2.0, 1.0])  # LPS, anisotropic
    ct = nib.Nifti1Image(hu, affine)
    canonical, canonical_labels = canonical_case(ct, labels)
    assert nib.aff2axcodes(canonical.affine) == ("R", "A", "S")
    np.testing.assert_array_equal(np.asanyarray(canonical.dataobj), hu[::-1, ::-1, :])
    np.testing.assert_array_equal(canonical_labels, labels[::-1, ::-1, :])
    # the same voxel keeps its world position
    np.testing.assert_allclose(canonical.affine @ [0, 0, 0, 1], affine @ [4, 5, 0, 1])
    ras = nib.Nifti1Image(hu, np.diag([0.8, 0.9, 2.0, 1.0]))
    assert canonical_case(ras, labels)[0] is ras


def test_release_written_in_parallel_is_identical(release, tmp_path):
    parallel = train.write_phantom_release(tmp_path / "parallel", 6, seed=3, spacing=SPACING, val_fraction=0.2,
                                           test_fraction=0.1, processes=2)
    assert (parallel / "meta.csv").read_text() == (release / "meta.csv").read_text()
    subject = train.release_subject_id(4)
    for name in ("ct.nii.gz", "segmentations/kidney_left.nii.gz", "segmentations/femur_right.nii.gz"):
        np.testing.assert_array_equal(read(parallel / subject / name), read(release / subject / name))


def test_bfloat16_autocast_applies_to_nnunets_cpu_steps_only_within():
    if NNUNET_MISSING:
        pytest.skip(NNUNET_MISSING)
    import nnunetv2.training.nnUNetTrainer.nnUNetTrainer as trainer_module
    import torch

    conv = torch.nn.Conv3d(1, 2, 3)
    x = torch.randn(1, 1, 5, 5, 5)
    with train.bfloat16_autocast_on_cpu():
        with trainer_module.dummy_context():  # what nnU-Net's train_step enters on the CPU
            assert conv(x).dtype == torch.bfloat16
    with trainer_module.dummy_context():
        assert conv(x).dtype == torch.float32
    with pytest.raises(ValueError, match="bf16 is for CPU training"):
        train.train(901, "unused", device="cuda", bf16=True)


def test_unknown_optimizer_or_loss_is_an_error():
    with pytest.raises(ValueError, match="optimizer 'rmsprop'"):
        train._use_optimizer(object(), "rmsprop")
    with pytest.raises(ValueError, match="loss 'focal'"):
        train._use_loss(object(), "focal")


@pytest.fixture(scope="module")
def budgeted(release, tmp_path_factory):
    """A real tiny training run with AdamW, the top-k loss and bfloat16 mixed precision, a time budget far too
    small for its 5 epochs, float16 export."""
    if NNUNET_MISSING:
        pytest.skip(NNUNET_MISSING)
    out = tmp_path_factory.mktemp("budgeted")
    model = train.train_from_release(release, out / "model", out / "nnunet", dataset_id=998, name="Budgeted",
                                     epochs=5, iterations=1, threads=2, validate=False, augmentation=False,
                                     time_budget_min=1e-4, optimizer="adam", loss="dice_topk10", half=True, bf16=True,
                                     small_configuration={"patch_voxels": 10 ** 8, "base_features": 8,
                                                          "max_features": 32})
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
    assert all(p >= m for p, m in zip(small["patch_size"], plans["configurations"]["3d_fullres"]
                                      ["median_image_size_in_voxels"]))
    assert small["architecture"]["arch_kwargs"]["features_per_stage"][0] == 8
    assert max(small["architecture"]["arch_kwargs"]["features_per_stage"]) == 32


@pytest.mark.slow
def test_half_export_stores_each_tensor_once_and_segments(budgeted, release):
    import torch

    from ctcohort.segment import Segmenter

    _, model = budgeted
    path = model / "fold_0" / "checkpoint_final.pth"
    weights = torch.load(path, map_location="cpu", weights_only=False)["network_weights"]
    assert {w.dtype for w in weights.values() if w.is_floating_point()} == {torch.float16}
    unique_bytes = sum(w.numel() * w.element_size() for w in {w.data_ptr(): w for w in weights.values()}.values())
    assert path.stat().st_size < unique_bytes + 200_000  # shared conv weights are not stored twice

    ct = nib.load(release / train.release_subject_id(0) / "ct.nii.gz")
    labels = Segmenter(model, load_structure_table("total_v1"), device="cpu").segment(ct)
    assert labels.shape == ct.shape


@pytest.mark.slow
def test_training_continues_from_a_model_and_rejects_another_network(budgeted, release, tiny, tmp_path):
    import torch

    _, start = budgeted
    small = {"patch_voxels": 10 ** 8, "base_features": 8, "max_features": 32}
    continued = train.train_from_release(release, tmp_path / "model", tmp_path / "nnunet", dataset_id=997,
                                         name="Continued", epochs=1, iterations=1, threads=2, validate=False,
                                         augmentation=False, optimizer="adam", small_configuration=small,
                                         initial_weights=start)

    def weights(model):
        return torch.load(model / "fold_0" / "checkpoint_final.pth", map_location="cpu",
                          weights_only=False)["network_weights"]

    before, after = weights(start), weights(continued)
    key = "encoder.stages.0.0.convs.0.conv.weight"
    # one AdamW step at lr 1e-3 moves a weight by about 1e-3; a fresh initialisation would differ by ~0.1
    assert (after[key].float() - before[key].float()).abs().max() < 0.01
    with pytest.raises(ValueError, match="not the network of this configuration"):
        train.train_from_release(release, tmp_path / "model2", tmp_path / "nnunet2", dataset_id=996, name="Other",
                                 epochs=1, iterations=1, threads=2, validate=False, small_configuration=small,
                                 initial_weights=tiny / "model")


@pytest.mark.slow
def test_snakemake_train_target_writes_a_model(tmp_path):
    import torch
    from conftest import run_workflow

    if NNUNET_MISSING:
        pytest.skip(NNUNET_MISSING)
    training = {"phantom_n": 5, "epochs": 1, "iterations": 1, "optimizer": "adam", "augmentation": False,
                "half": True, "time_budget_min": 10,
                "small_configuration": {"patch_voxels": 32 ** 3, "base_features": 8, "max_features": 32,
                                        "batch_size": 1}}
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
