"""The ``ctcohort`` command: the workflow's per-scan steps, outside Snakemake."""

import argparse
import logging
import sys

from ctcohort import phantom
from ctcohort.measure import measure_scan, write_measurements
from ctcohort.structures import load_structure_table


def _phantom(args: argparse.Namespace) -> None:
    phantom.write_cohort(args.out, args.n, args.seed, tuple(args.spacing), processes=args.processes)
    print(f"wrote {args.n} phantom scans, cohort.tsv and truth.tsv to {args.out}")


def _measure(args: argparse.Namespace) -> None:
    table = load_structure_table(args.structures)
    frame = measure_scan(args.ct, args.seg, table, border_margin=args.border_margin, min_voxels=args.min_voxels)
    write_measurements(frame, args.out)
    present = (frame["n_voxels"] > 0).sum()
    print(f"measured {present} of {len(frame)} structures -> {args.out}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ctcohort", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("phantom", help="write a synthetic CT cohort with planted age effects")
    p.add_argument("-n", type=int, default=80, help="number of scans (default 80)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("-o", "--out", required=True, help="output folder")
    p.add_argument("--spacing", type=float, nargs=3, default=phantom.DEFAULT_SPACING, metavar=("X", "Y", "Z"),
                   help="voxel spacing in mm (default %(default)s)")
    p.add_argument("--processes", type=int, default=1, help="scans written in parallel")
    p.set_defaults(run=_phantom)

    m = commands.add_parser("measure", help="volume and attenuation of every structure of one scan")
    m.add_argument("--ct", required=True, help="CT NIfTI (HU)")
    m.add_argument("--seg", required=True, help="label map on the CT's grid (any orientation, any dtype)")
    m.add_argument("--structures", default="total_v1",
                   help="total_v1, total_v2 or a CSV with label,name[,group] (default total_v1)")
    m.add_argument("-o", "--out", required=True, help="output TSV, one row per structure")
    m.add_argument("--border-margin", type=int, default=3,
                   help="voxels from the image border within which a structure counts as cut off (default 3)")
    m.add_argument("--min-voxels", type=int, default=1,
                   help="fewer voxels than this is an implausible segmentation (default 1)")
    m.set_defaults(run=_measure)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except (OSError, ValueError) as err:
        print(f"ctcohort {args.command}: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
