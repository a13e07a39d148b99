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


@pytest.fixture
def shared_data() -> Path:
    if not (SHARED_DATA / "totalseg-example").is_dir():
        pytest.skip(f"real CT test data not found at {SHARED_DATA} (set CTCOHORT_TEST_DATA)")
    return SHARED_DATA


def run_workflow(workdir: Path, config_overrides: dict, *args: str, check: bool = True):
    """Run the real workflow with snakemake in ``workdir``, with config/config.yaml overridden."""
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    for key, value in config_overrides.items():
        if isinstance(value, dict):
            config[key].update(value)
        else:
            config[key] = value
    (workdir / "config").mkdir(parents=True, exist_ok=True)
    (workdir / "config" / "config.yaml").write_text(yaml.safe_dump(config))
    command = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"),
               "--directory", str(workdir), "--cores", "2", *args]
    result = subprocess.run(command, cwd=workdir, capture_output=True, text=True, timeout=1200)
    if check and result.returncode != 0:
        raise AssertionError(f"snakemake failed ({result.returncode}):\n{result.stdout[-4000:]}\n{result.stderr[-8000:]}")
    return result
