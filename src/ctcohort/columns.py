"""The names of the tables' columns, the exclusion reasons, and what a cohort sheet's path names.

The lowest module of the package: it imports nothing of ctcohort, so every module can use these names
without importing the module that builds the table (measure.py imports qc.py, and qc.py needs the HU
columns).
"""

from __future__ import annotations

from pathlib import Path

MEASURE_COLUMNS = [
    "structure",
    "label",
    "group",
    "n_voxels",
    "volume_ml",
    "hu_mean",
    "hu_median",
    "hu_std",
    "hu_mean_eroded",
    "complete",
    "exclusion_reason",
]
HU_COLUMNS = ["hu_mean", "hu_median", "hu_std", "hu_mean_eroded"]
# which model segmented the structure, in a study of several models (study_models.py); not "model", the
# scanner's model name of a sheet written by ctcohort sheet
MODEL_COLUMN = "segmentation_model"
# Every exclusion_reason, in order of precedence: a structure gets the first that applies. The two
# implausible_* reasons are given where the cohort is joined (qc.apply_plausibility), not per scan;
# implausible_hu comes before cut_off for the reason hu_nonfinite does (cut_off says the HU is usable).
# A reviewer's exclusion (review.apply_review_decisions) overrides every other reason.
REVIEWER_EXCLUDED = "reviewer_excluded"
EXCLUSION_REASONS = (
    "absent",
    "too_small",
    "hu_nonfinite",
    "implausible_hu",
    "cut_off",
    "implausible_volume",
    REVIEWER_EXCLUDED,
)
# The reasons measure_structures gives
SCAN_EXCLUSION_REASONS = ("absent", "too_small", "hu_nonfinite", "cut_off")

# per structure: where it lies (centre of mass, RAS+ mm), the volume of its second-largest connected piece
# (structures of qc.ONE_PIECE only), and the scan's sform-qform disagreement (mm; NaN where they agree)
GEOMETRY_COLUMNS = ["centroid_x_mm", "centroid_y_mm", "centroid_z_mm", "second_piece_ml"]
QC_COLUMNS = [
    "structure",
    "label",
    "cut_faces",
    "cranial_vertebra",
    "caudal_vertebra",
    *GEOMETRY_COLUMNS,
    "sform_qform_mm",
]

NIFTI_SUFFIXES = (".nii", ".nii.gz")


def is_nifti(path: str | Path) -> bool:
    """Whether a cohort sheet's path names a NIfTI file (else a ct names a DICOM series)."""
    return str(path).lower().endswith(NIFTI_SUFFIXES)
