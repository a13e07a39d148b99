"""ctcohort: CT cohort segmentation, measurement and age-correlation statistics."""

__version__ = "0.1.0"
