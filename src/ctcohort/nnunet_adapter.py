"""nnU-Net v2's internals, in one place: everything ctcohort relies on beyond nnU-Net's files and folders.

ctcohort drives nnU-Net in-process and reaches past its command-line interface: environment variables read
at import, module globals of the trainer module, the hooks ``run_training`` calls and their order, the
trainer's attributes, the checkpoint's keys, the planner's topology rule. None of that is a stable API, so
all of it is written against one version, ``SUPPORTED_NNUNET_VERSION``, and checked when it is used (not when
ctcohort is imported, so that the rest of ctcohort works without nnU-Net or with another version):
every nnU-Net module is imported through ``_nnunet()``, which calls ``require_supported_nnunet()`` first,
and so do the functions that rely on nnU-Net's behaviour without importing it. A different installed version
is an ``UnsupportedNnunetError`` naming both versions.

Sections: 1. version; 2. environment (folders, process counts, console output); 3. planning (fingerprint,
plans, preprocessing, the network topology rule); 4. training (the trainer, changes made on its instance,
its module's globals, the training loop, validation); 5. checkpoints; 6. inference (the readers' axis order,
the predictor built from a model folder, pre- and postprocessing around its sliding window on the
predictor's device), which ``ctcohort.segment`` drives.

Constraints of nnunetv2 2.8.1 on CPU machines shape the training side: only the built-in trainer class
``nnUNetTrainer`` is used, because any other trainer name makes nnU-Net (and the predictor, which looks the
trainer up by the name stored in the checkpoint) import every trainer module, some of which need
timm/torchvision. Changes to the training (no mirroring, optionally no augmentation, another optimizer or
loss) are therefore made on the trainer *instance*; the checkpoint still names ``nnUNetTrainer`` because
``save_checkpoint`` stores ``self.__class__.__name__``. Code that calls into nnU-Net must run under an
``if __name__ == "__main__":`` guard, because nnU-Net starts ``spawn`` process pools.
"""

import contextlib
import importlib
import importlib.metadata
import io
import json
import logging
import os
import time
import types
from collections.abc import Sequence
from pathlib import Path

import numpy as np

LOG = logging.getLogger(__name__)
NNUNET_LOG = logging.getLogger(__name__ + ".nnunet")  # nnU-Net's own console output, at DEBUG

SUPPORTED_NNUNET_VERSION = "2.8.1"


# ---------------------------------------------------------------------------------------------------------
# 1. Version
# ---------------------------------------------------------------------------------------------------------


class UnsupportedNnunetError(ImportError):
    """The installed nnunetv2 is missing or is not the version this adapter is written against."""


def installed_nnunet_version() -> str | None:
    """The installed nnunetv2's version, read from its package metadata (nnunetv2 is not imported); None if absent."""
    try:
        return importlib.metadata.version("nnunetv2")
    except importlib.metadata.PackageNotFoundError:
        return None


def nnunet_version_problem(installed: str | None, supported: str = SUPPORTED_NNUNET_VERSION) -> str | None:
    """What is wrong with nnunetv2 ``installed`` (a version string, None: not installed) for this adapter; None: fine.

    A local version label (``2.8.1+cu124``) is ignored; any other difference, newer or older, is a problem."""
    install = f"pip install 'nnunetv2=={supported}' (or pip install -e '.[segment]')"
    if installed is None:
        return f"nnunetv2 is not installed; ctcohort's nnU-Net adapter supports nnunetv2 {supported}: {install}"
    if installed.split("+")[0] != supported:
        return (
            f"nnunetv2 {installed} is installed, but ctcohort's nnU-Net adapter supports nnunetv2 {supported} "
            f"only (it relies on that version's internals): {install}"
        )
    return None


def check_nnunet_version(installed: str | None, supported: str = SUPPORTED_NNUNET_VERSION) -> None:
    """``UnsupportedNnunetError`` naming both versions unless ``installed`` is the ``supported`` one."""
    problem = nnunet_version_problem(installed, supported)
    if problem:
        raise UnsupportedNnunetError(problem)


def require_supported_nnunet() -> None:
    """Check the installed nnunetv2 before relying on its internals; every use of the adapter does."""
    check_nnunet_version(installed_nnunet_version())


def _nnunet(module: str) -> types.ModuleType:
    """An nnU-Net module, imported after the version check: the only way this adapter imports nnunetv2."""
    require_supported_nnunet()
    return importlib.import_module(module)


# ---------------------------------------------------------------------------------------------------------
# 2. Environment
# ---------------------------------------------------------------------------------------------------------

NNUNET_FOLDERS = {"raw": "nnUNet_raw", "preprocessed": "nnUNet_preprocessed", "results": "nnUNet_results"}


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
    enough. ``nnUNet_def_n_proc`` is read when nnunetv2.configuration is first imported; callers therefore
    pass process counts explicitly (spawned workers re-import it and see ``threads``).
    ``n_proc_da``: 0 runs data augmentation in the main process (training); planning needs >= 1.
    torch's thread count is set to ``threads`` and restored; nnU-Net's console output goes to the log.
    """
    require_supported_nnunet()
    import torch

    dirs = nnunet_dirs(work_dir)
    for path in dirs.values():
        path.mkdir(parents=True, exist_ok=True)
    values = {
        "nnUNet_raw": str(dirs["raw"]),
        "nnUNet_preprocessed": str(dirs["preprocessed"]),
        "nnUNet_results": str(dirs["results"]),
        "nnUNet_def_n_proc": str(threads),
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


def dataset_name(dataset_id: int) -> str:
    """nnU-Net's folder name (DatasetXXX_Name) of a dataset id, found in its raw/preprocessed/results folders."""
    conversion = _nnunet("nnunetv2.utilities.dataset_name_id_conversion")
    return conversion.convert_id_to_dataset_name(dataset_id)


# ---------------------------------------------------------------------------------------------------------
# 3. Planning
# ---------------------------------------------------------------------------------------------------------

PLANS_IDENTIFIER = "nnUNetPlans"  # what plan_experiments names its plans (nnUNet_preprocessed/<dataset>/<id>.json)


def fingerprint_and_plan(dataset_id: int, threads: int) -> str:
    """nnU-Net's dataset fingerprint and default plans (within ``nnunet_environment``); returns the plans identifier."""
    api = _nnunet("nnunetv2.experiment_planning.plan_and_preprocess_api")
    api.extract_fingerprints(
        [dataset_id],
        num_processes=threads,
        check_dataset_integrity=True,
        clean=True,
        verbose=False,
        show_progress_bar=False,
    )
    return api.plan_experiments([dataset_id])


def preprocess(dataset_id: int, plans_identifier: str, configuration: str, threads: int) -> None:
    """nnU-Net's preprocessing of one configuration (within ``nnunet_environment``)."""
    api = _nnunet("nnunetv2.experiment_planning.plan_and_preprocess_api")
    api.preprocess(
        [dataset_id],
        plans_identifier,
        configurations=[configuration],
        num_processes=[threads],
        verbose=False,
        show_progress_bar=False,
    )


def network_topology(spacing, patch_size) -> tuple[list, list, list]:
    """(strides, kernel sizes, patch size) by nnU-Net's planner rule for a patch of about ``patch_size`` voxels
    at ``spacing``: pooling down to feature maps of 4 voxels, the patch padded to a multiple of the total stride."""
    topology = _nnunet("nnunetv2.experiment_planning.experiment_planners.network_topology")
    _, strides, kernel_sizes, patch, _ = topology.get_pool_and_conv_props(spacing, patch_size, 4, 999999)
    return strides, kernel_sizes, patch


# ---------------------------------------------------------------------------------------------------------
# 4. Training
# ---------------------------------------------------------------------------------------------------------

TRAINER = "nnUNetTrainer"
TRAINER_MODULE = "nnunetv2.training.nnUNetTrainer.nnUNetTrainer"
OPTIMIZERS = ("sgd", "adam")
LOSSES = ("dice_ce", "dice_topk10")


def make_trainer(
    plans: dict,
    configuration: str,
    fold: int,
    dataset_json: dict,
    device: str,
    epochs: int,
    iterations_per_epoch: int,
    val_iterations_per_epoch: int,
):
    """nnU-Net's built-in trainer (``TRAINER``) for one configuration and fold, with the given schedule."""
    import torch

    trainer_class = getattr(_nnunet(TRAINER_MODULE), TRAINER)
    plans = {**plans, "continue_training": False}  # the 2.8.1 trainer pops this from the plans
    trainer = trainer_class(plans, configuration, fold, dataset_json, device=torch.device(device))
    trainer.num_epochs = epochs
    trainer.num_iterations_per_epoch = iterations_per_epoch
    trainer.num_val_iterations_per_epoch = val_iterations_per_epoch
    return trainer


def without_mirroring(trainer, augmentation: bool) -> None:
    """Turn off mirroring (and, if not ``augmentation``, all augmentation) on this trainer instance.

    Mirroring would swap left and right, and the structure table names sides (kidney_left ...); this is
    what TotalSegmentator's nnUNetTrainerNoMirroring does. It also sets inference_allowed_mirroring_axes
    to None, which the checkpoint carries to the predictor. Patching the instance, not subclassing, keeps
    the class name and hence the checkpoint's trainer_name 'nnUNetTrainer'.
    """
    require_supported_nnunet()
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
        def validation_transforms(
            patch_size,
            rotation_for_DA,
            deep_supervision_scales,
            mirror_axes,
            do_dummy_2d_data_aug,
            use_mask_for_norm=None,
            is_cascaded=False,
            foreground_labels=None,
            regions=None,
            ignore_label=None,
        ):
            return type(trainer).get_validation_transforms(
                deep_supervision_scales, is_cascaded, foreground_labels, regions, ignore_label
            )

        trainer.get_training_transforms = validation_transforms


def use_optimizer(trainer, name: str) -> None:
    """``adam``: AdamW (AMSGrad) at lr 1e-3 with nnU-Net's polynomial decay, as nnUNetTrainerAdam1en3 does;
    set on the instance, so the checkpoint keeps the built-in trainer name. ``sgd``: nnU-Net's default."""
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer {name!r}: choose one of {', '.join(OPTIMIZERS)}")
    if name == "sgd":
        return
    from torch.optim import AdamW

    poly_lr = _nnunet("nnunetv2.training.lr_scheduler.polylr").PolyLRScheduler

    def configure_optimizers(self):
        optimizer = AdamW(self.network.parameters(), lr=self.initial_lr, weight_decay=self.weight_decay, amsgrad=True)
        return optimizer, poly_lr(optimizer, self.initial_lr, self.num_epochs)

    trainer.initial_lr = 1e-3
    trainer.configure_optimizers = types.MethodType(configure_optimizers, trainer)


def use_loss(trainer, name: str) -> None:
    """``dice_ce``: nnU-Net's Dice + cross-entropy. ``dice_topk10``: Dice + cross-entropy over the 10% hardest
    voxels (nnU-Net's nnUNetTrainerDiceTopK10Loss), set on the instance like the optimizer."""
    if name not in LOSSES:
        raise ValueError(f"loss {name!r}: choose one of {', '.join(LOSSES)}")
    if name == "dice_topk10":
        variant = _nnunet("nnunetv2.training.nnUNetTrainer.variants.loss.nnUNetTrainerTopkLoss")
        trainer._build_loss = types.MethodType(variant.nnUNetTrainerDiceTopK10Loss._build_loss, trainer)


@contextlib.contextmanager
def trainer_module_global(name: str, value):
    """Within: the global ``name`` of nnU-Net's trainer module is ``value`` (restored on exit). Some of its
    behaviour hangs on module globals rather than on the trainer instance."""
    trainer_module = _nnunet(TRAINER_MODULE)
    saved = getattr(trainer_module, name)
    setattr(trainer_module, name, value)
    try:
        yield
    finally:
        setattr(trainer_module, name, saved)


def validation_processes(threads: int):
    """nnU-Net's final validation sizes its worker pool by a module constant read at import; set it."""
    return trainer_module_global("default_num_processes", threads)


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

    with trainer_module_global("dummy_context", lambda: torch.autocast("cpu", dtype=torch.bfloat16)):
        yield


def load_initial_weights(trainer, model_dir: str | Path, fold: int = 0) -> None:
    """Start training from an exported model's weights (all layers): to continue training a model.

    The model must have the trainer's labels and network (same plans configuration); anything else is a
    ValueError that says what differs.
    """
    require_supported_nnunet()
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
    require_supported_nnunet()
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
        outputs = [trainer.train_step(next(trainer.dataloader_train)) for _ in range(trainer.num_iterations_per_epoch)]
        trainer.on_train_epoch_end(outputs)
        with torch.no_grad():
            trainer.on_validation_epoch_start()
            outputs = [
                trainer.validation_step(next(trainer.dataloader_val))
                for _ in range(trainer.num_val_iterations_per_epoch)
            ]
            trainer.on_validation_epoch_end(outputs)
        trainer.on_epoch_end()
        durations.append(time.perf_counter() - epoch_started)
        if budget_s is not None:
            per_epoch = np.mean(durations[1:] if len(durations) > 1 else durations)
            left = budget_s - (time.perf_counter() - started)
            affordable = trainer.current_epoch + max(0, int(left // per_epoch))
            if affordable < trainer.num_epochs:
                LOG.info(
                    "time budget: %d epochs instead of %d (%.1f s per epoch)", affordable, trainer.num_epochs, per_epoch
                )
                trainer.num_epochs = affordable
                trainer.lr_scheduler.max_steps = affordable
    trainer.on_train_end()


def last_pseudo_dice(trainer) -> float:
    """The mean foreground pseudo-Dice of the last epoch's validation steps, from the trainer's log."""
    return trainer.logger.get_value("mean_fg_dice", step=-1)


def validate(trainer, threads: int) -> None:
    """nnU-Net's full validation of the trained fold (``fold_<k>/validation/summary.json``) on ``threads`` processes."""
    with validation_processes(threads):
        trainer.perform_actual_validation()


def results_folder(trainer) -> Path:
    """The trainer's output folder (``nnUNet_results/DatasetXXX_Name/<trainer>__<plans>__<configuration>``)."""
    return Path(trainer.output_folder_base)


# ---------------------------------------------------------------------------------------------------------
# 5. Checkpoints
# ---------------------------------------------------------------------------------------------------------

# What the predictor reads from a checkpoint; the rest (optimizer, logging) only serves to resume training.
INFERENCE_CHECKPOINT_KEYS = (
    "network_weights",
    "init_args",
    "trainer_name",
    "inference_allowed_mirroring_axes",
    "current_epoch",
)


def inference_checkpoint(checkpoint: dict, half: bool = False, source: str | Path = "checkpoint") -> dict:
    """The part of a training checkpoint that inference needs (``INFERENCE_CHECKPOINT_KEYS``).

    ``half`` stores floating-point weights as float16 (loading casts them back to the network's float32).
    ValueError (naming ``source``) for something that is not an nnU-Net checkpoint.
    """
    require_supported_nnunet()
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
            for key, value in slim["network_weights"].items()
        }
    return slim


# ---------------------------------------------------------------------------------------------------------
# 6. Inference
# ---------------------------------------------------------------------------------------------------------


class ModelFolderError(ValueError):
    """The model folder is missing, does not hold an nnU-Net v2 model, or does not say which one to use."""


# nnU-Net v2.8.1's readers of 3D images (nnunetv2/imageio), by the name plans.json records as image_reader_writer.
# Each hands the network the voxel array with NIfTI's index order reversed, (k, j, i), spacing likewise:
# sitk.GetArrayFromImage's order, which NibabelIO and NibabelIOWithReorient reach by transposing nibabel's
# (i, j, k) array. The *WithReorient ones first reorient to the closest canonical (RAS) orientation, which
# ctcohort does for every model. Value: the RAS voxel axis behind each axis of the reader's array.
READER_AXES = {
    "SimpleITKIO": (2, 1, 0),
    "SimpleITKIOWithReorient": (2, 1, 0),
    "NibabelIO": (2, 1, 0),
    "NibabelIOWithReorient": (2, 1, 0),
}


def network_axes(reader: str, transpose_forward) -> tuple[int, ...]:
    """The RAS voxel axis behind each spatial axis of the network's input, for plans.json's
    image_reader_writer and transpose_forward (reader array axes -> network axes)."""
    return tuple(READER_AXES[reader][axis] for axis in transpose_forward)


# The intensity normalisations ``predict_labels`` reproduces (nnU-Net's, of one CT channel).
NORMALIZATIONS = ("CTNormalization", "ZScoreNormalization")


def load_predictor(
    folder: str | Path, checkpoint_files: Sequence[str | Path], device, tile_step: float, mirroring: bool
):
    """An nnUNetPredictor for the model in ``folder``, the weights of ``checkpoint_files`` (its folds, which
    must exist) loaded once, on ``device`` (a torch.device).

    The network is built with nnU-Net's default architecture builder rather than by looking up the trainer
    class named in the checkpoint: TotalSegmentator's trainers differ from the default only in training
    (epochs, mirroring), and the lookup imports every trainer module nnU-Net has. ModelFolderError for a
    configuration that ``predict_labels`` cannot serve.
    """
    trainer_class = getattr(_nnunet(TRAINER_MODULE), TRAINER)
    label_handling = _nnunet("nnunetv2.utilities.label_handling.label_handling")
    plans_manager_class = _nnunet("nnunetv2.utilities.plans_handling.plans_handler").PlansManager
    import torch

    folder = Path(folder)
    dataset_json = json.loads((folder / "dataset.json").read_text())
    plans_manager = plans_manager_class(json.loads((folder / "plans.json").read_text()))
    parameters, first = [], None
    for path in checkpoint_files:
        state = torch.load(path, map_location="cpu", weights_only=False)
        first = first or state
        parameters.append(state["network_weights"])
    configuration_name = first["init_args"]["configuration"]
    configuration = plans_manager.get_configuration(configuration_name)
    _check_configuration(folder, configuration, configuration_name)
    network = trainer_class.build_network_architecture(
        plans_manager,
        configuration,
        label_handling.determine_num_input_channels(plans_manager, configuration, dataset_json),
        plans_manager.get_label_manager(dataset_json).num_segmentation_heads,
        enable_deep_supervision=False,
    )
    network.load_state_dict(parameters[0])
    predictor = new_predictor(device, tile_step, mirroring)
    predictor.manual_initialization(
        network,
        plans_manager,
        configuration,
        parameters,
        dataset_json,
        first["trainer_name"],
        first.get("inference_allowed_mirroring_axes"),
    )
    return predictor


def new_predictor(device, tile_step: float, mirroring: bool):
    """An nnUNetPredictor without a model, as TotalSegmentator sets one up (Gaussian-weighted tiles, everything on
    a CUDA device, quiet)."""
    predictor_class = _nnunet("nnunetv2.inference.predict_from_raw_data").nnUNetPredictor
    # 2.8.1 prints "perform_everything_on_device=True is only supported for cuda" for any non-CUDA device,
    # even when it is False: kept out of the job logs, where it would read as a problem
    with contextlib.redirect_stdout(io.StringIO()):
        return predictor_class(
            tile_step_size=tile_step,
            use_gaussian=True,
            use_mirroring=mirroring,
            perform_everything_on_device=device.type == "cuda",
            device=device,
            verbose=False,
            allow_tqdm=False,
        )


def _check_configuration(folder: Path, configuration, name: str) -> None:
    if len(configuration.patch_size) != 3 or configuration.previous_stage_name is not None:
        raise ModelFolderError(
            f"model {folder}: configuration {name!r} is not a "
            "single-stage 3D one (3d_fullres, 3d_lowres, ...), the only kind supported"
        )
    schemes = configuration.normalization_schemes
    if len(schemes) != 1 or schemes[0] not in NORMALIZATIONS or any(configuration.use_mask_for_norm):
        raise ModelFolderError(
            f"model {folder}: one CT channel with {' or '.join(NORMALIZATIONS)} (no mask) is supported, not {schemes}"
        )


def predict_labels(predictor, hu, spacing: Sequence[float]):
    """Labels of a CT tensor ``hu`` (HU, float32, in the network's axis order, on the predictor's device;
    ``spacing``: of its axes) from a ``load_predictor`` predictor, on ``hu``'s grid and device.

    This replaces nnU-Net's numpy/scipy pre- and postprocessing around its sliding window with the same steps
    on the predictor's device (the GPU where there is one): CT normalisation with the model's intensity
    statistics, trilinear resampling to the model's spacing, nnU-Net's own sliding window (with test-time
    mirroring if asked, over the axes the checkpoint allows; several folds' logits summed, the argmax of their
    mean), then the logits resampled trilinearly onto the input grid in slabs and argmaxed. On the model's own
    spacing no resampling happens and the result equals nnU-Net's (nnU-Net also crops to the bounding box of
    non-zero voxels, which a scan with a border of exact zeros would show).
    """
    require_supported_nnunet()
    image = _normalized_input(hu, spacing, predictor)
    logits = None
    for parameters in predictor.list_of_parameters:
        if len(predictor.list_of_parameters) > 1:
            predictor.network.load_state_dict(parameters)
        fold_logits = predictor.predict_sliding_window_return_logits(image)
        logits = fold_logits if logits is None else logits + fold_logits
    return _labels_on_grid(logits, hu.shape)  # the fold mean has the same argmax as the sum


def _normalized_input(hu, spacing: Sequence[float], predictor):
    """CT in the network's axis order as its input (1, z', y', x'): normalised as nnU-Net does, on the model's
    spacing (``spacing``: of ``hu``'s axes)."""
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
    return image.contiguous()[None]


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
        z = (
            2 * (torch.arange(z0, min(shape[0], z0 + slab), device=logits.device, dtype=torch.float32) + 0.5) / shape[0]
            - 1
        )
        grid = torch.stack(torch.meshgrid(z, y, x, indexing="ij")[::-1], dim=-1)[None]  # (x, y, z) last
        values = F.grid_sample(source, grid, mode="bilinear", padding_mode="border", align_corners=False)
        labels[z0 : z0 + len(z)] = values[0].argmax(0)
    return labels
