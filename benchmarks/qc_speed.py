"""How long the per-scan quality control takes beside measuring the same scan, arrays in memory.

On the synthetic scan of ``measure_speed.py`` (default 512x512x300 voxels, 0.8x0.8x1.5 mm, 104 structures of
``total_v1``), timed interleaved in one process (``--repeats`` rounds, median of each):

* measure: ``measure.measure_structures`` (what the QC runs beside, in the same job);
* geometry: ``qc.structure_geometry`` alone (centres of mass, second pieces of the one-piece structures);
* QC without preview: ``qc.scan_qc`` with ``preview_width=None`` (cut-off faces, vertebral coverage, geometry);
* QC with preview: ``qc.scan_qc`` as the workflow runs it (600 pixels wide).

Target: QC under 0.2 s (with and without the preview). Prints the times and the ratios QC / measure.

Run:  python benchmarks/qc_speed.py [--shape 512 512 300] [--repeats 5]
"""

import argparse
import time

import numpy as np
from measure_speed import SPACING_MM, STRUCTURE_TABLE, make_synthetic_scan

from ctcohort.measure import measure_structures, voxel_volume_ml
from ctcohort.qc import QCSettings, scan_qc, structure_geometry
from ctcohort.structures import load_structure_table


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=3, default=(512, 512, 300))
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    table = load_structure_table(STRUCTURE_TABLE)
    hu, labels = make_synthetic_scan(tuple(args.shape), 1, table)
    affine = np.diag([*SPACING_MM, 1.0])
    measured = measure_structures(hu, labels, voxel_volume_ml(affine), table)
    present = measured["n_voxels"].to_numpy() > 0
    steps = {
        "measure": lambda: measure_structures(hu, labels, voxel_volume_ml(affine), table),
        "geometry": lambda: structure_geometry(
            labels, affine, measured["label"].to_numpy(), measured["structure"].to_numpy(), present
        ),
        "QC without preview": lambda: scan_qc(hu, labels, affine, measured, QCSettings(preview_width=None)),
        "QC with preview": lambda: scan_qc(hu, labels, affine, measured, QCSettings()),
    }
    times = {name: [] for name in steps}
    for round_ in range(args.repeats):
        names = list(steps)[round_ % len(steps) :] + list(steps)[: round_ % len(steps)]
        for name in names:
            start = time.perf_counter()
            steps[name]()
            times[name].append(time.perf_counter() - start)
    median = {name: float(np.median(values)) for name, values in times.items()}
    print(f"scan {tuple(args.shape)}, {int(present.sum())} structures present, {args.repeats} rounds (median s)")
    for name, seconds in median.items():
        print(f"  {name:20s} {seconds:7.3f} s   {seconds / median['measure']:5.2f} x measure")
    for name in ("QC without preview", "QC with preview"):
        print(f"target {name} < 0.2 s: {'met' if median[name] < 0.2 else 'NOT met'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
