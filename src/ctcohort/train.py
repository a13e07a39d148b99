"""Training a small nnU-Net v2 model on data in the TotalSegmentator release layout.

The chain is: a release folder (``ctcohort.release``; the phantom can write one) -> nnU-Net raw dataset ->
fingerprint, plans and preprocessing (with an extra small configuration) -> training with the built-in
``nnUNetTrainer`` -> an exported model folder holding only what inference needs. ``TrainingSettings`` holds
the settings and their defaults, the one source the command line, the workflow and the functions here use.

nnU-Net is driven in-process through ``ctcohort.nnunet_adapter``, which holds every use of its internals
(and checks the installed version), with its folders and process counts set as environment variables only
while it runs (``nnunet_environment``). nnU-Net's default 3d_fullres plan is sized for a GPU (~7 s per
iteration on 2 CPU cores). ``3d_small`` inherits the preprocessed data of 3d_fullres but has a slimmer U-Net
and a patch of a chosen size: small to train on a CPU, or the whole image for a model that segments a small
scan in one tile.

nnU-Net and torch are imported inside the functions that need them, so that ``ctcohort`` works without
the optional ``segment`` dependencies. Code that calls into nnU-Net must run under an
``if __name__ == "__main__":`` guard, because nnU-Net starts ``spawn`` process pools.
"""

import json
import logging
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np

from ctcohort import nnunet_adapter as nnunet
from ctcohort.nnunet_adapter import LOSSES, OPTIMIZERS
from ctcohort.release import RELEASE_SPLITS_FILE, release_to_nnunet_raw, write_phantom_release

LOG = logging.getLogger(__name__)

SMALL_CONFIGURATION = "3d_small"
DEVICES = ("cpu", "cuda")


# ---------------------------------------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SmallConfiguration:
    """The size of the ``3d_small`` configuration (``make_small_configuration``): about ``patch_voxels`` voxels
    per patch, features from ``base_features`` doubling per stage up to ``max_features``, ``batch_size``."""

    patch_voxels: int = 48**3
    base_features: int = 16
    max_features: int = 256
    batch_size: int = 2


@dataclass(frozen=True)
class TrainingSettings:
    """How ``ctcohort train`` and ``snakemake train`` train: config's ``training`` block key for key (documented
    in config/README.md), plus the nnU-Net dataset ``name`` (command line only).

    The field defaults are the only defaults: the command line's options and the functions here take theirs
    from them, and ``ctcohort.config_defaults`` writes them into config/config.yaml. A contradiction
    (bf16 on CUDA, an unknown device, optimizer or loss) is a ValueError here, before any work starts.
    """

    release: str = ""  # a release folder; empty: a phantom release of phantom_n scans
    phantom_n: int = 40
    phantom_seed: int = 1001
    epochs: int = 20
    iterations: int = 50  # per epoch
    configuration: str = SMALL_CONFIGURATION
    device: str = "cpu"
    dataset_id: int = 901
    optimizer: str = "sgd"
    loss: str = "dice_ce"
    bf16: bool = False
    augmentation: bool = True  # mirroring is always off
    time_budget_min: float | None = None
    data_workers: int = 0
    half: bool = False
    small_configuration: SmallConfiguration = field(default_factory=SmallConfiguration)
    name: str = "CTCohort"

    def __post_init__(self):
        if self.bf16 and self.device != "cpu":
            raise ValueError(
                f"bf16 is for CPU training; on {self.device} nnU-Net trains in float16 mixed precision already"
            )
        for what, value, choices in (
            ("device", self.device, DEVICES),
            ("optimizer", self.optimizer, OPTIMIZERS),
            ("loss", self.loss, LOSSES),
        ):
            if value not in choices:
                raise ValueError(f"{what} {value!r}: choose one of {', '.join(choices)}")

    @classmethod
    def from_config(cls, training: Mapping) -> "TrainingSettings":
        """From config's ``training`` block (a mapping like config/config.yaml's)."""
        values = dict(training)
        values["small_configuration"] = SmallConfiguration(**values.get("small_configuration", {}))
        return cls(**values)

    @classmethod
    def from_options(cls, options: Mapping) -> "TrainingSettings":
        """From a flat mapping that holds every field by name, the small configuration's fields too (the command
        line's options, ``vars(args)``); other keys are ignored."""
        small = SmallConfiguration(**{f.name: options[f.name] for f in fields(SmallConfiguration)})
        return cls(
            **{f.name: options[f.name] for f in fields(cls) if f.name != "small_configuration"},
            small_configuration=small,
        )


DEFAULTS = TrainingSettings()


# ---------------------------------------------------------------------------------------------------------
# Fingerprint, plans (+ the small configuration), preprocessing
# ---------------------------------------------------------------------------------------------------------


def make_small_configuration(
    plans: dict, small: SmallConfiguration = DEFAULTS.small_configuration, parent: str = "3d_fullres"
) -> dict:
    """A CPU-sized configuration that ``inherits_from`` ``parent`` and reuses its preprocessed data.

    The patch keeps the parent spacing's physical aspect (as nnU-Net's planner does) with about
    ``small.patch_voxels`` voxels, clipped to the median image; nnU-Net's own topology rule then sets pooling,
    kernels and the padding of the patch to a multiple of the total stride, so the network and the patch
    stay consistent. Features start at ``small.base_features`` (nnU-Net: 32) and double per stage up to
    ``small.max_features`` (nnU-Net: 320).
    """
    parent_config = plans["configurations"][parent]
    if "inherits_from" in parent_config:
        raise ValueError(f"configuration {parent!r} inherits itself; pick a planned configuration")
    spacing = np.asarray(parent_config["spacing"], float)
    median_shape = np.asarray(parent_config["median_image_size_in_voxels"], float)
    aspect = 1.0 / spacing
    initial = aspect * (small.patch_voxels / np.prod(aspect)) ** (1.0 / len(spacing))
    initial = np.minimum(np.round(initial), median_shape).astype(int)
    strides, kernel_sizes, patch_size = nnunet.network_topology(spacing, initial)
    n_stages = len(strides)

    architecture = json.loads(json.dumps(parent_config["architecture"]))  # a deep copy
    arch_kwargs = architecture["arch_kwargs"]
    convs_encoder, convs_decoder = arch_kwargs["n_conv_per_stage"][0], arch_kwargs["n_conv_per_stage_decoder"][0]
    arch_kwargs.update(
        {
            "n_stages": n_stages,
            "features_per_stage": [min(small.max_features, small.base_features * 2**i) for i in range(n_stages)],
            "kernel_sizes": [list(k) for k in kernel_sizes],
            "strides": [list(s) for s in strides],
            "n_conv_per_stage": [convs_encoder] * n_stages,
            "n_conv_per_stage_decoder": [convs_decoder] * (n_stages - 1),
        }
    )
    return {
        "inherits_from": parent,
        # same resampling and normalisation as the parent, so its preprocessed folder serves both
        "data_identifier": parent_config["data_identifier"],
        "patch_size": [int(p) for p in patch_size],
        "batch_size": small.batch_size,
        "architecture": architecture,
    }


def add_small_configuration(
    plans_file: str | Path, small: SmallConfiguration = DEFAULTS.small_configuration, name: str = SMALL_CONFIGURATION
) -> dict:
    """Write ``make_small_configuration(plans, small)`` into a plans JSON as configuration ``name``; returns it."""
    plans_file = Path(plans_file)
    plans = json.loads(plans_file.read_text())
    plans["configurations"][name] = make_small_configuration(plans, small)
    plans_file.write_text(json.dumps(plans, indent=4))
    return plans["configurations"][name]


def plan_and_preprocess(
    dataset_id: int,
    work_dir: str | Path,
    threads: int = 1,
    small_configuration: SmallConfiguration | None = DEFAULTS.small_configuration,
) -> str:
    """Fingerprint, plan and preprocess a raw dataset under ``work_dir/nnUNet_raw``; returns the plans identifier.

    Only 3d_fullres is preprocessed: the small configuration (added unless ``small_configuration`` is None)
    reads the same data, and 2d/3d_lowres are not used here.
    """
    started = time.perf_counter()
    # planning instantiates networks with torch threads = nnUNet_n_proc_DA, and 0 breaks it
    with nnunet.nnunet_environment(work_dir, threads, n_proc_da=1) as dirs:
        dataset_name = nnunet.dataset_name(dataset_id)
        preprocessed_dir = dirs["preprocessed"] / dataset_name
        # the planner copies the raw splits file unless one exists, and then insists they match: start afresh
        if (dirs["raw"] / dataset_name / RELEASE_SPLITS_FILE).is_file():
            (preprocessed_dir / "splits_final.json").unlink(missing_ok=True)
        plans_identifier = nnunet.fingerprint_and_plan(dataset_id, threads)
        if small_configuration is not None:
            config = add_small_configuration(preprocessed_dir / f"{plans_identifier}.json", small_configuration)
            LOG.info(
                "plans: added %s (patch %s, features %s, batch %d)",
                SMALL_CONFIGURATION,
                config["patch_size"],
                config["architecture"]["arch_kwargs"]["features_per_stage"],
                config["batch_size"],
            )
        nnunet.preprocess(dataset_id, plans_identifier, "3d_fullres", threads)
    LOG.info("planned and preprocessed %s in %.1f s", dataset_name, time.perf_counter() - started)
    return plans_identifier


# ---------------------------------------------------------------------------------------------------------
# Training
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
        raise ValueError(
            f"{source}: fold {fold} needs training and validation cases "
            f"(has {len(splits[fold]['train'])} and {len(splits[fold]['val'])})"
        )
    (preprocessed_dataset_dir / "splits_final.json").write_text(json.dumps(splits, indent=2))


def train(
    work_dir: str | Path,
    settings: TrainingSettings = DEFAULTS,
    *,
    fold: int = 0,
    threads: int = 1,
    validate: bool = True,
    val_iterations_per_epoch: int | None = None,
    plans_identifier: str = nnunet.PLANS_IDENTIFIER,
    initial_weights: str | Path | None = None,
) -> Path:
    """Train nnU-Net's built-in trainer in-process on the planned dataset ``settings.dataset_id``; returns the
    results folder (``nnUNet_results/DatasetXXX_Name/nnUNetTrainer__nnUNetPlans__<configuration>``).

    Fold 0 is the release's train/val split. Mirroring is always off (left/right structures), other
    augmentation unless ``settings.augmentation`` is false. ``val_iterations_per_epoch`` (default: a fifth of
    the training iterations, at least 1) sets the per-epoch pseudo-Dice estimate. ``validate`` runs nnU-Net's
    full validation afterwards (``fold_<k>/validation/summary.json``: Dice per structure of the val cases).

    ``threads`` (torch threads) must not exceed the cores that are really free: on 2 cores with another
    busy process, 2 threads made an iteration ~8x slower than 1. ``settings.data_workers``: nnU-Net's data
    loading and augmentation processes (0: in the main process, best on a CPU; on a GPU machine give it cores).
    ``settings.time_budget_min``: train at most ``epochs``, fewer if they would not fit this wall-clock budget
    (see ``nnunet_adapter.run_training_within``); the log says how many ran. ``settings.optimizer``: ``sgd``
    (nnU-Net's SGD, lr 0.01, Nesterov momentum 0.99) or ``adam`` (AdamW with AMSGrad, lr 1e-3: nnU-Net's
    nnUNetTrainerAdam1en3 recipe, which learns much faster in short runs). ``initial_weights``: continue from an
    exported model folder of the same labels and configuration. ``settings.bf16``: on the CPU, bfloat16 mixed
    precision (``nnunet_adapter.bfloat16_autocast_on_cpu``; CUDA always trains in nnU-Net's float16 mixed
    precision).
    """
    iterations = settings.iterations
    if val_iterations_per_epoch is None:
        val_iterations_per_epoch = max(1, iterations // 5)
    budget_s = None if settings.time_budget_min is None else 60.0 * settings.time_budget_min
    with (
        nnunet.nnunet_environment(work_dir, threads, n_proc_da=settings.data_workers) as dirs,
        nnunet.bfloat16_autocast_on_cpu(settings.bf16),
    ):
        dataset_name = nnunet.dataset_name(settings.dataset_id)
        preprocessed_dir = dirs["preprocessed"] / dataset_name
        write_release_splits(dirs["raw"] / dataset_name, preprocessed_dir, fold)
        plans = _read_plans(preprocessed_dir / f"{plans_identifier}.json", settings.configuration)
        dataset_json = json.loads((preprocessed_dir / "dataset.json").read_text())
        trainer = nnunet.make_trainer(
            plans,
            settings.configuration,
            fold,
            dataset_json,
            settings.device,
            settings.epochs,
            iterations,
            val_iterations_per_epoch,
        )
        nnunet.without_mirroring(trainer, settings.augmentation)
        nnunet.use_optimizer(trainer, settings.optimizer)
        nnunet.use_loss(trainer, settings.loss)

        started = time.perf_counter()
        nnunet.run_training_within(trainer, budget_s, initial_weights)
        seconds = time.perf_counter() - started
        LOG.info(
            "trained %s %s fold %d on %s: %d epochs x %d iterations in %.1f s (%.3f s/iteration incl. "
            "validation), last pseudo Dice %.3f",
            dataset_name,
            settings.configuration,
            fold,
            settings.device,
            trainer.num_epochs,
            iterations,
            seconds,
            seconds / max(1, trainer.num_epochs * iterations),
            nnunet.last_pseudo_dice(trainer),
        )
        if validate:
            nnunet.validate(trainer, threads)
        return nnunet.results_folder(trainer)


def _read_plans(path: Path, configuration: str) -> dict:
    plans = json.loads(path.read_text())
    if configuration not in plans["configurations"]:
        raise ValueError(
            f"configuration {configuration!r} is not in the plans "
            f"({', '.join(plans['configurations'])}); plan with a small configuration?"
        )
    return plans


# ---------------------------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------------------------


def export_model(
    results_folder: str | Path,
    out_dir: str | Path,
    fold: int = 0,
    checkpoint_name: str = "checkpoint_final.pth",
    half: bool = False,
) -> Path:
    """Copy what inference needs into out_dir, in nnU-Net's layout; returns out_dir.

    ``dataset.json``, ``plans.json`` and ``fold_<k>/<checkpoint_name>`` with only the keys the predictor
    reads (``nnunet_adapter.inference_checkpoint``): the optimizer state, about twice the weights, is dropped.
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
    target = out_dir / f"fold_{fold}" / checkpoint_name
    torch.save(nnunet.inference_checkpoint(checkpoint, half, source), target)
    LOG.info(
        "exported %s to %s: checkpoint %.2f MB (was %.2f MB)",
        results_folder,
        out_dir,
        target.stat().st_size / 1e6,
        source.stat().st_size / 1e6,
    )
    return out_dir


def mirror_checkpoint(checkpoint: dict, axis: int) -> dict:
    """``checkpoint`` with every convolution and transposed-convolution kernel flipped along spatial ``axis`` of
    the network's input (0: the first after the channels); biases, norms and every other key as they were.

    A fully convolutional network so flipped computes the mirror image of the original's output on the mirrored
    input exactly where every stride along ``axis`` samples positions symmetric about the centre (stride 1, or
    odd sizes). Otherwise a strided convolution on an even size samples the other positions after a flip, and
    a network trained without augmentation can depend on that (the demo model's worst structure fell to Dice
    0.28: resources/models/demo/README.md). Each tensor is flipped once, keeping the weights nnU-Net stores
    under two names one tensor.
    """
    flipped = {}

    def mirrored(key, value):
        if not (key.endswith(".weight") and value.ndim >= 3):  # kernels: (out, in, *spatial) or (in, out, ...)
            return value
        return flipped.setdefault(value.data_ptr(), value.flip(2 + axis))

    weights = {key: mirrored(key, value) for key, value in checkpoint["network_weights"].items()}
    return {**checkpoint, "network_weights": weights}


def mirror_model(
    model_dir: str | Path,
    out_dir: str | Path,
    ras_axis: int = 0,
    fold: int = 0,
    checkpoint_name: str = "checkpoint_final.pth",
) -> Path:
    """An exported model (``export_model``'s layout) mirrored along RAS voxel axis ``ras_axis`` (0: left-right)
    into out_dir (returned): ``mirror_checkpoint`` along the network axis that its plans' reader and
    transpose_forward put that RAS axis on; dtypes and checkpoint metadata unchanged. For a model trained on
    mirrored images: the mirrored model segments the images the right way round."""
    import torch

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    plans = json.loads((model_dir / "plans.json").read_text())
    axes = nnunet.network_axes(plans["image_reader_writer"], plans["transpose_forward"])
    (out_dir / f"fold_{fold}").mkdir(parents=True, exist_ok=True)
    for name in ("dataset.json", "plans.json"):
        shutil.copyfile(model_dir / name, out_dir / name)
    source = model_dir / f"fold_{fold}" / checkpoint_name
    checkpoint = torch.load(source, map_location="cpu", weights_only=False)
    torch.save(mirror_checkpoint(checkpoint, axes.index(ras_axis)), out_dir / f"fold_{fold}" / checkpoint_name)
    return out_dir


# ---------------------------------------------------------------------------------------------------------
# The whole chain
# ---------------------------------------------------------------------------------------------------------


def train_from_release(
    release_dir: str | Path,
    out_dir: str | Path,
    work_dir: str | Path,
    settings: TrainingSettings = DEFAULTS,
    *,
    threads: int = 1,
    structures: list[str] | None = None,
    validate: bool = True,
    initial_weights: str | Path | None = None,
) -> Path:
    """Release folder -> exported nnU-Net model in out_dir (returned); nnU-Net's folders live in work_dir.

    ``structures``: the labels to train, in order (default: every mask of the release, ``default_structures``);
    ``settings.release`` is not read (``train_model`` reads it). The other arguments are ``train()``'s.
    """
    raw_root = nnunet.nnunet_dirs(work_dir)["raw"]
    release_to_nnunet_raw(
        release_dir,
        raw_root,
        settings.dataset_id,
        settings.name,
        structures,
        processes=max(threads, settings.data_workers),
    )
    small = settings.small_configuration if settings.configuration == SMALL_CONFIGURATION else None
    plan_and_preprocess(settings.dataset_id, work_dir, threads, small_configuration=small)
    results = train(work_dir, settings, fold=0, threads=threads, validate=validate, initial_weights=initial_weights)
    return export_model(results, out_dir, fold=0, half=settings.half)


def train_model(
    out_dir: str | Path,
    work_dir: str | Path,
    settings: TrainingSettings = DEFAULTS,
    *,
    threads: int = 1,
    structures: list[str] | None = None,
    initial_weights: str | Path | None = None,
) -> Path:
    """``ctcohort train`` and ``snakemake train``: ``settings.release`` (empty: a phantom release written to
    ``work_dir/release``) -> exported model in out_dir (returned), nnU-Net's folders in ``work_dir/nnunet``."""
    work_dir = Path(work_dir)
    release = settings.release or write_phantom_release(
        work_dir / "release", settings.phantom_n, settings.phantom_seed, processes=max(threads, settings.data_workers)
    )
    return train_from_release(
        release,
        out_dir,
        work_dir / "nnunet",
        settings,
        threads=threads,
        structures=structures,
        initial_weights=initial_weights,
    )
