"""Timed runs of this checkout's workflow in a study folder, shared by the planning and cohort benchmarks."""

import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from conftest import snakemake_command  # noqa: E402


def timed_snakemake(folder: Path, *args: str) -> float:
    """Wall seconds of ``snakemake --cores 2 ARGS`` on the checkout's Snakefile in ``folder``; exits on failure."""
    command = snakemake_command(folder, "--cores", "2", *args)
    started = time.perf_counter()
    result = subprocess.run(command, cwd=folder, capture_output=True, text=True)
    elapsed = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"snakemake {' '.join(args)} failed in {folder}:\n{result.stderr[-3000:]}")
    return elapsed
