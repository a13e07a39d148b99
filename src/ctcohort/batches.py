"""Per-scan steps run for a batch of scans in one job: one process start-up and one set of imports for many
scans, and one cluster job instead of one per scan (a per-scan step takes a fraction of a second; starting
Python with numpy, pandas and nibabel takes about two).

Each scan keeps its own output table and status file: a scan that fails is recorded (or stops the job, with
on_scan_error: fail) exactly as in a job of its own, and the other scans of the batch go on.
"""

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ctcohort.scan_status import ScanStatus, run_scan_step


def in_batches(subjects: Sequence[str], size: int) -> list[list[str]]:
    """Consecutive runs of ``size`` subjects: appending scans to a sheet only touches the last batch."""
    if size < 1:
        raise ValueError(f"scans per job must be at least 1, not {size}")
    return [list(subjects[i : i + size]) for i in range(0, len(subjects), size)]


@dataclass(frozen=True)
class ScanOutputs:
    """One scan's place in a batch: its id, its table and status paths, and the status files of its
    earlier stages, whose failures it passes on."""

    subject: str
    table: str | Path
    status: str | Path
    upstream: Sequence[str | Path] = ()


def batch_outputs(
    subjects: Sequence[str], tables: Sequence, statuses: Sequence, upstream: Sequence = ()
) -> list[ScanOutputs]:
    """``ScanOutputs`` of a batch from the job's parallel lists (``upstream``: one status file per scan, ""
    for a scan without that earlier stage, or none at all)."""
    lists = [subjects, tables, statuses] + ([upstream] if upstream else [])
    if len({len(items) for items in lists}) != 1:
        raise ValueError(f"a batch needs one table and status per scan: {[len(items) for items in lists]}")
    before = [[path] if path else () for path in upstream] if upstream else [()] * len(subjects)
    return [ScanOutputs(*paths, upstream=up) for *paths, up in zip(subjects, tables, statuses, before)]


def run_batch(
    stage: str,
    scans: Sequence[ScanOutputs],
    step: Callable[[int], object],
    write: Callable[[object, str | Path], None],
    empty: Callable[[], object],
    on_error: str = "record",
) -> list[ScanStatus]:
    """For scan i of ``scans``: ``write(step(i), table)``, or ``write(empty(), table)`` where an earlier stage
    or this one failed; each scan's status is written as it finishes."""
    return [
        run_scan_step(
            scan.subject,
            stage,
            scan.status,
            on_error,
            step=lambda i=i, scan=scan: write(step(i), scan.table),
            placeholder=lambda scan=scan: write(empty(), scan.table),
            upstream=scan.upstream,
        )
        for i, scan in enumerate(scans)
    ]
