"""Test helper (not a test module): real but barely trained nnU-Net models from coarse phantom scans.

Test modules import it as ``from tiny_model import ...`` (pytest puts tests/ on sys.path).
"""

from pathlib import Path

from ctcohort.release import write_phantom_release
from ctcohort.train import SmallConfiguration, TrainingSettings, train_from_release

TINY_SPACING = (6.0, 6.0, 8.0)
# The small configuration of the quick tests that train more than one tiny model (whole-image patches).
TINY_NETWORK = SmallConfiguration(patch_voxels=10**8, base_features=8, max_features=32)


def write_test_release(out_dir: str | Path, n: int = 6, seed: int = 3) -> Path:
    """n coarse phantom scans in the release layout, one val case and one test case (for n=6)."""
    return write_phantom_release(out_dir, n, seed, TINY_SPACING, val_fraction=0.2, test_fraction=0.1)


def train_tiny_model(
    out_dir: str | Path,
    n: int = 6,
    seed: int = 7,
    spacing=TINY_SPACING,
    epochs: int = 1,
    iterations: int = 2,
    threads: int = 1,
    dataset_id: int = 999,
    structures: list[str] | None = None,
) -> Path:
    """A real but barely trained nnU-Net model, quickly (well under a minute on 2 cores), for tests.

    Writes ``out_dir/release`` (n coarse phantom scans, one val case), ``out_dir/nnunet`` (nnU-Net's
    folders) and returns ``out_dir/model``, an exported model folder with fold_0/checkpoint_final.pth and
    the small configuration; its labels are the phantom's structures (``structures``: a subset, in order).
    """
    out_dir = Path(out_dir)
    release = write_phantom_release(out_dir / "release", n, seed, spacing, val_fraction=0.2)
    settings = TrainingSettings(dataset_id=dataset_id, name="PhantomTiny", epochs=epochs, iterations=iterations)
    return train_from_release(
        release, out_dir / "model", out_dir / "nnunet", settings, threads=threads, structures=structures, validate=False
    )
