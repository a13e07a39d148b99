"""Where the project's resources (structure tables, bundled models) live."""

import os
from pathlib import Path


def resources_dir() -> Path:
    """The resources/ folder of the checkout, or $CTCOHORT_RESOURCES where set."""
    override = os.environ.get("CTCOHORT_RESOURCES")
    path = Path(override) if override else Path(__file__).resolve().parents[2] / "resources"
    if not path.is_dir():
        raise FileNotFoundError(
            f"ctcohort resources folder not found at {path}: install ctcohort from its checkout "
            "(pip install -e .) or set CTCOHORT_RESOURCES to the checkout's resources/ folder"
        )
    return path
