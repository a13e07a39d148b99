"""Per-scan segmentation time: one nnU-Net predictor per scan and part, against ctcohort's loaded-once Segmenter.

Two ways of running a multi-part nnU-Net v2 model (such as TotalSegmentator's 5-part 1.5 mm model)
over a batch of CT scans are timed side by side in one run, on the same scans and the same weights:

* anchor: TotalSegmentator's way. For every scan and every part a new ``nnUNetPredictor`` is built and
  its weights are read from disk (``initialize_from_trained_model_folder``); the part segments the CT
  file with ``predict_from_files`` (nnU-Net's own image reader/writer, its preprocessing and export
  worker processes); the parts' label maps are then read back with nibabel and merged (a later part
  overwrites an earlier one) into one file. Time per scan, end to end.
* ctcohort: ``ctcohort.segment.Segmenter`` loads every part once; a ``ScanPipeline`` then segments the
  scans (all parts on the device, merged there, one file written; the next scan is read and the last label
  map written in background threads), as the workflow's batch job does.
  The load is timed separately and also spread over the scans.

The model is synthetic, with random weights (speed does not depend on the weight values): ``--parts``
nnU-Net model folders of ``--classes`` labels each, whose plans mimic TotalSegmentator's 1.5 mm model
(3d_fullres, 1.5 mm isotropic, patch 128^3, PlainConvUNet with 6 stages of 32..320 features, CT
normalisation, batch size 2; pooling and kernels from nnU-Net's own planner rule). The scans are
synthetic int16 CTs (default 512x512x450 voxels of 0.8x0.8x1.0 mm, i.e. about 273x273x300 voxels at
1.5 mm); one scan is generated and copied, since content does not change the work done.

Mirroring is off for both (as TotalSegmentator's total task); the sliding-window step is ``--tile-step``
(default 0.8, TotalSegmentator's for total). Both methods use ``--threads`` torch CPU threads. Before
the timed runs one untimed forward pass warms up the device (CUDA context, cuDNN autotuning), so
neither method pays it. Peak GPU memory is ``torch.cuda.max_memory_allocated`` of this process, reset
before each method (nnU-Net's preprocessing and export workers do not use the GPU).

Printed: the environment (Python, torch, nnU-Net, device, CUDA), per-scan times as they come, then a
table per method (load once, median and mean seconds per scan, scans per hour, peak GPU memory) and
the speed-up anchor/ctcohort. ``--json FILE`` also writes the results as JSON.

GPU run (one NVIDIA GPU, ~80 GB). nnU-Net resamples each part's logits (classes + 1 channels) back to
the input grid on the CPU; at the default 512x512x450 input that is ~6 s per channel on a slow 2-core
CPU, i.e. minutes per part and far beyond 10 minutes for both methods. TotalSegmentator itself resamples
the CT to 1.5 mm before nnU-Net (so nnU-Net's resampling is a no-op) and the merged label map back
afterwards; to time that regime, and to stay within ~10 minutes, give the scans the model's grid:

    python benchmarks/segment_throughput.py --device cuda --shape 273 273 300 --spacing 1.5 1.5 1.5

The defaults (``python benchmarks/segment_throughput.py --device cuda``) time the native-grid input,
the way ctcohort's workflow feeds nnU-Net; expect well over 10 minutes unless the CPU is fast
(try ``--scans 1`` first). Setup writes ``--parts`` checkpoints of ~125 MB and one scan.

Per-scan times print as they come, so a run cut short still shows what it measured; ``--scans 2``
shortens it. The work folder (model, scans, outputs, nnU-Net's console output in nnunet_<method>.log)
is left in place.

Results go into docs/benchmarks.md. Quick check of the script on a CPU (a couple of minutes):

    python benchmarks/segment_throughput.py --device cpu --scans 2 --shape 96 96 64 --parts 2 \
        --classes 3 --patch 32 --base-features 8
"""

import argparse
import contextlib
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from totalseg_models import plain_conv_unet  # noqa: E402

TRAINER = "nnUNetTrainer"  # the built-in trainer: the predictor looks it up by this name
PLANS = "nnUNetPlans"
CONFIGURATION = "3d_fullres"
FIRST_DATASET_ID = 800  # parts are Dataset801_..., not TotalSegmentator's ids (whose label tables are built in)
# Foreground intensities of a CT dataset, as nnU-Net's fingerprint stores them (CT normalisation clips
# to the 0.5/99.5 percentiles and standardises with mean and std).
CT_INTENSITIES = {
    "max": 3071.0,
    "mean": 95.3,
    "median": 67.0,
    "min": -1024.0,
    "percentile_00_5": -958.0,
    "percentile_99_5": 1283.0,
    "std": 312.4,
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--scans", type=int, default=3)
    p.add_argument("--shape", type=int, nargs=3, default=[512, 512, 450], metavar=("X", "Y", "Z"))
    p.add_argument(
        "--spacing", type=float, nargs=3, default=[0.8, 0.8, 1.0], metavar=("X", "Y", "Z"), help="CT voxel size in mm"
    )
    p.add_argument("--parts", type=int, default=5)
    p.add_argument("--classes", type=int, default=21, help="labels per part (background not counted)")
    p.add_argument("--patch", type=int, default=128, help="cubic patch edge, voxels")
    p.add_argument("--model-spacing", type=float, default=1.5, help="the model's isotropic spacing, mm")
    p.add_argument("--base-features", type=int, default=32)
    p.add_argument("--features-max", type=int, default=320)
    p.add_argument("--tile-step", type=float, default=0.8)
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads for both methods")
    p.add_argument("--methods", nargs="+", default=["anchor", "ctcohort"], choices=["anchor", "ctcohort"])
    p.add_argument("--workdir", help="folder for the model, scans and outputs (default: a temporary one)")
    p.add_argument("--json", help="also write the results to this JSON file")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------------
# Synthetic model
# ---------------------------------------------------------------------------------------------------


def make_plans(args, dataset_name: str) -> dict:
    from nnunetv2.experiment_planning.experiment_planners.network_topology import get_pool_and_conv_props

    spacing = [args.model_spacing] * 3
    median = [round(s * e / args.model_spacing) for s, e in zip(args.spacing[::-1], args.shape[::-1])]
    # nnU-Net's planner rule: pool while the feature map stays >= 4 voxels (128 -> 6 stages)
    _, strides, kernels, patch, _ = get_pool_and_conv_props(spacing, [args.patch] * 3, 4, 999999)
    n_stages = len(strides)
    resampling = {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None}
    return {
        "dataset_name": dataset_name,
        "plans_name": PLANS,
        "original_median_spacing_after_transp": list(args.spacing[::-1]),
        "original_median_shape_after_transp": list(args.shape[::-1]),
        "image_reader_writer": "SimpleITKIO",
        "transpose_forward": [0, 1, 2],
        "transpose_backward": [0, 1, 2],
        "experiment_planner_used": "ExperimentPlanner",
        "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {"0": dict(CT_INTENSITIES)},
        "configurations": {
            CONFIGURATION: {
                "data_identifier": f"{PLANS}_{CONFIGURATION}",
                "preprocessor_name": "DefaultPreprocessor",
                "batch_size": 2,
                "patch_size": [int(x) for x in patch],
                "median_image_size_in_voxels": [float(x) for x in median],
                "spacing": spacing,
                "normalization_schemes": ["CTNormalization"],
                "use_mask_for_norm": [False],
                "resampling_fn_data": "resample_data_or_seg_to_shape",
                "resampling_fn_seg": "resample_data_or_seg_to_shape",
                "resampling_fn_data_kwargs": resampling,
                "resampling_fn_seg_kwargs": {**resampling, "is_seg": True, "order": 1},
                "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
                "resampling_fn_probabilities_kwargs": {**resampling, "order": 1},
                "architecture": plain_conv_unet(
                    [min(args.features_max, args.base_features * 2**i) for i in range(n_stages)],
                    kernels,
                    strides,
                    convs_per_stage=2,
                ),
                "batch_dice": False,
            }
        },
    }


def build_network(plans: dict, dataset_json: dict):
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    plans_manager = PlansManager(plans)
    configuration = plans_manager.get_configuration(CONFIGURATION)
    heads = plans_manager.get_label_manager(dataset_json).num_segmentation_heads
    return nnUNetTrainer.build_network_architecture(
        plans_manager, configuration, 1, heads, enable_deep_supervision=False
    )


def write_model(args, model_dir: Path) -> Path:
    """``--parts`` random-weight nnU-Net model folders under model_dir and a structure table; returns the table."""
    import torch

    torch.manual_seed(args.seed)
    rows = []
    for part in range(1, args.parts + 1):
        dataset_name = f"Dataset{FIRST_DATASET_ID + part:03d}_SyntheticPart{part}"
        folder = model_dir / dataset_name / f"{TRAINER}__{PLANS}__{CONFIGURATION}"
        (folder / "fold_0").mkdir(parents=True, exist_ok=True)
        names = [f"p{part}_s{k}" for k in range(1, args.classes + 1)]
        dataset_json = {
            "channel_names": {"0": "CT"},
            "labels": {"background": 0, **{name: k for k, name in enumerate(names, start=1)}},
            "numTraining": 1,
            "file_ending": ".nii.gz",
            "name": dataset_name,
        }
        plans = make_plans(args, dataset_name)
        (folder / "dataset.json").write_text(json.dumps(dataset_json, indent=2))
        (folder / "plans.json").write_text(json.dumps(plans, indent=2))
        network = build_network(plans, dataset_json)
        torch.save(
            {
                "network_weights": network.state_dict(),
                "init_args": {"plans": plans, "configuration": CONFIGURATION, "fold": 0, "dataset_json": dataset_json},
                "trainer_name": TRAINER,
                "inference_allowed_mirroring_axes": None,
                "current_epoch": 0,
            },
            folder / "fold_0" / "checkpoint_final.pth",
        )
        first = (part - 1) * args.classes
        rows += [(first + k, name, "organ") for k, name in enumerate(names, start=1)]
    table = model_dir / "structures.csv"
    table.write_text("label,name,group\n" + "".join(f"{label},{name},{group}\n" for label, name, group in rows))
    return table


def write_scans(args, scan_dir: Path) -> list[Path]:
    """``--scans`` copies of one synthetic int16 CT: air, an elliptic body of soft tissue, bone, noise."""
    scan_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(args.seed)
    shape = tuple(args.shape)
    x, y = np.ogrid[-1 : 1 : shape[0] * 1j, -1 : 1 : shape[1] * 1j]
    body = (x / 0.8) ** 2 + (y / 0.6) ** 2 < 1
    spine = (x / 0.08) ** 2 + ((y + 0.35) / 0.08) ** 2 < 1
    slab = np.where(body, 40, -1000).astype(np.int16)
    slab[spine] = 700
    ct = np.empty(shape, np.int16)
    for z in range(shape[2]):  # slice by slice: less memory than one float64 volume of noise
        ct[:, :, z] = slab + rng.normal(0, 25, shape[:2]).astype(np.int16)
    img = nib.Nifti1Image(ct, np.diag([*args.spacing, 1.0]))
    img.header.set_xyzt_units("mm", "sec")
    paths = [scan_dir / f"scan{i:02d}_0000.nii.gz" for i in range(args.scans)]
    nib.save(img, paths[0])
    for path in paths[1:]:
        shutil.copyfile(paths[0], path)
    return paths


# ---------------------------------------------------------------------------------------------------
# Methods
# ---------------------------------------------------------------------------------------------------


def part_folders(model_dir: Path) -> list[Path]:
    return sorted(model_dir.glob(f"Dataset*/{TRAINER}__{PLANS}__{CONFIGURATION}"))


def run_anchor(args, device, model_dir: Path, scans: list[Path], out_dir: Path, report) -> list[float]:
    """TotalSegmentator's way: per scan and part a new predictor, weights from disk, file in, file out."""
    import torch

    from ctcohort.nnunet_adapter import new_predictor

    folders = part_folders(model_dir)
    times = []
    for scan in scans:
        case = scan.name.replace("_0000.nii.gz", "")
        case_dir = out_dir / case
        case_dir.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        for i, folder in enumerate(folders):
            predictor = new_predictor(device, args.tile_step, mirroring=False)
            predictor.initialize_from_trained_model_folder(
                str(folder), use_folds=(0,), checkpoint_name="checkpoint_final.pth"
            )
            predictor.predict_from_files(
                [[str(scan)]],
                [str(case_dir / f"part{i + 1}")],
                save_probabilities=False,
                overwrite=True,
                num_processes_preprocessing=1,
                num_processes_segmentation_export=1,
            )
            del predictor
        # merge as TotalSegmentator does: each part's labels shifted to the global ids, later parts win
        merged = None
        for i, _ in enumerate(folders):
            part_img = nib.load(case_dir / f"part{i + 1}.nii.gz")
            labels = np.asarray(part_img.dataobj).astype(np.uint16)
            if merged is None:
                merged = np.zeros(labels.shape, np.uint8 if args.parts * args.classes <= 255 else np.uint16)
            claimed = labels > 0
            merged[claimed] = labels[claimed] + i * args.classes
        nib.save(nib.Nifti1Image(merged, part_img.affine), out_dir / f"{case}.nii.gz")
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
        report(f"  anchor   {case}: {times[-1]:.1f} s")
    return times


def run_ctcohort(args, device, model_dir: Path, table_path: Path, scans: list[Path], out_dir: Path, report):
    """ctcohort's way: every part loaded once, then the scans through a ScanPipeline, as segment_batch runs them
    (the next scan read and the last label map written while a scan is segmented). A scan's time is the
    interval between consecutive scans' completion; the last includes waiting for the outstanding writes."""
    import torch

    from ctcohort.segment import ScanPipeline, SegmentationSettings, Segmenter
    from ctcohort.structures import load_structure_table

    started = time.perf_counter()
    # float32: as the anchor computes on the CPU (a GPU autocasts both alike)
    settings = SegmentationSettings(
        device=device.type, tile_step=args.tile_step, mirroring=False, threads=args.threads, precision="float32"
    )
    segmenter = Segmenter(
        model_dir,
        load_structure_table(table_path),
        task=[FIRST_DATASET_ID + p for p in range(1, args.parts + 1)],
        settings=settings,
    )
    if device.type == "cuda":
        torch.cuda.synchronize()
    load = time.perf_counter() - started
    report(f"  ctcohort load ({len(segmenter.parts)} parts): {load:.1f} s")
    times, writes = [], []
    previous = time.perf_counter()
    with ScanPipeline(segmenter, scans) as pipeline:
        for i, scan in enumerate(scans):
            case = scan.name.replace("_0000.nii.gz", "")
            ct, _, labels = pipeline.segment(i)
            writes.append(pipeline.write(labels, ct, out_dir / f"{case}.nii.gz"))
            if i == len(scans) - 1:
                for write in writes:
                    write.result()
            if device.type == "cuda":
                torch.cuda.synchronize()
            now = time.perf_counter()
            times.append(now - previous)
            previous = now
            report(f"  ctcohort {case}: {times[-1]:.1f} s")
    del segmenter
    return load, times


def warm_up(args, device, model_dir: Path) -> None:
    """One untimed forward pass of a patch (CUDA context, cuDNN autotuning), as the predictor runs it."""
    import torch

    if device.type != "cuda":
        return
    torch.backends.cudnn.benchmark = True  # what nnUNetPredictor sets on CUDA
    folder = part_folders(model_dir)[0]
    network = (
        build_network(
            json.loads((folder / "plans.json").read_text()), json.loads((folder / "dataset.json").read_text())
        )
        .to(device)
        .eval()
    )
    patch = json.loads((folder / "plans.json").read_text())["configurations"][CONFIGURATION]["patch_size"]
    with torch.no_grad(), torch.autocast(device.type, enabled=True):
        network(torch.zeros((1, 1, *patch), device=device))
    torch.cuda.synchronize()
    del network
    torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------------


def environment(device) -> list[str]:
    from importlib.metadata import version

    import nnunetv2  # noqa: F401
    import torch

    lines = [
        f"python {platform.python_version()} ({platform.machine()}), torch {torch.__version__}, "
        f"nnunetv2 {version('nnunetv2')}, CPU cores {os.cpu_count()}"
    ]
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        lines.append(
            f"device: {torch.cuda.get_device_name(device)} ({props.total_memory / 2**30:.0f} GiB), "
            f"CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}"
        )
    else:
        lines.append(f"device: cpu (CUDA available: {torch.cuda.is_available()})")
    return lines


def agreement(workdir: Path, scan: Path) -> float:
    """Fraction of voxels where the two methods' merged label maps of ``scan`` agree (same weights: ~1)."""
    case = scan.name.replace("_0000.nii.gz", "")
    a, c = (nib.load(workdir / f"out_{m}" / f"{case}.nii.gz") for m in ("anchor", "ctcohort"))
    if a.shape != c.shape or not np.allclose(a.affine, c.affine, atol=1e-3):
        return 0.0
    return float(np.mean(np.asarray(a.dataobj) == np.asarray(c.dataobj)))


def summarise(name: str, load: float, times: list[float], peak) -> dict:
    total = load + sum(times)
    return {
        "method": name,
        "load_s": load,
        "scan_s": times,
        "median_s": statistics.median(times),
        "mean_s": total / len(times),
        "scans_per_hour": 3600 * len(times) / total,
        "steady_scans_per_hour": 3600 / statistics.median(times),
        "peak_gpu_mib": peak,
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="segment_throughput_"))
    workdir.mkdir(parents=True, exist_ok=True)
    # nnU-Net warns about unset folders at import; nothing is read from them here
    for key in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        os.environ.setdefault(key, str(workdir / key))
    os.environ["nnUNet_compile"] = "false"  # no torch.compile for either method

    import torch

    from ctcohort.segment import resolve_device

    device = resolve_device(args.device)
    torch.set_num_threads(args.threads)

    console = sys.stdout

    def report(line: str) -> None:
        print(line, file=console, flush=True)

    for line in environment(device):
        report(line)
    resampled = [round(s * e / args.model_spacing) for s, e in zip(args.spacing, args.shape)]
    report(
        f"scans: {args.scans} x {args.shape} voxels of {args.spacing} mm (~{resampled} at "
        f"{args.model_spacing} mm); model: {args.parts} parts x {args.classes} classes, patch {args.patch}^3, "
        f"tile step {args.tile_step}, torch threads {args.threads}; workdir {workdir}"
    )

    started = time.perf_counter()
    model_dir = workdir / "model"
    shutil.rmtree(model_dir, ignore_errors=True)
    table = write_model(args, model_dir)
    scans = write_scans(args, workdir / "scans")
    plans = json.loads((part_folders(model_dir)[0] / "plans.json").read_text())["configurations"][CONFIGURATION]
    report(
        f"setup {time.perf_counter() - started:.1f} s: patch {plans['patch_size']}, features "
        f"{plans['architecture']['arch_kwargs']['features_per_stage']}, strides "
        f"{plans['architecture']['arch_kwargs']['strides']}"
    )
    warm_up(args, device, model_dir)

    results = []
    for method in args.methods:
        out_dir = workdir / f"out_{method}"
        shutil.rmtree(out_dir, ignore_errors=True)
        out_dir.mkdir(parents=True)
        torch.set_num_threads(args.threads)
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        report(f"{method}:")
        # nnU-Net's console chatter (this process only) goes to a log file; per-scan times still print
        with open(workdir / f"nnunet_{method}.log", "w") as log, contextlib.redirect_stdout(log):
            if method == "anchor":
                load, times = 0.0, run_anchor(args, device, model_dir, scans, out_dir, report)
            else:
                load, times = run_ctcohort(args, device, model_dir, table, scans, out_dir, report)
        peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
        results.append(summarise(method, load, times, peak))

    report("")
    report(
        f"{'method':<10}{'load s':>8}{'median s/scan':>15}{'mean s/scan':>13}{'scans/hour':>12}"
        f"{'steady scans/h':>16}{'peak GPU MiB':>14}"
    )
    for r in results:
        peak = f"{r['peak_gpu_mib']:.0f}" if r["peak_gpu_mib"] is not None else "-"
        report(
            f"{r['method']:<10}{r['load_s']:>8.2f}{r['median_s']:>15.1f}{r['mean_s']:>13.1f}"
            f"{r['scans_per_hour']:>12.1f}{r['steady_scans_per_hour']:>16.1f}{peak:>14}"
        )
    report(
        "(anchor: everything per scan; ctcohort: median excludes the one-off load, mean and scans/hour "
        "include it spread over the scans; steady = 3600 / median)"
    )
    by_name, extra = {r["method"]: r for r in results}, {}
    if {"anchor", "ctcohort"} <= set(by_name):
        a, c = by_name["anchor"], by_name["ctcohort"]
        report(
            f"speed-up anchor/ctcohort: {a['mean_s'] / c['mean_s']:.2f}x per scan incl. load, "
            f"{a['median_s'] / c['median_s']:.2f}x steady state (median per scan)"
        )
        same = agreement(workdir, scans[0])
        report(f"same label in both outputs ({scans[0].name}): {100 * same:.3f}% of voxels")
        extra["agreement_first_scan"] = same
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(
            json.dumps({"args": vars(args), "environment": environment(device), "results": results, **extra}, indent=2)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
