"""The workflow on a real SLURM cluster: profiles/slurm with snakemake-executor-plugin-slurm, against a
single-node cluster that tests/slurm/cluster.sh starts on this machine (munged, slurmctld, slurmd).

A cohort of real-CT copies is measured twice, on the cluster and locally, and the tables must be the same
bytes. Every measure job's first attempt asks for less memory than it needs: SLURM kills it
(OverMemoryKill), and a retry with more memory (attempt x the first) completes the study.

Needs root (the cluster's daemons; the Debian packages are installed when missing) and the plugin
(`pip install -e '.[test]'` or `'.[slurm]'`). In CI it fails where it cannot run; elsewhere it skips.
"""

import importlib.util
import os
import re
import shutil
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from conftest import REPO, require_shared_data, workflow_command

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

CLUSTER = REPO / "tests" / "slurm" / "cluster.sh"
N_SCANS, SCANS_PER_JOB = 6, 3
# Memory of a measure job's first attempt: less than Snakemake alone holds on the node (about 210 MB, for
# the whole job), so SLURM kills it for sure (it samples memory once a second, which a short peak of the
# measuring script can slip through); each retry asks for attempt x this, and one of them completes.
FIRST_ATTEMPT_MB = 150
# retries beyond the profile's 2: the attempt that fits is the 2nd to 4th (the job step peaked at
# 380-410 MB, the sustained part below 300)
RETRIES = 3
CONFIG = {
    "segmentation": {"method": "precomputed"},
    "measure": {"scans_per_job": SCANS_PER_JOB},
    "resources": {"per_scan_mem_mb": FIRST_ATTEMPT_MB, "per_scan_runtime_min": 2},
    "statistics": {"min_n": 3},
}


def cannot_run(reason: str):
    if os.environ.get("CI"):
        pytest.fail(f"{reason}; CI is set, where the SLURM test must run")
    pytest.skip(reason)


def cluster_command(action: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(CLUSTER), action], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def cluster():
    """A running single-node cluster, stopped afterwards unless it was running before."""
    if importlib.util.find_spec("snakemake_executor_plugin_slurm") is None:
        cannot_run("snakemake-executor-plugin-slurm is not installed (pip install -e '.[slurm]')")
    if not shutil.which("dpkg-query"):
        cannot_run("not a Debian system: tests/slurm/cluster.sh installs SLURM with apt-get")
    if os.geteuid() != 0:
        cannot_run("the single-node SLURM cluster needs root (its daemons run as root)")
    was_running = cluster_command("status", timeout=60).returncode == 0
    started = cluster_command("start")
    if started.returncode != 0:
        cannot_run(f"tests/slurm/cluster.sh start failed:\n{started.stderr[-3000:]}")
    yield
    if not was_running:
        stopped = cluster_command("stop", timeout=120)
        assert stopped.returncode == 0, stopped.stderr
        assert cluster_command("status", timeout=60).returncode != 0


@pytest.fixture(scope="module")
def scans(tmp_path_factory) -> list[Path]:
    """N_SCANS copies of the real example CT, each a scan of its own (the sheet may not name one scan twice:
    duplicates): one background voxel (label 0, in air, above the CT's minimum) raised by 1 HU, which changes no
    measurement. Both runs read these same files."""
    data = require_shared_data() / "totalseg-example"
    folder = tmp_path_factory.mktemp("scans")
    ct = nib.load(data / "example_ct.nii.gz")
    hu = np.asanyarray(ct.dataobj)
    labels = np.rint(np.asanyarray(nib.load(data / "example_seg_v1.nii.gz").dataobj))
    candidates = np.argwhere((labels == 0) & (hu > hu.min()) & (hu <= -600))
    paths = []
    for i in range(1, N_SCANS + 1):
        marked = hu.copy()
        marked[tuple(candidates[len(candidates) // 2 + i])] += 1
        paths.append(folder / f"scan{i}_ct.nii.gz")
        nib.save(nib.Nifti1Image(marked, ct.affine, ct.header), paths[-1])  # the CT's header: type, scaling
    return paths


def real_ct_cohort(folder: Path, scans: list[Path]) -> Path:
    data = require_shared_data() / "totalseg-example"
    folder.mkdir(parents=True)
    rows = [
        (f"scan{i}", ct, data / "example_seg_v1.nii.gz", 35 + 6 * i, "MF"[i % 2], i % 2)
        for i, ct in enumerate(scans, start=1)
    ]
    sheet = pd.DataFrame(rows, columns=["subject", "ct", "seg", "age", "sex", "contrast"])
    sheet.to_csv(folder / "cohort.tsv", sep="\t", index=False)
    return folder / "cohort.tsv"


# what the tests compare: the measure jobs on the cluster and the tables after them (the figures, charts and CT
# age, local rules like age_correlations, add nothing to what this file checks)
TARGET = "results/stats/age_correlations.tsv"


def snakemake(workdir: Path, scans: list[Path], *args: str, timeout_s: int = 420) -> subprocess.CompletedProcess:
    sheet = real_ct_cohort(workdir / "data", scans)
    # Snakemake does not stop on SIGTERM while jobs run: timeout sends SIGKILL 10 s later
    command = [
        "timeout",
        "-k",
        "10",
        str(timeout_s),
        *workflow_command(workdir, {**CONFIG, "cohort": str(sheet)}, *args, TARGET),
    ]
    result = subprocess.run(command, cwd=workdir, capture_output=True, text=True)
    assert result.returncode == 0, f"snakemake failed ({result.returncode}):\n{result.stderr[-6000:]}"
    return result


@pytest.fixture(scope="module")
def runs(cluster, scans, tmp_path_factory):
    on_slurm = tmp_path_factory.mktemp("slurm_run")
    run = snakemake(
        on_slurm,
        scans,
        "--profile",
        str(REPO / "profiles" / "slurm"),
        # this cluster has no accounting database (no sacct), and short jobs
        "--slurm-status-command",
        "squeue",
        "--slurm-init-seconds-before-status-checks",
        "5",
        "--retries",
        str(RETRIES),
    )
    log = run.stdout + run.stderr
    run_id = re.search(r"SLURM run ID: (\S+)", log).group(1)
    # every job of the run, as SLURM knows it (finished jobs stay for MinJobAge, 300 s)
    queue = subprocess.run(
        ["squeue", "--states=all", "--noheader", f"--name={run_id}", "--format=%i|%k|%T|%m"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    jobs = pd.DataFrame([line.split("|") for line in queue.split()], columns=["jobid", "comment", "state", "memory"])
    local = tmp_path_factory.mktemp("local_run")
    snakemake(local, scans)
    return {
        "slurm": on_slurm,
        "local": local,
        "log": log,
        "jobs": jobs.sort_values("jobid", key=lambda s: s.astype(int)),
    }


def test_every_measure_job_went_through_sbatch(runs):
    jobs = runs["jobs"]
    batches = {f"rule_measure_batch_{b:05d}" for b in range(N_SCANS // SCANS_PER_JOB)}
    assert set(jobs["comment"]) == batches, jobs
    assert len(re.findall(r"has been submitted with SLURM jobid", runs["log"])) == len(jobs)
    # the cohort rules are local rules: they ran on the submitting host, not as cluster jobs
    assert (runs["slurm"] / "results" / "stats" / "age_correlations.tsv").exists()


def test_a_job_killed_for_memory_is_retried_with_more_and_completes(runs):
    jobs, slurm_logs = runs["jobs"], runs["slurm"] / ".snakemake" / "slurm_logs"
    for batch, attempts in jobs.groupby("comment"):
        # SLURM 22.05's OverMemoryKill ends the job FAILED (signal 9); later versions say OUT_OF_MEMORY
        states = list(attempts["state"])
        assert 2 <= len(states) <= RETRIES + 1, attempts
        assert set(states[:-1]) <= {"FAILED", "OUT_OF_MEMORY"} and states[-1] == "COMPLETED", attempts
        assert list(attempts["memory"]) == [f"{k * FIRST_ATTEMPT_MB}M" for k in range(1, len(states) + 1)], attempts
        for failed in attempts["jobid"].iloc[:-1]:
            (log,) = slurm_logs.glob(f"{batch}/**/{failed}.log")
            assert "exceeded memory limit" in log.read_text(), log.read_text()[-2000:]


def test_the_tables_are_those_of_a_local_run(runs):
    slurm, local = runs["slurm"] / "results", runs["local"] / "results"
    tables = [
        "tables/measurements.tsv",
        "tables/failures.tsv",
        "tables/qc_summary.tsv",
        "tables/exclusion_counts.tsv",
        "tables/measurement_summary.tsv",
        "stats/age_correlations.tsv",
    ]
    for table in tables:
        assert (slurm / table).read_bytes() == (local / table).read_bytes(), table
    measurements = pd.read_csv(slurm / "tables" / "measurements.tsv", sep="\t")
    assert measurements["subject"].nunique() == N_SCANS
    assert measurements["volume_ml"].notna().any()
