"""What a scan's source files are, cheaply: reruns decided by content changes, not by modification times alone.

Snakemake reruns a job when an input is newer than its outputs. A CT replaced by another one with an older
modification time (what ``cp -p``, ``rsync -a`` and ``unzip`` do), or DICOM files rewritten inside a folder
whose own time does not change, would leave the old numbers standing. So every per-scan batch rule carries,
as a param, a fingerprint of its scans' source files: for each file its size, modification and status-change
times in nanoseconds and inode number (a copy, a move onto it or a rewrite changes at least one; the
status-change time cannot be set back by a copying tool), over every file of a DICOM folder (below it) or
file list (the list and its files). A changed param reruns the batch (Snakemake's params trigger).

Computed by the main process only (cluster jobs re-parse the workflow; they get ""), one stat call per file.
The fingerprint is a digest: no path or name reaches Snakemake's records or the report.
"""

import hashlib
import os
from collections.abc import Iterable, Mapping

from ctcohort.dicom_import import LIST_SUFFIX, read_file_list

DIGEST_BYTES = 10


def source_files(source: str) -> list[str]:
    """The files that make a source: the file; every file below a folder; a list file and the files it names."""
    if os.path.isdir(source):
        return sorted(os.path.join(folder, name) for folder, _, names in os.walk(source) for name in names)
    if source.endswith(LIST_SUFFIX) and os.path.isfile(source):
        return [source, *(str(path) for path in read_file_list(source))]
    return [source]


def _file_state(path: str) -> str:
    try:
        info = os.stat(path)
    except OSError:
        return f"{path}\0missing"
    return f"{path}\0{info.st_size}\0{info.st_mtime_ns}\0{info.st_ctime_ns}\0{info.st_ino}"


def source_fingerprint(sources: Iterable[str]) -> str:
    """A hex digest of the state of every file of ``sources`` (blank entries skipped)."""
    digest = hashlib.blake2b(digest_size=DIGEST_BYTES)
    for source in sources:
        if source:
            for path in source_files(str(source)):
                digest.update(_file_state(path).encode("utf-8", "surrogateescape") + b"\n")
    return digest.hexdigest()


def batch_fingerprint(subjects: Iterable[str], sources_of: Mapping[str, Iterable[str]]) -> str:
    """One digest over the sources of a batch's scans (``sources_of``: subject -> its source paths)."""
    return source_fingerprint(source for subject in subjects for source in sources_of.get(subject, ()))
