"""Record a per-scan failure instead of stopping the cohort.

A per-scan step runs inside ``recording_failure``: with policy "record" an
exception becomes a status file naming the subject, the stage and the cause,
and the cohort rules list it in failures.tsv; with policy "fail" it propagates
and the job fails as usual.
"""

import json
import logging
import traceback
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

POLICIES = ("record", "fail")
log = logging.getLogger(__name__)


@dataclass
class ScanStatus:
    subject: str
    stage: str
    ok: bool = True
    error: str = ""

    def write(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(asdict(self)) + "\n")


def read_status(path: str | Path) -> ScanStatus:
    return ScanStatus(**json.loads(Path(path).read_text()))


@contextmanager
def recording_failure(subject: str, stage: str, status_path: str | Path, policy: str = "record"):
    """Run a scan's step; on error write a failed status (policy "record") or re-raise ("fail")."""
    if policy not in POLICIES:
        raise ValueError(f"unknown on_scan_error policy {policy!r}; choose one of {', '.join(POLICIES)}")
    status = ScanStatus(subject, stage)
    try:
        yield status
    except Exception as err:
        log.error("%s failed for scan %s:\n%s", stage, subject, traceback.format_exc())
        if policy == "fail":
            raise
        status.ok, status.error = False, f"{type(err).__name__}: {err}"
    status.write(status_path)


def run_scan_step(
    subject: str,
    stage: str,
    status_path: str | Path,
    policy: str,
    step: Callable[[], None],
    placeholder: Callable[[], None],
    upstream: Sequence[str | Path] = (),
) -> ScanStatus:
    """Run one scan's ``step``; if an earlier stage failed, or this one does, write ``placeholder`` outputs.

    An upstream failure is passed on unchanged (its stage and error), so failures.tsv names the
    stage where the scan really failed.
    """
    for path in upstream:
        previous = read_status(path)
        if not previous.ok:
            log.info("scan %s skipped: %s failed earlier (%s)", subject, previous.stage, previous.error)
            previous.write(status_path)
            placeholder()
            return previous
    with recording_failure(subject, stage, status_path, policy) as status:
        step()
    if not status.ok:
        placeholder()
    return status
