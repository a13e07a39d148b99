"""A study killed in the middle of a run (the machine or terminal dies) and run again as a user would
ends with the same bytes as a study that was never interrupted.

The cohort is copies of the real example CT (a few seconds each, so that a kill lands while
measure jobs run), one broken scan (a row of failures.tsv) and reference segmentations for two scans
(the evaluation's bootstrap and Dice figure). The same sheet is run twice to the same targets, in two
folders: once straight through, once killed with SIGKILL (snakemake and its running jobs) and then
unlocked and rerun with the same command. The targets are what a kill mid-measure cuts into and what reads
it first: the per-scan outputs, the cohort tables, the evaluation and the age correlations; the study's
further statistics and figures are drawn from these tables by jobs that the kill never reaches (a figure
drawn twice is the same bytes: test_figures). Every output of the two studies must be the same bytes,
which also says that the outputs are deterministic (a job order that leaks into a table would differ).
"""

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from conftest import background_marked, require_shared_data, run_workflow, workflow_command

pytestmark = pytest.mark.slow

N_SCANS = 12  # measured in ~2-3 s each on 2 cores: the fan-out lasts long enough to be hit mid-run
SCANS_PER_JOB = 2  # measure batches: a kill lands between and inside jobs
BROKEN = "s05"
EVALUATED = ["s01", "s02"]
# Not compared: logs and benchmarks hold times and process ids of the run that wrote them (and a rerun
# appends to a killed job's log); the HTML report (not built here) embeds its creation date and run info.
RUN_RECORDS = ("logs", "benchmarks")
# both studies' targets (the docstring says why these); the review page reads every scan's QC table
TARGETS = (
    "results/tables/measurements.parquet",
    "results/tables/contrast_phase.tsv",
    "results/tables/software_versions.tsv",
    "results/qc/review.html",
    "results/evaluation/dice_summary.tsv",
    "results/stats/age_correlations.tsv",
)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> dict:
    """The study's config: a sheet of real-CT copies whose attenuation follows age, one of them broken."""
    folder = require_shared_data() / "totalseg-example"
    data = tmp_path_factory.mktemp("faults-data")
    ct = nib.load(folder / "example_ct.nii.gz")
    hu = np.asanyarray(ct.dataobj).astype(np.int16)
    labels = np.rint(np.asanyarray(nib.load(folder / "example_seg_v1.nii.gz").dataobj)).astype(np.uint8)
    rng = np.random.default_rng(9)
    nib.save(nib.Nifti1Image(labels, ct.affine), data / "seg.nii.gz")
    rows = []
    for i in range(1, N_SCANS + 1):
        subject, age = f"s{i:02d}", 25 + 5 * i
        row = {
            "subject": subject,
            "ct": f"{subject}.nii.gz",
            "seg": "seg.nii.gz",
            "age": age,
            "sex": "MF"[i % 2],
            "contrast": i % 2,
            "reference": "",
        }
        if subject == BROKEN:
            (data / row["ct"]).write_bytes(b"an interrupted copy")
        else:
            shift = np.int16(round((age - 50) / 2 + rng.normal(0, 3)))
            nib.save(nib.Nifti1Image(background_marked(hu, labels, i) + shift, ct.affine), data / row["ct"])
        if subject in EVALUATED:  # a reference that disagrees with the segmentation by a voxel or two
            row["reference"] = f"{subject}_reference.nii.gz"
            nib.save(nib.Nifti1Image(np.roll(labels, i, axis=0), ct.affine), data / row["reference"])
        rows.append(row)
    sheet = pd.DataFrame(rows).replace("", np.nan)
    sheet.to_csv(data / "cohort.tsv", sep="\t", index=False)
    return {
        "cohort": str(data / "cohort.tsv"),
        "segmentation": {"method": "precomputed"},
        "measure": {"scans_per_job": SCANS_PER_JOB},
    }


def study_files(results: Path) -> dict[str, bytes]:
    """Every output of a study by its path under results/, except the run records."""
    return {
        str(path.relative_to(results)): path.read_bytes()
        for path in sorted(results.rglob("*"))
        if path.is_file() and path.relative_to(results).parts[0] not in RUN_RECORDS
    }


def live_group_members(pgid: int) -> list[int]:
    """Processes of process group ``pgid`` that still run (zombies excluded: they are dead)."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, _parent, group = stat.read_text().rsplit(")", 1)[1].split()[:3]
        except (OSError, IndexError):
            continue
        if int(group) == pgid and state != "Z":
            members.append(int(stat.parent.name))
    return members


def kill_mid_run(workdir: Path, config: dict, timeout_s: float = 120) -> dict[Path, int]:
    """Start the study and SIGKILL snakemake's whole process group (its running jobs too) once some but
    not all scans are measured; the status files of the scans measured by then, with their mtimes."""
    measured = workdir / "results" / "measure"
    console = workdir / "killed_run.log"
    with console.open("w") as stream:  # a session of its own: the group is snakemake and its jobs
        process = subprocess.Popen(
            workflow_command(workdir, config, *TARGETS),
            cwd=workdir,
            stdout=stream,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    deadline = time.monotonic() + timeout_s
    try:
        while len(list(measured.glob("*.status.json"))) < 3:
            assert process.poll() is None, (
                f"snakemake ended ({process.returncode}) before it could be killed:\n{console.read_text()[-4000:]}"
            )
            assert time.monotonic() < deadline, "no scan measured in time"
            time.sleep(0.02)
    finally:
        with contextlib.suppress(ProcessLookupError):  # already gone where snakemake ended first
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    deadline = time.monotonic() + 10
    while live_group_members(process.pid):
        assert time.monotonic() < deadline, f"jobs outlived the kill: {live_group_members(process.pid)}"
        time.sleep(0.05)
    return {path: path.stat().st_mtime_ns for path in measured.glob("*.status.json")}


def test_a_study_killed_mid_run_and_rerun_ends_as_an_uninterrupted_one(cohort, tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    for workdir in (straight, killed):
        workdir.mkdir()
    run_workflow(straight, cohort, *TARGETS)
    expected = study_files(straight / "results")
    # what the study holds, so that equal bytes below mean something
    failures = pd.read_csv(straight / "results" / "tables" / "failures.tsv", sep="\t")
    assert list(failures["subject"]) == [BROKEN]
    assert {
        "stats/age_correlations.tsv",
        "tables/measurements.parquet",
        "tables/qc.tsv",
        "evaluation/dice_summary.tsv",
        "figures/dice.svg",
        "qc/s01.png",
    } <= set(expected)
    assert (pd.read_csv(straight / "results" / "stats" / "age_correlations.tsv", sep="\t")["note"] != "constant").any()

    measured = kill_mid_run(killed, cohort)
    assert 3 <= len(measured) < N_SCANS, f"killed with {len(measured)} of {N_SCANS} scans measured: not mid-run"
    assert not (killed / "results" / "tables" / "measurements.tsv").exists()
    # as a user would: the killed run left its lock, which --unlock removes; then the same command. A job
    # that the kill cut short left its outputs marked incomplete, perhaps half written; the default profile's
    # rerun-incomplete runs it again (without it, snakemake would stop and list them).
    refused = run_workflow(killed, cohort, *TARGETS, check=False)
    assert refused.returncode != 0 and "--unlock" in refused.stdout + refused.stderr
    run_workflow(killed, cohort, "--unlock")
    run_workflow(killed, cohort, *TARGETS)
    # the rerun resumes: scans measured before the kill are kept, except those of the jobs (at most 2, one
    # per core) that the kill cut short or that had written their outputs but were not yet recorded as finished
    measured_again = [path.name for path, mtime in measured.items() if path.stat().st_mtime_ns != mtime]
    assert len(measured_again) <= 2 * SCANS_PER_JOB, measured_again

    got = study_files(killed / "results")
    assert sorted(got) == sorted(expected)
    differing = [name for name in expected if got[name] != expected[name]]
    assert not differing, differing
