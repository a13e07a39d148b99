"""How long the check for duplicate scans (ctcohort.duplicate_scans) takes before any job, at 10,000 scans.

Writes N small distinct files (distinct sizes where possible, as real NIfTI scans have; with --same-size every
file has the same size, the worst case: every file is read, a few blocks each) plus a few duplicates (byte
copies, symlinks, a '..' path), and a few DICOM folders (one re-exported with renamed files); then times
find_duplicate_scans on the sheet, cold-ish (first call) and again (file metadata cached by the OS), and checks
that exactly the planted duplicates are found.

Run:  python benchmarks/duplicate_check.py [--n 10000] [--same-size] [--workdir DIR]
"""

import argparse
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from ctcohort.duplicate_scans import find_duplicate_scans


def write_cohort(folder: Path, n: int, same_size: bool) -> tuple[pd.DataFrame, int]:
    rng = np.random.default_rng(0)
    scans = folder / "scans"
    scans.mkdir(parents=True)
    rows = []
    for i in range(n):
        size = 4096 if same_size else 4096 + i  # distinct sizes: a NIfTI's compressed size rarely repeats
        path = scans / f"s{i:05d}.nii.gz"
        path.write_bytes(rng.bytes(size))
        rows.append((f"s{i:05d}", str(path)))
    # the planted duplicates: byte copies, a link, a '..' path, a DICOM folder exported twice
    shutil.copy(scans / "s00001.nii.gz", scans / "copy1.nii.gz")
    shutil.copy(scans / "s00002.nii.gz", scans / "copy2.nii.gz")
    (scans / "link3.nii.gz").symlink_to(scans / "s00003.nii.gz")
    for name in ("dicom_a", "dicom_b"):
        (folder / name).mkdir()
    for k in range(20):
        content = rng.bytes(2000)
        (folder / "dicom_a" / f"IM{k:04d}.dcm").write_bytes(content)
        (folder / "dicom_b" / f"{1000 - k:08d}").write_bytes(content)
    rows += [
        ("dup1", str(scans / "copy1.nii.gz")),
        ("dup2", str(scans / "copy2.nii.gz")),
        ("dup3", str(scans / "link3.nii.gz")),
        ("dup4", f"{scans}/../scans/s00004.nii.gz"),
        ("dicom1", str(folder / "dicom_a")),
        ("dicom2", str(folder / "dicom_b")),
    ]
    sheet = pd.DataFrame(rows, columns=["subject", "ct"]).set_index("subject", drop=False)
    return sheet, 5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10_000)
    parser.add_argument("--same-size", action="store_true")
    parser.add_argument("--workdir", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        sheet, planted = write_cohort(Path(tmp), args.n, args.same_size)
        print(
            f"{platform.node()}: {len(sheet)} rows ({args.n} distinct files{', one size' if args.same_size else ''}"
            f" + {planted} duplicates), {os.cpu_count()} CPUs"
        )
        for attempt in ("first call", "second call"):
            start = time.perf_counter()
            groups = find_duplicate_scans(sheet)
            seconds = time.perf_counter() - start
            found = sorted(d.subject for g in groups for d in g.later)
            assert found == ["dicom2", "dup1", "dup2", "dup3", "dup4"], found
            print(f"find_duplicate_scans, {attempt}: {seconds:.3f} s ({len(groups)} groups found)")


if __name__ == "__main__":
    main()
