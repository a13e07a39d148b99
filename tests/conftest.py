import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
# Real CT data from the TotalSegmentator project, beside the checkout during development and CI.
SHARED_DATA = Path(os.environ.get("CTCOHORT_TEST_DATA", REPO.parent / "shared" / "data"))
SHEET_SCHEMA = REPO / "workflow" / "schemas" / "sheet.schema.yaml"


def require_shared_data(folder: Path = SHARED_DATA, ci: bool = bool(os.environ.get("CI"))) -> Path:
    """The real-CT data folder; where it is missing, a skip on a user's machine and an error in CI
    (where it is always laid beside the checkout), so that CI cannot pass without the real-CT tests."""
    if (folder / "totalseg-example").is_dir():
        return folder
    message = f"real CT test data not found at {folder} (set CTCOHORT_TEST_DATA)"
    if ci:
        pytest.fail(message + "; CI is set, where the data must be there")
    pytest.skip(message)


@pytest.fixture
def shared_data() -> Path:
    return require_shared_data()


def real_example_v1():
    """The real example CT and its v1 segmentation as arrays: (affine, HU as int16, labels as uint8; the file
    stores the labels as floats)."""
    import nibabel as nib
    import numpy as np

    folder = require_shared_data() / "totalseg-example"
    ct = nib.load(folder / "example_ct.nii.gz")
    labels = np.rint(np.asanyarray(nib.load(folder / "example_seg_v1.nii.gz").dataobj)).astype(np.uint8)
    return ct.affine, np.asanyarray(ct.dataobj).astype(np.int16), labels


def snakemake_command(workdir: Path, *args: str) -> list[str]:
    """``snakemake ARGS`` on this checkout's Snakefile in ``workdir``, by the running Python."""
    return [
        sys.executable,
        "-m",
        "snakemake",
        "--snakefile",
        str(REPO / "Snakefile"),
        "--directory",
        str(workdir),
        *args,
    ]


def workflow_command(workdir: Path, config_overrides: dict, *args: str) -> list[str]:
    """The snakemake command line that runs the real workflow in ``workdir``, whose config/config.yaml it
    writes: the shipped config with ``config_overrides``."""
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    for key, value in config_overrides.items():
        if isinstance(value, dict):
            config[key].update(value)
        else:
            config[key] = value
    (workdir / "config").mkdir(parents=True, exist_ok=True)
    # in the config's order: the first of several segmentation models is the one whose names stay
    (workdir / "config" / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return snakemake_command(workdir, "--cores", "2", *args)


def run_workflow(workdir: Path, config_overrides: dict, *args: str, check: bool = True):
    """Run the real workflow with snakemake in ``workdir``, with config/config.yaml overridden."""
    command = workflow_command(workdir, config_overrides, *args)
    result = subprocess.run(command, cwd=workdir, capture_output=True, text=True, timeout=1200)
    if check and result.returncode != 0:
        raise AssertionError(
            f"snakemake failed ({result.returncode}):\n{result.stdout[-4000:]}\n{result.stderr[-8000:]}"
        )
    return result


def background_marked(hu, labels, k: int):
    """A copy of ``hu`` with the ``k``-th of a fixed set of background voxels raised by 1 HU: a scan of its own
    (the sheet may not name one scan twice: duplicates; scans whose shifts round alike would otherwise be the
    same bytes), measured exactly as ``hu``. The voxel is outside every structure (label 0), above the CT's
    minimum and below -600 HU: in air, below the body threshold and the soft-tissue window, so neither the CT's
    range, its body nor its preview changes."""
    import numpy as np

    candidates = np.argwhere((labels == 0) & (hu > hu.min()) & (hu <= -600))
    marked = hu.copy()
    marked[tuple(candidates[len(candidates) // 2 + k])] += 1
    return marked


def precomputed_study(data: Path, rows: list[dict]) -> dict:
    """Writes ``rows`` as the cohort sheet in ``data`` and returns the config overrides of a small study of
    precomputed segmentations: statistics from 3 scans, neither normative charts nor scatter figures."""
    import pandas as pd

    pd.DataFrame(rows).to_csv(data / "cohort.tsv", sep="\t", index=False)
    return {
        "cohort": str(data / "cohort.tsv"),
        "segmentation": {"method": "precomputed"},
        "statistics": {"min_n": 3},
        "normative": {"panels": []},
        "figures": {"scatter": []},
    }


def study_folder(tmp_path_factory, name: str) -> tuple[Path, Path]:
    """A new study folder (the workflow's working directory) and its data/ folder, for the scans and the sheet."""
    workdir = tmp_path_factory.mktemp(name)
    (workdir / "data").mkdir()
    return workdir, workdir / "data"
