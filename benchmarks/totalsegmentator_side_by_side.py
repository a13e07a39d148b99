"""Side by side with TotalSegmentator's own code: the same weights, scans and device; labels, volumes, HU, time.

TotalSegmentator 2.18.0 (``totalsegmentator.nnunet.nnUNet_predict_image``, what its command runs per task; run by
tests/totalsegmentator_driver.py in a process of its own, nothing downloaded: nnU-Net's results folder is the
weights folder) and ctcohort's Segmenter in both modes of ``segmentation.resampling`` (``trilinear``, the default,
and ``totalsegmentator``, the parity mode) segment the same scans with the same weights. Printed per structure:
Dice of each ctcohort mode against TotalSegmentator's labels, the volume (ml) and mean-HU differences
ctcohort - TotalSegmentator, and each method's Dice against the phantom's truth; then seconds per scan:
TotalSegmentator's total, its model set-up and weights (load), its resampling of the CT and of the labels, and
nnU-Net's prediction from files (with its own file reading, preprocessing and export); ctcohort's load once,
reading, pre- and postprocessing (everything in ``Segmenter.segment`` but the sliding window: reorientation,
resampling, normalisation, labels back), inference (nnU-Net's sliding window) and writing. The truth columns
(each method's Dice against the phantom's labels) are meaningful for the default weights only.

Weights: ``--weights`` (TotalSegmentator's release layout; ``--task`` total or total_fast, ``--structures``
total_v2), or by default the bundled demo model (trained on phantom scans: trained weights, not random ones,
whose near-ties exaggerate differences) placed as task total_fast (Dataset297_..., its own 33 labels, spacing
2.5 x 2.5 x 4 mm), so that TotalSegmentator runs it as its own 3 mm task (tile step 0.8).
Scans: ``--scans`` phantom subjects (ctcohort.phantom, seed 2024) rendered at ``--spacing`` (default 1.5 x 1.5 x
2.0 mm, off the model's grid, so that the resampling matters) and stored in LPS orientation, with their truth.

TotalSegmentator's code: installed in this environment, or ``--totalsegmentator FOLDER`` (installed there with
``pip install --no-deps --target FOLDER totalsegmentator==2.18.0 dicom2nifti==2.6.2`` if missing; its full
dependencies are not needed for inference).

CPU (the defaults: 3 scans, 2 threads, about 5 minutes on 2 cores):

    python benchmarks/totalsegmentator_side_by_side.py --json side_by_side.json

GPU, TotalSegmentator's 5-part model (its weights folder; scans of your own are not supported here, the phantom
is rendered at --spacing):

    python benchmarks/totalsegmentator_side_by_side.py --device cuda --weights ~/.totalsegmentator/nnunet/results \
        --task total --structures total_v2 --scans 10 --spacing 0.8 0.8 1.0 --json side_by_side_gpu.json
"""

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from totalseg_models import (  # noqa: E402
    RELEASE_FOLDERS,
    RELEASE_TRAINERS,
    TOTALSEGMENTATOR_VERSION,
    release_model_dir,
    totalsegmentator_environment,
    totalsegmentator_labels,
    totalsegmentator_problem,
)

PHANTOM_SEED = 2024
MODES = ("trilinear", "totalsegmentator")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", help="TotalSegmentator's weights folder (default: the demo model as total_fast)")
    parser.add_argument("--task", default="total_fast", choices=("total", "total_fast", "total_fastest"))
    parser.add_argument("--structures", default="total_v1", help="structure table of the model's labels")
    parser.add_argument("--scans", type=int, default=3)
    parser.add_argument("--spacing", type=float, nargs=3, default=(1.5, 1.5, 2.0))
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--totalsegmentator", help="folder holding TotalSegmentator's package (installed if absent)")
    parser.add_argument("--work", help="work folder (default: a new temporary one, left in place)")
    parser.add_argument("--json", help="write the summary here")
    return parser.parse_args(argv)


def demo_release(root: Path) -> Path:
    """The bundled demo model as TotalSegmentator's task total_fast (Dataset297_..., the release's trainer)."""
    from ctcohort.segment import bundled_model_dir

    target = release_model_dir(root, 297)
    (target / "fold_0").mkdir(parents=True, exist_ok=True)
    for name in ("dataset.json", "fold_0/checkpoint_final.pth"):
        shutil.copyfile(bundled_model_dir() / name, target / name)
    plans = json.loads((bundled_model_dir() / "plans.json").read_text())
    plans["dataset_name"] = RELEASE_FOLDERS[297]  # the dataset id ctcohort reads from the plans
    (target / "plans.json").write_text(json.dumps(plans, indent=1))
    return root


def ensure_totalsegmentator(env: dict, folder: str | None) -> None:
    if totalsegmentator_problem(env) and folder:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "install",
                "-q",
                "--no-deps",
                "--target",
                folder,
                f"totalsegmentator=={TOTALSEGMENTATOR_VERSION}",
                "dicom2nifti==2.6.2",
            ],
            check=True,
        )
    problem = totalsegmentator_problem(env)
    if problem:
        sys.exit(problem + " (give --totalsegmentator FOLDER to install it there)")


def write_phantoms(folder: Path, n: int, spacing) -> tuple[list[Path], list[np.ndarray]]:
    """n phantom scans stored in LPS, and their truth (v1 labels) in that stored voxel order."""
    from ctcohort import phantom

    paths, truths = [], []
    lps = nib.orientations.axcodes2ornt("LPS")
    for index in range(n):
        ct, labels, affine = phantom.render_subject(phantom.draw_subject(seed=PHANTOM_SEED, index=index), spacing)
        path = folder / f"scan{index}.nii.gz"
        nib.save(nib.Nifti1Image(ct, affine).as_reoriented(lps), path)
        paths.append(path)
        truths.append(np.asanyarray(nib.Nifti1Image(labels, affine).as_reoriented(lps).dataobj))
    return paths, truths


def task_setup(task: str, weights: Path) -> tuple[list[int], str, list[float]]:
    """(dataset ids, trainer, resampling spacing x y z) with which TotalSegmentator runs the task."""
    from ctcohort.segment import TASKS

    ids = list(TASKS[task])
    plans = json.loads((release_model_dir(weights, ids[0]) / "plans.json").read_text())
    configuration = plans["configurations"]["3d_fullres"]
    spacing = configuration.get("spacing") or plans["configurations"][configuration["inherits_from"]]["spacing"]
    return ids, RELEASE_TRAINERS[ids[0]], list(reversed(spacing))  # plans: (z, y, x); TotalSegmentator: x, y, z


def run_ctcohort(weights, task, structures, scans, out_dir: Path, mode: str, device: str, threads: int):
    """ctcohort's labels of each scan, and seconds: load once, then per scan read, preprocess, infer, write."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    from ctcohort import segment
    from ctcohort.imaging import load_image
    from ctcohort.structures import load_structure_table

    inference = [0.0]
    sliding_window = nnUNetPredictor.predict_sliding_window_return_logits

    def timed_sliding_window(*args, **kwargs):
        started = time.perf_counter()
        logits = sliding_window(*args, **kwargs)
        inference[0] += time.perf_counter() - started
        return logits

    nnUNetPredictor.predict_sliding_window_return_logits = timed_sliding_window
    try:
        started = time.perf_counter()
        settings = segment.SegmentationSettings(device=device, threads=threads, precision="float32", resampling=mode)
        segmenter = segment.Segmenter(weights, load_structure_table(structures), task=task, settings=settings)
        load_s = time.perf_counter() - started
        results, times = [], []
        for path in scans:
            inference[0] = 0.0
            t0 = time.perf_counter()
            ct = load_image(path, in_memory=True)
            t1 = time.perf_counter()
            labels = segmenter.segment(ct)
            t2 = time.perf_counter()
            nib.save(segment.label_map_image(labels, ct, segmenter.table), out_dir / f"{mode}_{path.name}")
            t3 = time.perf_counter()
            results.append(labels)
            times.append(
                {
                    "read": t1 - t0,
                    "preprocess": t2 - t1 - inference[0],
                    "inference": inference[0],
                    "write": t3 - t2,
                    "total": t3 - t0,
                }
            )
    finally:
        nnUNetPredictor.predict_sliding_window_return_logits = sliding_window
    return results, load_s, times


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = np.count_nonzero(a) + np.count_nonzero(b)
    return 2.0 * np.count_nonzero(a & b) / total if total else 1.0


def model_label_map(weights: Path, dataset_ids, structures: str) -> np.ndarray:
    """Lookup from TotalSegmentator's output labels to the structure table's (by name): for a task of parts
    TotalSegmentator's outputs are its v2 ids already; for one model, dataset.json's."""
    import pandas as pd

    from ctcohort.resources import resources_dir
    from ctcohort.segment import TOTALSEG_PARTS_TABLE
    from ctcohort.structures import load_structure_table

    table = load_structure_table(structures)
    label_of = dict(zip(table["name"], table["label"]))
    if len(dataset_ids) > 1:
        parts = pd.read_csv(resources_dir() / "structures" / TOTALSEG_PARTS_TABLE)
        names = dict(zip(parts["global_label"].astype(int), parts["name"]))
    else:
        labels = json.loads((release_model_dir(weights, dataset_ids[0]) / "dataset.json").read_text())["labels"]
        names = {int(v): k for k, v in labels.items() if k != "background"}
    lookup = np.zeros(max(names) + 1, np.int64)
    for model_label, name in names.items():
        lookup[model_label] = label_of[name]
    return lookup


def structure_rows(table, theirs, ours_by_mode, truths, cts, voxel_ml):
    rows = []
    for label, name in zip(table["label"], table["name"]):
        row = {"structure": name}
        their_masks = [t == label for t in theirs]
        if not any(m.any() for m in their_masks) and not any(
            (o == label).any() for mode in MODES for o in ours_by_mode[mode]
        ):
            continue
        for mode in MODES:
            masks = [o == label for o in ours_by_mode[mode]]
            row[f"dice_{mode}"] = float(np.mean([dice(m, t) for m, t in zip(masks, their_masks)]))
            row[f"volume_diff_ml_{mode}"] = float(
                np.mean(
                    [(np.count_nonzero(m) - np.count_nonzero(t)) * v for m, t, v in zip(masks, their_masks, voxel_ml)]
                )
            )
            row[f"hu_diff_{mode}"] = float(
                np.nanmean(
                    [
                        (ct[m].mean() if m.any() else np.nan) - (ct[t].mean() if t.any() else np.nan)
                        for m, t, ct in zip(masks, their_masks, cts)
                    ]
                )
            )
            row[f"truth_dice_{mode}"] = float(np.mean([dice(m, truth == label) for m, truth in zip(masks, truths)]))
        row["truth_dice_totalsegmentator_code"] = float(
            np.mean([dice(t, truth == label) for t, truth in zip(their_masks, truths)])
        )
        rows.append(row)
    return rows


def main(argv=None) -> None:
    args = parse_args(argv)
    import pandas as pd
    import torch

    from ctcohort.structures import load_structure_table

    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    work = Path(args.work or tempfile.mkdtemp(prefix="side_by_side_"))
    work.mkdir(parents=True, exist_ok=True)
    weights = Path(args.weights) if args.weights else demo_release(work / "weights")
    env = totalsegmentator_environment(weights, work / "home", args.totalsegmentator)
    env.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    ensure_totalsegmentator(env, args.totalsegmentator)
    print(
        f"Python {platform.python_version()}, torch {torch.__version__}, device {args.device}, "
        f"{args.threads} threads, CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
        f"load average {os.getloadavg()[0]:.1f}; work folder {work}"
    )
    scans, truths = write_phantoms(work, args.scans, args.spacing)
    dataset_ids, trainer, resample = task_setup(args.task, weights)
    print(
        f"weights {weights} task {args.task} (datasets {dataset_ids}), TotalSegmentator resamples to {resample} mm;"
        f" {args.scans} phantom scans at {args.spacing} mm, LPS"
    )

    started = time.perf_counter()
    theirs = totalsegmentator_labels(
        env,
        scans,
        [work / f"totalsegmentator_{p.name}" for p in scans],
        task_ids=dataset_ids,
        trainer=trainer,
        resample=resample,
        device=args.device,
        timings=work / "totalsegmentator_timings.json",
    )
    ts_wall = time.perf_counter() - started
    ts_timings = json.loads((work / "totalsegmentator_timings.json").read_text())
    lookup = model_label_map(weights, dataset_ids, args.structures)
    theirs = [lookup[t] for t in theirs]

    ours, ours_times, ours_load = {}, {}, {}
    for mode in MODES:
        ours[mode], ours_load[mode], ours_times[mode] = run_ctcohort(
            weights, args.task, args.structures, scans, work, mode, args.device, args.threads
        )

    table = load_structure_table(args.structures)
    cts = [np.asanyarray(nib.load(p).dataobj).astype(np.float64) for p in scans]
    voxel_ml = [float(np.prod(nib.load(p).header.get_zooms()[:3])) / 1000.0 for p in scans]
    rows = pd.DataFrame(structure_rows(table, theirs, ours, truths, cts, voxel_ml))
    with pd.option_context("display.width", 250, "display.max_rows", 500, "display.float_format", "{:.4f}".format):
        print(rows.to_string(index=False))

    def per_scan(timings, key):
        return float(np.mean([t.get(key, 0.0) for t in timings]))

    ts_scans = ts_timings["scans"]
    print(
        f"\nTotalSegmentator {TOTALSEGMENTATOR_VERSION}, s per scan: total {per_scan(ts_scans, 'total'):.2f} "
        f"(load {per_scan(ts_scans, 'load'):.2f}, resampling {per_scan(ts_scans, 'resampling'):.2f}, "
        f"nnU-Net predict_from_files {per_scan(ts_scans, 'nnunet') - per_scan(ts_scans, 'load'):.2f}); "
        f"import {ts_timings['import_s']:.1f} s once; process wall {ts_wall:.1f} s"
    )
    for mode in MODES:
        t = ours_times[mode]
        print(
            f"ctcohort {mode}, s per scan: total {per_scan(t, 'total'):.2f} (read {per_scan(t, 'read'):.2f}, "
            f"pre/postprocess {per_scan(t, 'preprocess'):.2f}, inference {per_scan(t, 'inference'):.2f}, write "
            f"{per_scan(t, 'write'):.2f}); load once {ours_load[mode]:.2f} s"
        )
    summary = {
        "dice_min_default": float(rows["dice_trilinear"].min()),
        "dice_median_default": float(rows["dice_trilinear"].median()),
        "dice_min_parity": float(rows["dice_totalsegmentator"].min()),
        "dice_median_parity": float(rows["dice_totalsegmentator"].median()),
        "s_per_scan_ctcohort": per_scan(ours_times["trilinear"], "total") + ours_load["trilinear"] / args.scans,
        "s_per_scan_ctcohort_parity": (
            per_scan(ours_times["totalsegmentator"], "total") + ours_load["totalsegmentator"] / args.scans
        ),
        "s_per_scan_totalsegmentator": per_scan(ts_scans, "total"),
        "truth_dice_median": {
            name: float(rows[f"truth_dice_{name}"].median())
            for name in ("trilinear", "totalsegmentator", "totalsegmentator_code")
        },
        "truth_dice_mean": {
            name: float(rows[f"truth_dice_{name}"].mean())
            for name in ("trilinear", "totalsegmentator", "totalsegmentator_code")
        },
        "scans": args.scans,
        "spacing": list(args.spacing),
        "device": args.device,
        "threads": args.threads,
        "task": args.task,
        "weights": "demo model as total_fast" if not args.weights else "given",
    }
    print(json.dumps(summary, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps({**summary, "structures": rows.to_dict("records")}, indent=1))


if __name__ == "__main__":
    main()
