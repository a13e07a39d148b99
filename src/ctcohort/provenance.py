"""Software versions behind a run, for the report."""

import platform
import sys
from importlib import metadata

import pandas as pd

PACKAGES = (
    "ctcohort",
    "snakemake",
    "numpy",
    "scipy",
    "pandas",
    "statsmodels",
    "scikit-learn",
    "nibabel",
    "matplotlib",
    "pyarrow",
    "jsonschema",
    "pydicom",
    "dcm2niix",
    "torch",
    "nnunetv2",
    # the contrast phase classifier (ctcohort.contrast_phase)
    "totalsegmentator",
    "xgboost-cpu",
)


def software_versions(packages=PACKAGES) -> pd.DataFrame:
    # the operating system and processor kind, not the kernel build string (the report is shared widely)
    rows = [("python", sys.version.split()[0]), ("platform", f"{platform.system()} {platform.machine()}")]
    for name in packages:
        try:
            rows.append((name, metadata.version(name)))
        except metadata.PackageNotFoundError:
            rows.append((name, "not installed"))
    return pd.DataFrame(rows, columns=["software", "version"])
