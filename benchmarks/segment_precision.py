"""The bundled demo model on the CPU in float32 against bfloat16 (segmentation.precision): time per scan,
agreement of the two label maps and Dice against the phantom's true labels, on the same scans in one run.

Demo phantom scans (the demo's spacing, subjects apart from the demo cohort) are segmented by two
Segmenters, one per precision, interleaved scan by scan so that the machine's load hits both alike; the
median time per scan is reported with the ratio. Dice is per structure, against the label map the
phantom was drawn from, with ctcohort.evaluate.surface_metrics; the lowest per-structure mean is printed.

Run:  python benchmarks/segment_precision.py [--scans 6] [--threads 2]
"""

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import torch

from ctcohort import phantom
from ctcohort.evaluate import surface_metrics
from ctcohort.imaging import ct_hounsfield, voxel_spacing_mm
from ctcohort.segment import SegmentationSettings, Segmenter
from ctcohort.structures import load_structure_table

FIRST_SUBJECT = 500  # phantom subject indices apart from the demo's


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scans", type=int, default=6)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    print(
        f"torch {torch.__version__}, {args.threads} threads, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
        f"AVX512-BF16 {torch.cpu._is_avx512_bf16_supported()}, AMX {torch.cpu._is_amx_tile_supported()}"
    )
    table = load_structure_table("total_v1")
    segmenters = {
        precision: Segmenter(
            None, table, settings=SegmentationSettings(device="cpu", threads=args.threads, precision=precision)
        )
        for precision in ("float32", "bfloat16")
    }
    times = {precision: [] for precision in segmenters}
    dice = {precision: [] for precision in segmenters}
    agreement = []
    with tempfile.TemporaryDirectory() as folder:
        for i in range(args.scans):
            phantom.write_subject(folder, seed=1, index=FIRST_SUBJECT + i)
            subject = phantom.subject_id(FIRST_SUBJECT + i)
            ct = nib.load(Path(folder) / "ct" / f"{subject}.nii.gz")
            truth = np.asanyarray(nib.load(Path(folder) / "labels" / f"{subject}.nii.gz").dataobj)
            hu = ct_hounsfield(ct)
            labels = {}
            order = list(segmenters) if i % 2 == 0 else list(segmenters)[::-1]
            for precision in order:
                started = time.perf_counter()
                labels[precision] = segmenters[precision].segment(ct, hu)
                times[precision].append(time.perf_counter() - started)
                metrics = surface_metrics(labels[precision], truth, voxel_spacing_mm(ct.affine), table)
                dice[precision].append(metrics.set_index("structure")["dice"])
            agreement.append(float(np.mean(labels["float32"] == labels["bfloat16"])))
            print(
                f"scan {i + 1}: float32 {times['float32'][-1]:.1f} s, bfloat16 {times['bfloat16'][-1]:.1f} s, "
                f"labels equal on {agreement[-1]:.5%} of voxels"
            )
    print("\n| precision | median s/scan | lowest mean Dice per structure |\n| --- | --- | --- |")
    for precision in segmenters:
        per_structure = pd.concat(dice[precision], axis=1).mean(axis=1)  # NaN where no scan has the structure
        print(f"| {precision} | {statistics.median(times[precision]):.2f} | {per_structure.min():.4f} |")
    print(
        f"\nfloat32 / bfloat16 time: "
        f"{statistics.median(times['float32']) / statistics.median(times['bfloat16']):.2f}x; "
        f"labels equal on {min(agreement):.5%} of voxels at least"
    )


if __name__ == "__main__":
    main()
