"""Rows of a cohort sheet that are the same scan: found before any job, so that one scan does not enter the
statistics as two subjects.

Two rows are the same scan when their ``ct``

- is the same file (or, for a DICOM series given as a folder, the same folder) once links and ``..`` are
  resolved (``os.path.realpath``): reason ``same file``; or
- has identical content (a study exported twice, a copy under another name): reason ``identical content``.
  A NIfTI file, a zip or a single DICOM file is compared byte for byte; a DICOM series given as a folder
  (searched recursively) or a ``.txt`` file list is compared as the multiset of its files' contents, so a
  re-export that renamed or re-sorted the files is still the same series (a folder and a list naming the
  same files are too). Sources without a byte of content (an empty folder) are never called identical.

Cost: one ``os.stat`` per file (one per NIfTI scan; one per file of a DICOM folder, plus the directory
listing) and nothing else while no two sources have the same size (the same multiset of file sizes for a
series). Only sources whose sizes collide are read: first a few blocks of each file (start, middle and end,
64 KiB each), and only where those collide too, the whole files (BLAKE2b, streamed in 1 MiB chunks). Each
file is read at most once per stage, however many rows name it. ``benchmarks/duplicate_check.py``: 10,000
distinct small files plus 5 duplicates on a local disk (2 CPUs) take 0.1 s; all 10,000 of one size (every file's
blocks read) 0.2 s. Real DICOM folders cost one stat per slice file (a 500-slice series: 500 stats). The
imports of DICOM series are compared once more when the cohort is joined (``identical_images``: headers of every
import, voxels only where headers agree), since two exports of one series with other headers differ in bytes.
"""

import hashlib
import os
import stat
from collections import defaultdict
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from ctcohort.dicom_import import LIST_SUFFIX, is_dicom_source, read_file_list
from ctcohort.tables import BLANK, NOTHING_MISSING, read_tsv, write_tsv

SAME_FILE = "same file"
IDENTICAL_CONTENT = "identical content"
IDENTICAL_IMAGE = "identical voxels and geometry after import"
STAGE = "duplicate"  # the stage of a dropped row in failures.tsv
TABLE_COLUMNS = ["subject", "duplicate_of", "reason"]
BLOCK_BYTES = 64 * 1024
CHUNK_BYTES = 1024 * 1024


@dataclass(frozen=True)
class Duplicate:
    """A later row of the sheet that is the same scan as an earlier one."""

    subject: str
    path: str
    duplicate_of: str
    reason: str  # SAME_FILE or IDENTICAL_CONTENT


@dataclass(frozen=True)
class DuplicateGroup:
    """Rows that are one scan: the first in sheet order, and the later ones."""

    first: str
    path: str
    later: tuple[Duplicate, ...]


def _realpath(path: str, folders: dict[str, str]) -> tuple[str, os.stat_result | None]:
    """``os.path.realpath(path)`` and the stat of what it names (None where it does not exist), with one
    ``lstat`` per path: the real paths of folders are cached (``os.path.realpath`` itself costs an ``lstat``
    per component of every path, most of the check's time at 10,000 scans)."""
    path = os.path.abspath(path)
    head, tail = os.path.split(path)
    if head not in folders:
        folders[head] = os.path.realpath(head)
    joined = os.path.join(folders[head], tail) if tail else folders[head]
    try:
        info = os.lstat(joined)
        if stat.S_ISLNK(info.st_mode):
            joined = os.path.realpath(joined)
            info = os.stat(joined)
    except OSError:
        return os.path.realpath(path), None
    return joined, info


def _files_of(source: str, info: os.stat_result, folders: dict[str, str], given: str) -> list[tuple[str, int]] | None:
    """(real path, size) of the files whose contents make up the source (its real path and stat; ``given``: the
    path as the sheet gives it, whose folder a list file's relative paths are relative to); None where it
    cannot be read."""
    try:
        if stat.S_ISDIR(info.st_mode):
            found = []
            for folder, _folders, names in os.walk(source):
                for name in names:
                    path, file_info = _realpath(os.path.join(folder, name), folders)
                    if file_info is not None and stat.S_ISREG(file_info.st_mode):
                        found.append((path, file_info.st_size))
            return found
        if is_dicom_source(source) and source.lower().endswith(LIST_SUFFIX):
            found = [_realpath(str(path), folders) for path in read_file_list(os.path.abspath(given))]
            if any(file_info is None or not stat.S_ISREG(file_info.st_mode) for _, file_info in found):
                return None
            return [(path, file_info.st_size) for path, file_info in found]
        return [(source, info.st_size)] if stat.S_ISREG(info.st_mode) else None
    except (OSError, UnicodeDecodeError):
        return None


def _block_hash(path: str, size: int) -> bytes:
    """A hash of the first, middle and last block of the file (the whole file where it is small)."""
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as stream:
        if size <= 3 * BLOCK_BYTES:
            digest.update(stream.read())
        else:
            for offset in (0, size // 2 - BLOCK_BYTES // 2, size - BLOCK_BYTES):
                stream.seek(offset)
                digest.update(stream.read(BLOCK_BYTES))
    return digest.digest()


def _full_hash(path: str, size: int) -> bytes:
    digest = hashlib.blake2b(digest_size=32)
    with open(path, "rb") as stream:
        while chunk := stream.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.digest()


def _refine(
    groups: list[list[int]], files: dict[int, list[tuple[str, int]]], file_key: Callable[[str, int], bytes]
) -> list[list[int]]:
    """Split each group of sources by the multiset of ``file_key`` of their files; keep groups of 2 or more."""
    cache: dict[str, bytes | None] = {}

    def key(path: str, size: int) -> bytes | None:
        if path not in cache:
            try:
                cache[path] = file_key(path, size)
            except OSError:
                cache[path] = None
        return cache[path]

    refined = []
    for group in groups:
        by_key: dict[Hashable, list[int]] = defaultdict(list)
        for i in group:
            keys = [(size, key(path, size)) for path, size in files[i]]
            if any(k is None for _, k in keys):
                continue  # unreadable: never called a duplicate
            by_key[tuple(sorted(keys))].append(i)
        refined += [members for members in by_key.values() if len(members) > 1]
    return refined


def find_duplicate_scans(sheet: pd.DataFrame, column: str = "ct") -> list[DuplicateGroup]:
    """Groups of rows of ``sheet`` (indexed by subject, ``column`` holding resolved paths) that are the same
    scan, in sheet order: each group's first row and its later ones (see the module docstring)."""
    subjects = [str(s) for s in sheet.index]
    sources = [str(p) for p in sheet[column]]
    n = len(sources)
    parent = list(range(n))  # union-find over rows; the root is the group's first row

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    def join(i: int, j: int) -> None:
        a, b = root(i), root(j)
        if a != b:
            parent[max(a, b)] = min(a, b)

    # (a) the same file or folder
    folders: dict[str, str] = {}
    real, infos = zip(*(_realpath(source, folders) for source in sources)) if sources else ((), ())
    first_of: dict[str, int] = {}
    for i, path in enumerate(real):
        if path in first_of:
            join(first_of[path], i)
        else:
            first_of[path] = i

    # (b) identical content, over one row per distinct real path: sizes, then blocks, then full hashes
    files = {}
    by_sizes: dict[tuple[int, ...], list[int]] = defaultdict(list)
    for i in first_of.values():
        found = _files_of(real[i], infos[i], folders, sources[i]) if infos[i] is not None else None
        if not found or not any(size for _, size in found):
            continue
        files[i] = found
        by_sizes[tuple(sorted(size for _, size in found))].append(i)
    candidates = [group for group in by_sizes.values() if len(group) > 1]
    if candidates:
        candidates = _refine(candidates, files, _block_hash)
    if candidates:
        candidates = _refine(candidates, files, _full_hash)
    for group in candidates:
        for i in group[1:]:
            join(group[0], i)

    members: dict[int, list[int]] = defaultdict(list)
    for i in range(n):
        members[root(i)].append(i)
    groups = []
    for first, rows in sorted(members.items()):
        if len(rows) < 2:
            continue
        reason = [SAME_FILE if real[i] == real[first] else IDENTICAL_CONTENT for i in rows[1:]]
        later = tuple(Duplicate(subjects[i], sources[i], subjects[first], why) for i, why in zip(rows[1:], reason))
        groups.append(DuplicateGroup(subjects[first], sources[first], later))
    return groups


def identical_images(cts: Mapping[str, str | Path], sources: Mapping[str, str] | None = None) -> list[DuplicateGroup]:
    """Groups of ``cts`` (subject -> NIfTI, in sheet order; the imports of DICOM series, results/ct/) with
    identical voxels and geometry: one series exported twice with other headers, which the file check before
    the run cannot see. Headers first (shape, data type, scaling, affine); only images whose headers agree
    are read and hashed (BLAKE2b of the voxel bytes). An unreadable image is never a duplicate. ``sources``:
    the path each group names (the sheet's ct), the NIfTI's where not given."""
    import nibabel as nib
    import numpy as np

    def header_key(path):
        img = nib.load(path)
        header = img.header
        return (
            header.get_data_shape(),
            str(header.get_data_dtype()),
            str(header.get_slope_inter()),
            np.asarray(img.affine, dtype=np.float64).tobytes(),
        )

    def voxel_key(path):
        img = nib.load(path)
        digest = hashlib.blake2b(np.ascontiguousarray(np.asanyarray(img.dataobj)).tobytes(), digest_size=32)
        digest.update(np.asarray(img.affine, dtype=np.float64).tobytes())
        return digest.digest()

    subjects = list(cts)
    groups: list[list[str]] = [subjects]
    for key_of in (header_key, voxel_key):
        refined = []
        for group in groups:
            by_key: dict[Hashable, list[str]] = defaultdict(list)
            for subject in group:
                try:
                    by_key[key_of(cts[subject])].append(subject)
                except Exception:  # noqa: BLE001 - an unreadable image (a failed import) is no duplicate
                    continue
            refined += [members for members in by_key.values() if len(members) > 1]
        groups = refined
    sources = sources or {}
    found = []
    for members in sorted(groups, key=lambda m: subjects.index(m[0])):
        first = members[0]
        later = tuple(Duplicate(s, str(sources.get(s, cts[s])), first, IDENTICAL_IMAGE) for s in members[1:])
        found.append(DuplicateGroup(first, str(sources.get(first, cts[first])), later))
    return found


def duplicates_table(groups: Sequence[DuplicateGroup]) -> pd.DataFrame:
    """subject, duplicate_of, reason of every later row (the rows ``drop_later`` removes), in sheet order."""
    rows = [(d.subject, d.duplicate_of, d.reason) for g in groups for d in g.later]
    return pd.DataFrame(rows, columns=TABLE_COLUMNS)


def dropped_subjects(groups: Sequence[DuplicateGroup]) -> list[str]:
    return [d.subject for g in groups for d in g.later]


def duplicates_message(
    groups: Sequence[DuplicateGroup],
    sheet_path: str | Path,
    lines: dict[str, int] | None = None,
    after_import: bool = False,
) -> str:
    """The error for ``duplicates: error``: every row involved (line, subject, file, why) and what to do.
    ``after_import``: the groups are ``identical_images``' (found when the cohort is joined, after the jobs)."""
    lines = lines or {}

    def where(subject: str) -> str:
        return f"line {lines[subject]} (subject {subject!r})" if subject in lines else f"subject {subject!r}"

    n_later = sum(len(g.later) for g in groups)
    if after_import:
        parts = [
            f"cohort sheet {sheet_path}: {n_later} row(s) hold the same image as an earlier row once imported "
            "(identical voxels and geometry), the cohort tables were not written:"
        ]
    else:
        parts = [
            f"cohort sheet {sheet_path}: {n_later} row(s) name a scan that an earlier row names already, "
            "nothing was run:"
        ]
    for group in groups:
        parts.append(f"  {where(group.first)}: {group.path}")
        parts += [f"    same scan: {where(d.subject)}: {d.path} ({d.reason})" for d in group.later]
    parts.append(
        "Remove the later rows from the sheet (or give them their own scans), or set duplicates: "
        "drop_later in the config to keep the first row of each group and list the others in "
        "results/tables/failures.tsv (stage duplicate)."
    )
    return "\n".join(parts)


def sheet_lines(sheet_path: str | Path) -> dict[str, int]:
    """subject -> line of the sheet as an editor shows it (for messages); {} where the sheet cannot be read."""
    from ctcohort.sheet import _read_tsv  # the reader whose line numbers the sheet's own errors use

    try:
        header, records = _read_tsv(Path(sheet_path))
    except Exception:  # noqa: BLE001 - a message detail only; the sheet was loaded before
        return {}
    if "subject" not in header:
        return {}
    column = header.index("subject")
    return {cells[column]: line for line, cells in records if len(cells) > column}


def write_table_if_changed(table: pd.DataFrame, path: str | Path) -> bool:
    """Write ``table`` (TSV) unless the file holds exactly that already: an unchanged file keeps its time, so
    the rule that reads it is not run again. Whether it was written."""
    path = Path(path)
    text = write_tsv(table, None, missing=BLANK)
    if path.is_file() and path.read_text(encoding="utf-8") == text:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text, encoding="utf-8")
    partial.replace(path)
    return True


def read_duplicates(path: str | Path) -> pd.DataFrame:
    return read_tsv(path, NOTHING_MISSING, dtype=str)[TABLE_COLUMNS]


def duplicate_failures(table: pd.DataFrame) -> pd.DataFrame:
    """The rows of ``duplicates_table`` as failures.tsv rows: stage ``duplicate``, error
    ``duplicate_of:<first subject> (<reason>)``."""
    return pd.DataFrame(
        {
            "subject": table["subject"].astype(str),
            "stage": STAGE,
            "error": [
                f"duplicate_of:{first} ({reason})" for first, reason in zip(table["duplicate_of"], table["reason"])
            ],
        },
        columns=["subject", "stage", "error"],
    )


def failures_with_duplicates(
    failures: pd.DataFrame,
    dropped_tables: Sequence[str | Path],
    imported: Sequence[str | Path],
    sheet: pd.DataFrame,
    sheet_path: str | Path,
    mode: str,
) -> tuple[pd.DataFrame, int]:
    """The cohort's failures with its duplicates added (stage ``duplicate``), and how many sheet rows were
    dropped before any job. ``dropped_tables``: the table the main process wrote (drop_later), or none.
    ``imported``: the imported CTs (results/ct/{subject}.nii.gz); those of scans that did not fail are
    compared (``identical_images``: one series exported twice with other headers is one image), and with
    ``mode`` error a match stops here with ``duplicates_message``; with drop_later the later ones fail."""
    dropped = [duplicate_failures(read_duplicates(path)) for path in dropped_tables]
    failed = set(failures["subject"])
    cts = {Path(path).name.removesuffix(".nii.gz"): path for path in imported}
    same_image = identical_images({s: p for s, p in cts.items() if s not in failed}, sheet["ct"].to_dict())
    if same_image and mode == "error":
        raise ValueError(duplicates_message(same_image, sheet_path, sheet_lines(sheet_path), after_import=True))
    frames = [frame for frame in (failures, *dropped, duplicate_failures(duplicates_table(same_image))) if len(frame)]
    combined = pd.concat(frames, ignore_index=True) if frames else failures
    return combined, sum(len(frame) for frame in dropped)
