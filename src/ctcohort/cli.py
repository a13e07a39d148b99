"""The ``ctcohort`` command: the workflow's per-scan steps, outside Snakemake.

Start-up is part of every per-scan job: a command imports what it needs when it
runs, and only its own options are built (``ctcohort measure`` imports numpy and
nibabel, and pandas for its table, but neither scipy nor the training modules).
"""

import argparse
import inspect
import logging
import sys
from dataclasses import fields
from pathlib import Path

from ctcohort.imaging import ScanChecks
from ctcohort.measure import measure_files

# the CLI's defaults are those of measure_files, so that the two cannot disagree
MEASURE_DEFAULTS = {
    name: p.default
    for name, p in inspect.signature(measure_files).parameters.items()
    if p.default is not inspect.Parameter.empty
}


def _flag(name: str) -> str:
    """The option of a settings field: --min-spacing-mm for min_spacing_mm."""
    return "--" + name.replace("_", "-")


def _phantom(args: argparse.Namespace) -> None:
    from ctcohort import phantom

    phantom.write_cohort(args.out, args.n, args.seed, tuple(args.spacing), processes=args.processes)
    print(f"wrote {args.n} phantom scans, cohort.tsv and truth.tsv to {args.out}")


def _measure(args: argparse.Namespace) -> None:
    from ctcohort.measure import write_measurements

    def table():  # imports pandas, while the scan is read
        from ctcohort.structures import load_structure_table

        return load_structure_table(args.structures)

    checks = ScanChecks(args.min_spacing_mm, args.max_spacing_mm, args.lowest_hu_at_most)
    frame = measure_files(
        args.ct, args.seg, table, border_margin=args.border_margin, min_voxels=args.min_voxels, checks=checks
    )
    write_measurements(frame, args.out)
    present = (frame["n_voxels"] > 0).sum()
    print(f"measured {present} of {len(frame)} structures -> {args.out}")


def _output_name(ct: str) -> str:
    name = Path(ct).name
    for suffix in (".nii.gz", ".nii"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _segment(args: argparse.Namespace) -> None:
    from ctcohort.segment import SegmentationSettings, Segmenter, segment_files  # needs nnU-Net's dependencies
    from ctcohort.structures import load_structure_table

    names = [_output_name(ct) for ct in args.ct]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"several inputs would be written to the same output: {', '.join(duplicates)}")
    settings = SegmentationSettings(**{item.name: getattr(args, item.name) for item in fields(SegmentationSettings)})
    segmenter = Segmenter(args.model, load_structure_table(args.structures), task=args.task, settings=settings)
    segment_files(segmenter, args.ct, [Path(args.out) / f"{n}.nii.gz" for n in names])
    print(f"segmented {len(names)} scan(s) into {args.out}")


def _train(args: argparse.Namespace) -> None:
    from ctcohort import train  # needs the optional nnU-Net dependencies

    model = train.train_model(
        args.out,
        args.work,
        train.TrainingSettings.from_options(vars(args)),
        threads=args.threads,
        structures=args.structures,
        initial_weights=args.initial_weights,
    )
    print(f"trained model in {model}")


def _train_arguments(t: argparse.ArgumentParser) -> None:
    from ctcohort import train  # the settings' defaults (imports neither nnU-Net nor torch)

    defaults = train.DEFAULTS
    t.add_argument(
        "--release",
        default=defaults.release,
        help="release folder (<subject>/ct.nii.gz, <subject>/segmentations/*.nii.gz, "
        "meta.csv with a split column); default: a phantom release written to --work",
    )
    t.add_argument("-o", "--out", required=True, help="model folder to write (what inference needs only)")
    t.add_argument("--work", required=True, help="working folder for nnU-Net's raw/preprocessed/results data")
    t.add_argument("--epochs", type=int, default=defaults.epochs, help="(default %(default)s)")
    t.add_argument(
        "--iterations", type=int, default=defaults.iterations, help="iterations per epoch (default %(default)s)"
    )
    t.add_argument(
        "--configuration",
        default=defaults.configuration,
        help="nnU-Net configuration: 3d_small (a slim network) or 3d_fullres (default %(default)s)",
    )
    _training_arguments(t, train)
    t.add_argument(
        "--initial-weights",
        metavar="MODEL",
        help="continue training from this exported model folder (same structures and configuration)",
    )
    t.add_argument(
        "--bf16",
        action="store_true",
        default=defaults.bf16,
        help="CPU: train in bfloat16 mixed precision (faster on CPUs with bfloat16 instructions; "
        "CUDA always uses nnU-Net's float16)",
    )
    t.add_argument(
        "--half", action="store_true", default=defaults.half, help="export the weights as float16 (half the size)"
    )
    t.add_argument("--device", default=defaults.device, choices=train.DEVICES)
    t.add_argument("--threads", type=int, default=1)
    t.add_argument(
        "--data-workers",
        type=int,
        default=defaults.data_workers,
        help="data loading/augmentation processes (default %(default)s: in the main process)",
    )
    t.add_argument("--dataset-id", type=int, default=defaults.dataset_id)
    t.add_argument("--name", default=defaults.name, help="nnU-Net dataset name (default %(default)s)")
    t.add_argument("--structures", nargs="+", help="structures to train (default: every mask of the release)")
    t.add_argument(
        "--phantom-n", type=int, default=defaults.phantom_n, help="phantom scans if no --release (default %(default)s)"
    )
    t.add_argument("--phantom-seed", type=int, default=defaults.phantom_seed)
    t.set_defaults(run=_train)


def _training_arguments(t: argparse.ArgumentParser, train) -> None:
    """``ctcohort train``'s options of the network and its optimisation."""
    defaults, small = train.DEFAULTS, train.DEFAULTS.small_configuration
    for name, help_text in (  # an option per field of the 3d_small configuration, named as the field
        (
            "patch_voxels",
            "voxels per patch (default %(default)s; clipped to the median image, so a large number "
            "means whole-image patches)",
        ),
        ("base_features", "features of the first stage (default %(default)s)"),
        ("max_features", "most features of a stage (default %(default)s)"),
        ("batch_size", "patches per iteration (default %(default)s)"),
    ):
        t.add_argument(_flag(name), type=int, default=getattr(small, name), help=f"3d_small: {help_text}")
    t.add_argument(
        "--no-augmentation",
        dest="augmentation",
        action="store_false",
        default=defaults.augmentation,
        help="train without data augmentation (mirroring is always off)",
    )
    t.add_argument(
        "--time-budget-min",
        type=float,
        default=defaults.time_budget_min,
        metavar="MINUTES",
        help="fit the epochs into this many minutes (fewer epochs if needed)",
    )
    t.add_argument(
        "--optimizer",
        default=defaults.optimizer,
        choices=train.OPTIMIZERS,
        help="sgd: nnU-Net's default; adam: AdamW lr 1e-3 (faster in short runs; default %(default)s)",
    )
    t.add_argument(
        "--loss",
        default=defaults.loss,
        choices=train.LOSSES,
        help="dice_ce: nnU-Net's Dice + cross-entropy; dice_topk10: cross-entropy over the hardest 10%% "
        "of voxels (small structures get learned sooner; default %(default)s)",
    )


def _phantom_arguments(p: argparse.ArgumentParser) -> None:
    from ctcohort import phantom

    p.add_argument("-n", type=int, default=80, help="number of scans (default 80)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("-o", "--out", required=True, help="output folder")
    p.add_argument(
        "--spacing",
        type=float,
        nargs=3,
        default=phantom.DEFAULT_SPACING,
        metavar=("X", "Y", "Z"),
        help="voxel spacing in mm (default %(default)s)",
    )
    p.add_argument("--processes", type=int, default=1, help="scans written in parallel")
    p.set_defaults(run=_phantom)


def _measure_arguments(m: argparse.ArgumentParser) -> None:
    m.add_argument("--ct", required=True, help="CT NIfTI (HU)")
    m.add_argument("--seg", required=True, help="label map on the CT's grid (any orientation, any dtype)")
    m.add_argument(
        "--structures",
        default="total_v1",
        help="total_v1, total_v2 or a CSV with label,name[,group] (default total_v1)",
    )
    m.add_argument("-o", "--out", required=True, help="output TSV, one row per structure")
    m.add_argument(
        "--border-margin",
        type=int,
        default=MEASURE_DEFAULTS["border_margin"],
        help="voxels from the image border within which a structure counts as cut off (default %(default)s)",
    )
    m.add_argument(
        "--min-voxels",
        type=int,
        default=MEASURE_DEFAULTS["min_voxels"],
        help="fewer voxels than this is an implausible segmentation (default %(default)s)",
    )
    checks = ScanChecks()
    for name, help_text in (  # an option per check of the scan, named as its field of ScanChecks
        ("min_spacing_mm", "a voxel size below this fails the scan (default %(default)s mm)"),
        ("max_spacing_mm", "a voxel size above this fails the scan (default %(default)s mm)"),
        ("lowest_hu_at_most", "a CT whose lowest value is above this is not in HU and fails (default %(default)s)"),
    ):
        m.add_argument(_flag(name), type=float, default=getattr(checks, name), help=help_text)
    m.set_defaults(run=_measure)


def _segment_arguments(s: argparse.ArgumentParser) -> None:
    s.add_argument("--ct", required=True, nargs="+", help="CT NIfTI file(s)")
    s.add_argument(
        "--model",
        help="nnU-Net v2 model folder, or a folder of parts such as TotalSegmentator's weights "
        "(default: the bundled demo model, trained on phantom scans)",
    )
    s.add_argument(
        "--task",
        nargs="+",
        metavar="TASK",
        help="which models of a folder holding several to run: total (TotalSegmentator's 5 parts, "
        "datasets 291-295), total_fast (297), total_fastest (298), or nnU-Net dataset ids (default: the "
        "folder's only model or only task; anything else is an error listing what is there)",
    )
    s.add_argument(
        "--structures", default="total_v1", help="structure table the model's labels are named in (default total_v1)"
    )
    s.add_argument("-o", "--out", required=True, help="output folder: one <name>.nii.gz per input")
    from ctcohort import segment  # the settings' defaults and choices (imports neither nnU-Net nor torch)

    defaults = segment.SegmentationSettings()
    s.add_argument("--device", default=defaults.device, choices=segment.DEVICES)
    s.add_argument("--folds", nargs="+", default=list(defaults.folds), help="folds to ensemble (default %(default)s)")
    s.add_argument(
        "--checkpoint", default=defaults.checkpoint, help="checkpoint file of each fold (default %(default)s)"
    )
    s.add_argument(
        "--tile-step", type=float, default=defaults.tile_step, help="sliding-window step (default %(default)s)"
    )
    s.add_argument(
        "--mirroring", action="store_true", default=defaults.mirroring, help="test-time mirroring (off by default)"
    )
    s.add_argument(
        "--precision",
        default=defaults.precision,
        choices=segment.PRECISIONS,
        help="on the CPU: bfloat16 where the CPU computes it natively (auto), float32 or bfloat16 "
        "(default %(default)s)",
    )
    s.add_argument(
        "--resampling",
        default=defaults.resampling,
        choices=segment.RESAMPLINGS,
        help="trilinear (the CT and the logits) or totalsegmentator (TotalSegmentator 2.18.0's pre- and "
        "postprocessing, for its labels from its weights; default %(default)s)",
    )
    s.add_argument("--threads", type=int, default=defaults.threads, help="(default %(default)s)")
    s.set_defaults(run=_segment)


def _sheet(args: argparse.Namespace) -> None:
    from ctcohort import dicom_series

    settings = dicom_series.InventorySettings(
        secret=args.secret,
        series_uids=args.series_uid,
        processes=args.processes,
        min_slices=args.min_slices,
        file_lists=args.file_lists,
    )
    inventory = dicom_series.write_inventory(
        args.dicom_root, args.out, series_table=args.series_table, key_out=args.key_out, settings=settings
    )
    studies = {(s.patient_key, s.study_key) for s in inventory.series}
    print(
        f"{inventory.images:,} DICOM images of {inventory.files:,} files: {len(inventory.series):,} series in "
        f"{len(studies):,} studies; a CT series chosen for {len(inventory.sheet_rows):,} -> {args.out}"
    )
    without = len(studies) - len(inventory.sheet_rows)
    if without:
        print(
            f"{without:,} {'study' if without == 1 else 'studies'} without a usable CT series"
            + (
                f": see the reason column of {args.series_table}" if args.series_table else " (--series-table says why)"
            ),
            file=sys.stderr,
        )


def _sheet_arguments(s: argparse.ArgumentParser) -> None:
    import os

    from ctcohort import dicom_series

    s.description = (
        "Reads the headers of every file under DICOM_ROOT, groups them into series and writes a cohort "
        "sheet with one CT series per study. " + dicom_series.CHOICE_RULE
    )
    s.add_argument("dicom_root", metavar="DICOM_ROOT", help="folder to search (all sub-folders) for DICOM files")
    s.add_argument(
        "-o",
        "--out",
        required=True,
        help="cohort sheet to write (TSV): one row per study with a usable CT series; file lists for "
        f"series that share a folder go to <sheet name>{dicom_series.LIST_FOLDER_SUFFIX}/ beside it",
    )
    s.add_argument("--series-table", help="also write this TSV: one row per series, chosen or why not")
    s.add_argument(
        "--key-out",
        metavar="FILE",
        help="write the pseudonym -> PatientID/StudyInstanceUID key here (never in a results folder; "
        "keep it apart from the data)",
    )
    s.add_argument(
        "--secret",
        help=f"key of the pseudonyms (default: the environment variable {dicom_series.SECRET_VARIABLE}, "
        "which keeps it out of the shell history); the same secret gives the same pseudonyms",
    )
    s.add_argument(
        "--series-uid",
        nargs="+",
        action="extend",
        metavar="UID",
        help="SeriesInstanceUID(s) to take for their study instead of the rule's choice",
    )
    s.add_argument(
        "--file-lists",
        action="store_true",
        help="name every series by a file list, never by its folder (the sheet then names no folder of "
        "the export, whose names may hold patient names or IDs)",
    )
    s.add_argument(
        "--min-slices",
        type=int,
        default=dicom_series.DEFAULT_MIN_SLICES,
        help="fewer slices than this makes a series unusable (default %(default)s)",
    )
    s.add_argument(
        "--processes",
        type=int,
        default=min(8, os.cpu_count() or 1),
        help="processes reading headers (default %(default)s)",
    )
    s.set_defaults(run=_sheet)


def _import_ct(args: argparse.Namespace) -> None:
    from ctcohort.dicom_import import import_series

    source = args.src[0] if len(args.src) == 1 else args.src
    record = import_series(source, args.out, allow_corrected=args.allow_corrected)
    print(f"imported {record.describe()} -> {args.out}")


def _import_ct_arguments(i: argparse.ArgumentParser) -> None:
    i.add_argument(
        "src",
        nargs="+",
        metavar="SRC",
        help="one DICOM CT series: a folder (all sub-folders), a .zip, a .txt list of files (one path a "
        "line), or the files themselves",
    )
    i.add_argument("-o", "--out", required=True, help="NIfTI file to write (.nii.gz), in HU")
    i.add_argument(
        "--allow-corrected",
        action="store_true",
        help="take dcm2niix's corrected volume for a series with uneven slice spacing (a missing slice) "
        "or a gantry tilt; without it such a series is an error",
    )
    i.set_defaults(run=_import_ct)


def _covariate_values(pairs: list[str]) -> dict[str, float | str]:
    """{name: number, or text for a text covariate or the site} of NAME=VALUE pairs."""
    values = {}
    for pair in pairs:
        name, equals, value = pair.partition("=")
        if not name.strip() or not equals or not value.strip():
            raise ValueError(f"--covariate takes NAME=VALUE, got {pair!r}")
        try:
            values[name.strip()] = float(value)
        except ValueError:
            values[name.strip()] = value.strip()
    return values


def _zscore(args: argparse.Namespace) -> None:
    from ctcohort import normative
    from ctcohort.patients import read_scans
    from ctcohort.tables import STATS_DIGITS, read_statistics, write_tsv

    tables = {}
    for option, path in (
        ("--charts", args.charts),
        ("--coefficients", args.coefficients),
        ("--measurements", args.measurements),
    ):
        if not Path(path).is_file():
            raise FileNotFoundError(f"{option}: no such file: {path}")
        tables[option] = read_statistics(path)
    if args.age is None:  # a cohort table: every scan at its own age, sex and covariates; ids as text
        placement = normative.place_cohort(tables["--charts"], tables["--coefficients"], read_scans(args.measurements))
        where = f"the charts, {placement['subject'].nunique()} scans"
    else:
        placement = normative.place_on_charts(
            tables["--charts"],
            tables["--coefficients"],
            tables["--measurements"],
            _finite_age(args.age),
            args.sex,
            _covariate_values(args.covariate),
        )
        where = f"the {placement['sex'].iloc[0] if len(placement) else args.sex} charts"
    write_tsv(placement, args.out or sys.stdout, STATS_DIGITS)
    notes = placement.loc[~placement["note"].isin(["", *normative.BEYOND_CHART]), "note"].value_counts()
    reasons = ", ".join(f"{count} {note}" for note, count in notes.items())
    beyond = placement["note"].isin(normative.BEYOND_CHART).sum()
    # with the table on standard output the summary goes to standard error
    print(
        f"placed {placement['z'].notna().sum()} of {len(placement)} structure x measures on {where}"
        f" ({beyond} beyond the outer percentiles)"
        + (f"; not placed: {reasons}" if reasons else "")
        + (f" -> {args.out}" if args.out else ""),
        file=sys.stdout if args.out else sys.stderr,
    )


def _finite_age(text: str) -> float:
    import math

    try:
        age = float(text)
    except ValueError:
        raise ValueError(f"--age must be a number (years), got {text!r}") from None
    if not math.isfinite(age):
        raise ValueError(f"--age must be a finite number (years), got {text!r}")
    return age


def _zscore_arguments(z: argparse.ArgumentParser) -> None:
    z.description = (
        "Places scans' measurements on the cohort's normative charts: the percentile and z of every "
        "structure x measure at the scan's age, sex and covariates. One scan: its table and --age "
        "(--sex, --covariate); a cohort: a table like results/tables/measurements.tsv (subject, age, "
        "sex and covariates as columns) without --age, every scan placed in one call."
    )
    z.add_argument("--charts", required=True, help="normative charts (results/stats/normative_charts.tsv)")
    z.add_argument(
        "--coefficients", required=True, help="their covariate coefficients (results/stats/normative_covariates.tsv)"
    )
    z.add_argument(
        "--measurements",
        required=True,
        help="the scan's measurements: a TSV with one row per structure (ctcohort measure's output), "
        "or a cohort's (one row per subject x structure, as results/tables/measurements.tsv)",
    )
    z.add_argument("--age", help="the subject's age at the scan, in years (one scan); leave out for a cohort table")
    z.add_argument("--sex", help="M or F (charts by sex); not needed where the charts are over every scan")
    z.add_argument(
        "--covariate",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a covariate of the scan, e.g. contrast=1, manufacturer=GE, or its site (repeat for several)",
    )
    z.add_argument("-o", "--out", help="output TSV (default: standard output)")
    z.set_defaults(run=_zscore)


# command: (help, function adding its options)
COMMANDS = {
    "phantom": ("write a synthetic CT cohort with planted age effects", _phantom_arguments),
    "measure": ("volume and attenuation of every structure of one scan", _measure_arguments),
    "segment": ("segment CT scans with an nnU-Net v2 model, loaded once", _segment_arguments),
    "train": ("train an nnU-Net v2 model on data in the TotalSegmentator release layout", _train_arguments),
    "import-ct": (
        "convert one DICOM CT series to NIfTI in HU (dcm2niix), refusing broken series",
        _import_ct_arguments,
    ),
    "sheet": (
        "a cohort sheet from a tree of DICOM files: one CT series chosen per study, pseudonyms",
        _sheet_arguments,
    ),
    "zscore": ("one scan's percentiles and z on the cohort's normative (centile) charts", _zscore_arguments),
}


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The command line parser; where ``argv`` names a command first, only that command's options are
    built (the others' modules are not imported)."""
    chosen = argv[0] if argv and argv[0] in COMMANDS else None
    parser = argparse.ArgumentParser(prog="ctcohort", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for name, (text, add_arguments) in COMMANDS.items():
        command = commands.add_parser(name, help=text)
        if chosen in (None, name):
            add_arguments(command)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    # the commands import pandas after this, and pandas' numexpr would log its thread count
    logging.getLogger("numexpr").setLevel(logging.WARNING)
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv).parse_args(argv)
    try:
        args.run(args)
    except (OSError, ValueError, ImportError) as err:  # ImportError: e.g. an unsupported nnunetv2 version
        print(f"ctcohort {args.command}: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
