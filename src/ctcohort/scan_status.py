"""Record a per-scan failure instead of stopping the cohort.

A per-scan step runs inside ``recording_failure``: with policy "record" an
exception becomes a status file naming the subject, the stage and the cause,
and the cohort rules list it in failures.tsv; with policy "fail" it propagates
and the job fails as usual.

Resource errors (out of memory on the host or the GPU, a full disk) are not a
property of the scan: they always fail the job, which Snakemake can retry
(``--retries``), so that big scans are not excluded from the cohort for the
machine's sake.
"""

import errno
import json
import logging
import traceback
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from ctcohort.imaging import one_line  # a message as one line of failures.tsv

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


RESOURCE_ERRNOS = (errno.ENOMEM, errno.ENOSPC, errno.EDQUOT)


def is_resource_error(err: BaseException) -> bool:
    """Out of memory (host or GPU) or out of disk: the machine's limit, not the scan's fault."""
    if isinstance(err, MemoryError):
        return True
    if isinstance(err, OSError) and err.errno in RESOURCE_ERRNOS:
        return True
    # torch.OutOfMemoryError / torch.cuda.OutOfMemoryError, without importing torch here;
    # older torch raises a RuntimeError whose message says so
    if type(err).__name__ == "OutOfMemoryError":
        return True
    message = str(err).lower()
    return isinstance(err, RuntimeError) and ("out of memory" in message or "can't allocate memory" in message)


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
        if is_resource_error(err):
            log.error(
                "scan %s: %s is a resource error; the job fails so that it can be retried with more "
                "resources, and the scan is not excluded",
                subject,
                type(err).__name__,
            )
            raise
        status.ok, status.error = False, one_line(f"{type(err).__name__}: {err}")
    status.write(status_path)


def passed_on_failure(subject: str, upstream: Sequence[str | Path], status_path: str | Path) -> ScanStatus | None:
    """The failed status of an earlier stage among ``upstream`` (status files; "" stands for none), written
    unchanged to ``status_path``; None where every earlier stage succeeded."""
    for path in upstream:
        previous = read_status(path) if path else None
        if previous is not None and not previous.ok:
            log.info("scan %s skipped: %s failed earlier (%s)", subject, previous.stage, previous.error)
            previous.write(status_path)
            return previous
    return None


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
    previous = passed_on_failure(subject, upstream, status_path)
    if previous is not None:
        placeholder()
        return previous
    with recording_failure(subject, stage, status_path, policy) as status:
        step()
    if not status.ok:
        placeholder()
    return status
