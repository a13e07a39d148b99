"""Training data in the TotalSegmentator release layout, and its conversion into an nnU-Net raw dataset.

A release folder holds ``<subject>/ct.nii.gz``, ``<subject>/segmentations/<structure>.nii.gz`` (one binary
mask per structure, empty where the subject lacks it) and ``meta.csv`` (``;``-separated, with ``image_id``
and ``split``: train/val/test). ``write_phantom_release`` writes one from the phantom; ``release_to_nnunet_raw``
turns one into ``DatasetXXX_<name>`` with imagesTr/labelsTr/imagesTs/labelsTs, ``dataset.json`` and the
release's train/val split (``splits_final.json``), which ``ctcohort.train`` then plans and trains on.

Nothing here needs nnU-Net or torch: the raw dataset is files in nnU-Net's documented layout.
"""

import json
import logging
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

from ctcohort import phantom
from ctcohort.imaging import ct_hounsfield, load_image, seg_on_ct_grid
from ctcohort.parallel import map_processes
from ctcohort.structures import load_structure_table

LOG = logging.getLogger(__name__)

META_FILE = "meta.csv"
META_SEPARATOR = ";"  # the TotalSegmentator release writes semicolon-separated meta.csv
SPLITS = ("train", "val", "test")
# Phantom subjects for training are drawn at indices from here on, so that they never coincide with the
# demo cohort's subjects (indices 0..n-1) even when the same seed is passed: the demo cohort stays unseen.
RELEASE_INDEX_OFFSET = 1_000_000
SPLIT_STREAM = 0x5EED  # third element of the split generator's seed, apart from the subjects' streams
FILE_ENDING = ".nii.gz"
RELEASE_SPLITS_FILE = "splits_final.json"  # in the raw dataset folder; nnU-Net's planner copies it too


# ---------------------------------------------------------------------------------------------------------
# 1. A phantom release
# ---------------------------------------------------------------------------------------------------------


def release_subject_id(index: int) -> str:
    """Subject names like the release's (s0000, s0001, ...), distinct from the demo cohort's demoNNN."""
    return f"s{index:04d}"


def assign_splits(n: int, seed: int, val_fraction: float = 0.2, test_fraction: float = 0.0) -> list[str]:
    """train/val/test for n subjects: exact counts (at least one where a fraction is > 0), seeded order."""
    if not 0 <= val_fraction < 1 or not 0 <= test_fraction < 1 or val_fraction + test_fraction >= 1:
        raise ValueError(f"val_fraction {val_fraction} and test_fraction {test_fraction} must leave training cases")
    n_val = max(1, round(n * val_fraction)) if val_fraction > 0 else 0
    n_test = max(1, round(n * test_fraction)) if test_fraction > 0 else 0
    if n - n_val - n_test < 1:
        raise ValueError(f"{n} subjects are too few for {n_val} validation and {n_test} test case(s)")
    splits = np.array(["train"] * n, dtype=object)
    order = np.random.default_rng([seed, SPLIT_STREAM]).permutation(n)
    splits[order[:n_val]] = "val"
    splits[order[n_val : n_val + n_test]] = "test"
    return splits.tolist()


def _save_nifti(array: np.ndarray, affine: np.ndarray, path: Path) -> None:
    img = nib.Nifti1Image(array, affine)
    img.header.set_xyzt_units("mm", "sec")
    nib.save(img, path)


def write_release_subject(out_dir: Path, subject: str, draw: phantom.SubjectDraw, spacing) -> None:
    """ct.nii.gz and one binary mask per phantom structure, as the release stores a subject.

    Every structure gets a mask file, empty where the subject lacks it (removed gallbladder, cropped field
    of view), as in the release: a missing file would be ambiguous.
    """
    ct, labels, affine = phantom.render_subject(draw, spacing)
    table = load_structure_table("total_v1").set_index("name")
    seg_dir = out_dir / subject / "segmentations"
    seg_dir.mkdir(parents=True, exist_ok=True)
    _save_nifti(ct, affine, out_dir / subject / "ct.nii.gz")
    for structure in phantom.ANATOMY:
        mask = (labels == table.at[structure.name, "label"]).astype(np.uint8)
        _save_nifti(mask, affine, seg_dir / f"{structure.name}.nii.gz")


def write_phantom_release(
    out_dir: str | Path,
    n: int,
    seed: int,
    spacing=phantom.DEFAULT_SPACING,
    val_fraction: float = 0.2,
    test_fraction: float = 0.0,
    processes: int = 1,
) -> Path:
    """n phantom scans in the TotalSegmentator release layout under out_dir; returns out_dir.

    ``out_dir/<subject>/ct.nii.gz``, ``out_dir/<subject>/segmentations/<v1 name>.nii.gz`` and
    ``out_dir/meta.csv`` (image_id;age;gender;split). Subjects are drawn from the phantom at indices
    ``RELEASE_INDEX_OFFSET + i``, so a training release never contains a demo-cohort scan; still, pass a
    seed other than the demo cohort's. ``processes``: subjects written in parallel.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    splits = assign_splits(n, seed, val_fraction, test_fraction)
    subjects = [release_subject_id(index) for index in range(n)]
    draws = [phantom.draw_subject(seed, RELEASE_INDEX_OFFSET + index) for index in range(n)]
    map_processes(write_release_subject, [out_dir] * n, subjects, draws, [spacing] * n, processes=processes)
    rows = [(subject, draw.age, draw.sex.lower(), split) for subject, draw, split in zip(subjects, draws, splits)]
    meta = pd.DataFrame(rows, columns=["image_id", "age", "gender", "split"])
    meta.to_csv(out_dir / META_FILE, sep=META_SEPARATOR, index=False)
    LOG.info(
        "phantom release: %d subjects (%s) in %s",
        n,
        ", ".join(f"{(meta['split'] == s).sum()} {s}" for s in SPLITS),
        out_dir,
    )
    return out_dir


# ---------------------------------------------------------------------------------------------------------
# 2. Release -> nnU-Net raw dataset
# ---------------------------------------------------------------------------------------------------------


def dataset_folder_name(dataset_id: int, dataset_name: str) -> str:
    if not 1 <= dataset_id <= 999:
        raise ValueError(f"nnU-Net dataset ids have three digits (1..999), got {dataset_id}")
    return f"Dataset{dataset_id:03d}_{dataset_name}"


def read_release_meta(release_dir: str | Path) -> pd.DataFrame:
    """meta.csv of a release: image_id and split (train/val/test) checked; other columns kept."""
    path = Path(release_dir) / META_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no {META_FILE} in the release folder {release_dir}")
    meta = pd.read_csv(path, sep=META_SEPARATOR, dtype={"image_id": str})
    missing = {"image_id", "split"} - set(meta.columns)
    if missing:
        raise ValueError(f"{path}: missing column(s) {sorted(missing)} (is it ';'-separated?)")
    meta["split"] = meta["split"].astype(str).str.strip().str.lower()
    unknown = sorted(set(meta["split"]) - set(SPLITS))
    if unknown:
        raise ValueError(f"{path}: unknown split value(s) {unknown}; expected {', '.join(SPLITS)}")
    dupes = meta["image_id"][meta["image_id"].duplicated()].tolist()
    if dupes:
        raise ValueError(f"{path}: duplicate image_id {dupes}")
    return meta


def default_structures(release_dir: str | Path, subject: str) -> list[str]:
    """Structures with a mask in ``subject``, in v1 label order; names the v1 table lacks follow, sorted."""
    seg_dir = Path(release_dir) / subject / "segmentations"
    names = sorted(p.name[: -len(FILE_ENDING)] for p in seg_dir.glob(f"*{FILE_ENDING}"))
    if not names:
        raise FileNotFoundError(f"no masks ({FILE_ENDING}) in {seg_dir}")
    table = load_structure_table("total_v1")
    v1_label = dict(zip(table["name"], table["label"]))
    return sorted(names, key=lambda name: (name not in v1_label, v1_label.get(name, 0), name))


def merge_masks(release_dir: Path, subject: str, structures: list[str], ct: nib.Nifti1Image) -> np.ndarray:
    """One label map (1..K in ``structures`` order) from a subject's binary masks, on the CT's grid.

    Where masks overlap, the structure later in the list wins: nnU-Net trains one label per voxel, and the
    release's masks overlap only along a few boundary voxels.
    """
    if len(structures) > np.iinfo(np.uint16).max:
        raise ValueError(f"{len(structures)} structures are too many for a label map")
    labels = np.zeros(ct.shape, np.uint8 if len(structures) <= 255 else np.uint16)
    for k, name in enumerate(structures, start=1):
        path = release_dir / subject / "segmentations" / f"{name}{FILE_ENDING}"
        if not path.is_file():
            # absent structures have empty masks in the release; a missing file is a broken subject
            raise FileNotFoundError(f"subject {subject}: no mask for structure {name!r} ({path})")
        mask = seg_on_ct_grid(load_image(path), ct, source=f"subject {subject}, mask {path.name}")
        labels[mask > 0] = k
    return labels


def canonical_case(ct: nib.Nifti1Image, labels: np.ndarray) -> tuple[nib.Nifti1Image, np.ndarray]:
    """CT and labels in the closest canonical (RAS) orientation, the way ctcohort.segment feeds nnU-Net.

    Training and inference must see the voxel axes in the same order; a permutation and flips, exact.
    """
    orientation = nib.orientations.io_orientation(ct.affine)
    if np.array_equal(orientation, nib.orientations.axcodes2ornt("RAS")):
        return ct, labels
    hu = nib.orientations.apply_orientation(ct_hounsfield(ct), orientation)
    affine = ct.affine @ nib.orientations.inv_ornt_aff(orientation, ct.shape)
    canonical = nib.Nifti1Image(np.ascontiguousarray(hu), affine)
    canonical.header.set_xyzt_units("mm", "sec")
    return canonical, np.ascontiguousarray(nib.orientations.apply_orientation(labels, orientation))


def _label_image(labels: np.ndarray, ct: nib.Nifti1Image) -> nib.Nifti1Image:
    """The label map with the CT's header geometry (sform and qform), so readers see the same grid."""
    header = ct.header.copy()
    header.set_data_dtype(labels.dtype)
    img = nib.Nifti1Image(labels, ct.affine, header)
    img.header.set_slope_inter(1.0, 0.0)
    return img


def _case_files(dataset_dir: Path, case: str, split: str) -> tuple[Path, Path]:
    images, targets = ("imagesTs", "labelsTs") if split == "test" else ("imagesTr", "labelsTr")
    return dataset_dir / images / f"{case}_0000{FILE_ENDING}", dataset_dir / targets / f"{case}{FILE_ENDING}"


def _convert_case(release_dir: Path, subject: str, split: str, structures: list[str], dataset_dir: Path) -> None:
    ct = load_image(release_dir / subject / "ct.nii.gz")
    labels = merge_masks(release_dir, subject, structures, ct)
    image_file, label_file = _case_files(dataset_dir, subject, split)
    ct, labels = canonical_case(ct, labels)
    nib.save(ct, image_file)
    nib.save(_label_image(labels, ct), label_file)


def release_to_nnunet_raw(
    release_dir: str | Path,
    raw_root: str | Path,
    dataset_id: int,
    dataset_name: str,
    structures: list[str] | None = None,
    processes: int = 1,
) -> Path:
    """Convert a release into the nnU-Net raw dataset ``raw_root/DatasetXXX_<name>``; returns its folder.

    train and val subjects go to imagesTr/labelsTr (case id = image_id), test subjects to
    imagesTs/labelsTs, which nnU-Net never trains on. Labels are 1..K in the order of ``structures``
    (default: ``default_structures`` of the first subject). ``splits_final.json`` holds one fold, the
    release's train/val; ``train`` makes it nnU-Net's fold 0. ``processes``: cases converted in parallel.
    """
    release_dir = Path(release_dir)
    meta = read_release_meta(release_dir)
    if meta.empty:
        raise ValueError(f"{release_dir / META_FILE} lists no subjects")
    structures = (
        list(structures) if structures is not None else default_structures(release_dir, meta["image_id"].iloc[0])
    )
    if len(set(structures)) != len(structures):
        raise ValueError("structures: duplicate names")
    dataset_dir = Path(raw_root) / dataset_folder_name(dataset_id, dataset_name)
    for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
        # a rerun must not leave cases of an earlier release behind
        shutil.rmtree(dataset_dir / sub, ignore_errors=True)
        (dataset_dir / sub).mkdir(parents=True)

    n = len(meta)
    arguments = ([release_dir] * n, meta["image_id"], meta["split"], [structures] * n, [dataset_dir] * n)
    map_processes(_convert_case, *arguments, processes=processes)

    trained = meta[meta["split"] != "test"]
    dataset_json = {
        "channel_names": {"0": "CT"},
        "labels": {"background": 0, **{name: k for k, name in enumerate(structures, start=1)}},
        "numTraining": int(len(trained)),
        "file_ending": FILE_ENDING,
        "name": dataset_name,
        "description": f"converted from the release {release_dir.name} by ctcohort",
    }
    (dataset_dir / "dataset.json").write_text(json.dumps(dataset_json, indent=2))
    splits = [
        {
            "train": trained["image_id"][trained["split"] == "train"].tolist(),
            "val": trained["image_id"][trained["split"] == "val"].tolist(),
        }
    ]
    (dataset_dir / RELEASE_SPLITS_FILE).write_text(json.dumps(splits, indent=2))
    LOG.info(
        "nnU-Net raw dataset %s: %d training, %d validation, %d test cases, %d structures",
        dataset_dir,
        len(splits[0]["train"]),
        len(splits[0]["val"]),
        len(meta) - len(trained),
        len(structures),
    )
    return dataset_dir
