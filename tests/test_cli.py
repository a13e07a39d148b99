"""The ctcohort command's measure and segment steps: the same defaults as the workflow's config, and checks applied."""

import dataclasses

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import REPO

from ctcohort import phantom
from ctcohort.cli import MEASURE_DEFAULTS, build_parser, main
from ctcohort.imaging import ScanChecks
from ctcohort.segment import SegmentationSettings


def test_measure_defaults_are_the_configs():
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())["measure"]
    args = build_parser().parse_args(["measure", "--ct", "c", "--seg", "s", "-o", "o"])
    assert args.min_voxels == config["min_voxels"] == MEASURE_DEFAULTS["min_voxels"]
    assert args.border_margin == config["border_margin"]
    assert dataclasses.asdict(ScanChecks()) == {k: float(v) for k, v in config["ct_checks"].items()}
    assert (args.min_spacing_mm, args.max_spacing_mm, args.lowest_hu_at_most) == tuple(
        dataclasses.asdict(ScanChecks()).values()
    )


def test_segment_options_default_to_the_segmentation_settings_and_are_checked_there():
    args = build_parser(["segment"]).parse_args(["segment", "--ct", "c", "-o", "o"])
    assert (
        SegmentationSettings(**{f.name: getattr(args, f.name) for f in dataclasses.fields(SegmentationSettings)})
        == SegmentationSettings()
    )
    with pytest.raises(SystemExit):  # the choices are the settings' own
        build_parser(["segment"]).parse_args(["segment", "--ct", "c", "-o", "o", "--precision", "float16"])
    for bad in ({"device": "gpu"}, {"precision": "float16"}, {"resampling": "nearest"}):
        with pytest.raises(ValueError, match=f"unknown segmentation.{next(iter(bad))}"):
            SegmentationSettings(**bad)


def test_measure_command_rejects_a_ct_without_intercept(tmp_path, capsys):
    phantom.write_cohort(tmp_path, 1, seed=3)
    ct = nib.load(tmp_path / "ct" / "demo001.nii.gz")
    raw = np.asanyarray(ct.dataobj).astype(np.int16) + 1024
    nib.save(nib.Nifti1Image(raw, ct.affine), tmp_path / "raw.nii.gz")
    seg = str(tmp_path / "labels" / "demo001.nii.gz")
    assert main(["measure", "--ct", str(tmp_path / "raw.nii.gz"), "--seg", seg, "-o", str(tmp_path / "m.tsv")]) == 1
    assert "not plausibly in HU" in capsys.readouterr().err
    # the same scan with the check relaxed is measured
    assert (
        main(
            [
                "measure",
                "--ct",
                str(tmp_path / "raw.nii.gz"),
                "--seg",
                seg,
                "-o",
                str(tmp_path / "m.tsv"),
                "--lowest-hu-at-most",
                "5000",
            ]
        )
        == 0
    )
    assert len(pd.read_csv(tmp_path / "m.tsv", sep="\t")) == 104
