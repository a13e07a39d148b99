"""Synthetic CT cohort with planted age effects: the demo study and the test data.

Each subject is a torso-shaped CT (air, a body of fat, structures as
ellipsoids and tubes with their own HU), blurred for partial volume, with
noise, stored as int16 HU; its label map uses the paper's v1 label ids.
Age, sex and contrast change volumes and attenuation as the anatomy table
says; structures with no age effect are the null controls. A few scans have a
field of view that cuts a structure off, and some lack the gallbladder.
The tube voltage (``kvp``, 100 or 120) is commoner low in younger subjects and moves fat and muscle HU
(KVP_HU_EFFECT): the iliopsoas, with no age effect on its HU, looks younger-is-denser through kVp alone, the
confounding that results/stats/sensitivity_acquisition.tsv should find.
Accelerated agers (a fifth of the subjects, ``accelerated``) have every age effect of a subject
ACCELERATED_YEARS older: the gap that CT age should find (subject_truth, truth_subjects.tsv).

Everything is drawn from numpy generators seeded by (seed, subject index), so a
subject's covariates are known without rendering its scan and a cohort grows
without changing its first subjects.
"""

from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
from scipy import ndimage

from ctcohort.parallel import map_processes
from ctcohort.structures import load_structure_table
from ctcohort.tables import BLANK, write_tsv

REFERENCE_AGE = 55.0
DEFAULT_SPACING = (2.5, 2.5, 4.0)
# Field of view in RAS+ millimetres: x (left->right), y (posterior->anterior), z (inferior->superior); symmetric
# in x, so the grid's x-mirror is the voxel array flipped along its first axis.
FIELD_OF_VIEW = ((-190.0, 190.0), (-140.0, 140.0), (-270.0, 260.0))
BODY_SEMI_AXES = (185.0, 135.0)
AIR_HU, FAT_HU, NOISE_HU = -1000.0, -90.0, 12.0
# Largest volume factor a structure reaches (age + ACCELERATED_YEARS, sex, contrast and noise at their extremes);
# the anatomy is laid out so that no two structures overlap even then.
MAX_VOLUME_FACTOR = 1.8


@dataclass(frozen=True)
class Structure:
    """One phantom structure: shape, baseline attenuation and planted effects.

    ``volume_per_decade``: relative volume change per decade of age;
    ``hu_per_decade``: HU change per decade; the signs follow the paper.
    """

    name: str
    shape: str  # "ellipsoid": (centre, semi-axes); "tube": (start, end, (radius,))
    geometry: tuple
    hu: float
    volume_per_decade: float = 0.0
    hu_per_decade: float = 0.0
    hu_contrast: float = 0.0  # HU added in contrast-enhanced scans
    hu_subject_sd: float = 6.0
    # HU added per squared decade away from REFERENCE_AGE: a curved (non-linear) trajectory, negative
    # for a peak at REFERENCE_AGE; it has no monotone trend over the phantom's ages (18-95)
    hu_per_decade_squared: float = 0.0


def _pair(name, shape, geometry, **kwargs):
    """Left and right copies of a structure; ``name`` gets _left/_right. ``geometry`` is the right one's, on the
    subject's right (RAS+: x > 0); the left one is its x-mirror."""

    def mirrored(point):
        return (-point[0], *point[1:])

    if shape == "ellipsoid":
        right_geometry = geometry
        left_geometry = (mirrored(geometry[0]), geometry[1])
    else:
        right_geometry = geometry
        left_geometry = (mirrored(geometry[0]), mirrored(geometry[1]), geometry[2])
    return [
        Structure(f"{name}_left", shape, left_geometry, **kwargs),
        Structure(f"{name}_right", shape, right_geometry, **kwargs),
    ]


# Effects are stronger than the paper's so that a demo of ~80 scans finds them
# under Bonferroni at P < .0001; directions are the paper's.
ANATOMY: tuple[Structure, ...] = (
    *_pair("lung_lower_lobe", "ellipsoid", ((95, -5, 140), (44, 50, 50)), hu=-840, hu_subject_sd=15),
    *_pair("clavicula", "tube", ((32, 50, 218), (130, 25, 226), (8,)), hu=420, hu_per_decade=-30, hu_subject_sd=25),
    Structure("aorta", "tube", ((-25, 8, -95), (-25, 8, 186), (11,)), hu=45, volume_per_decade=0.07, hu_contrast=160),
    Structure("inferior_vena_cava", "tube", ((10, 8, -95), (10, 8, 70), (10,)), hu=40, hu_contrast=90),
    Structure("liver", "ellipsoid", ((85, 30, 30), (48, 45, 38)), hu=55, hu_contrast=50),
    # the non-linear control: attenuation peaks in mid-life and falls on both sides, a trajectory that
    # Spearman's rs and a linear age term miss and the spline test of results/stats/regression.tsv finds
    Structure("spleen", "ellipsoid", ((-95, 25, 35), (28, 32, 38)), hu=45, hu_contrast=60, hu_per_decade_squared=-1.5),
    Structure("gallbladder", "ellipsoid", ((60, 85, -40), (14, 14, 20)), hu=5),
    *_pair("kidney", "ellipsoid", ((75, -55, -10), (26, 22, 45)), volume_per_decade=-0.07, hu=30, hu_contrast=110),
    Structure("pancreas", "ellipsoid", ((-25, 50, -30), (40, 12, 15)), hu=40, volume_per_decade=-0.07, hu_contrast=45),
    *[
        Structure(
            f"vertebrae_{level}",
            "ellipsoid",
            ((0, -40, z), (24, 19, 13)),
            hu=260,
            hu_per_decade=-22 if level == "L4" else 0.0,
            hu_subject_sd=20,
        )
        for level, z in (("L3", -28), ("L4", -64), ("L5", -100))
    ],
    # muscles with an age effect vary little between subjects (hu_subject_sd 3), so that their age effect stays
    # significant when adjusted for kVp, which is tied to age
    *_pair("autochthon", "ellipsoid", ((32, -95, -20), (20, 15, 100)), hu=50, hu_per_decade=-5, hu_subject_sd=3),
    # no age effect on HU and little spread between subjects: its HU follows kVp, which follows age
    *_pair("iliopsoas", "ellipsoid", ((55, -30, -130), (16, 16, 55)), hu=52, volume_per_decade=-0.07, hu_subject_sd=2),
    Structure("urinary_bladder", "ellipsoid", ((0, 55, -200), (35, 28, 25)), hu=10),
    *_pair(
        "iliac_artery", "tube", ((35, 8, -118), (66, 8, -185), (6,)), hu=45, volume_per_decade=0.07, hu_contrast=160
    ),
    Structure("sacrum", "ellipsoid", ((0, -55, -168), (28, 18, 40)), hu=300, hu_subject_sd=20),
    *_pair("hip", "ellipsoid", ((95, -10, -165), (16, 40, 45)), hu=380, hu_per_decade=-28, hu_subject_sd=25),
    *_pair("gluteus_minimus", "ellipsoid", ((125, -20, -165), (7, 25, 32)), hu=52, hu_per_decade=-6, hu_subject_sd=3),
    *_pair("gluteus_medius", "ellipsoid", ((115, -75, -165), (22, 12, 38)), hu=52, hu_per_decade=-5, hu_subject_sd=3),
    *_pair("gluteus_maximus", "ellipsoid", ((62, -100, -205), (42, 12, 40)), hu=50, hu_per_decade=-4, hu_subject_sd=3),
    *_pair("femur", "tube", ((135, 10, -238), (135, 10, -222), (12,)), hu=500, hu_subject_sd=25),
)

SEX_VOLUME_FACTOR = {"M": 1.08, "F": 0.92}
SEX_HU_OFFSET = {"M": 3.0, "F": -3.0}
CONTRAST_VOLUME_FACTOR = {"vessel": 1.05, "kidney": 1.04}
VOLUME_SUBJECT_SD = 0.05  # log-normal spread of volumes between subjects
# kVp: HU at the lower tube voltage minus HU at the higher one, per tissue; clinically about -5 HU for fat and +2
# for muscle between 100 and 120 kVp, exaggerated here as the age effects are, so that 40 scans show it
KVP_SETTINGS = (100, 120)
KVP_HU_EFFECT = {"fat": -10.0, "muscle": 20.0}
KVP_AGE_SPLIT = 55  # below it, LOW_KVP_SHARE of the subjects are scanned at the lower kVp; from it, the rest
LOW_KVP_SHARE = 0.95
ACCELERATED_SHARE = 0.2
ACCELERATED_YEARS = 10.0


def truth_table() -> pd.DataFrame:
    """What the phantom plants: structure, measure, direction (+1/-1/0: the linear trend), effect (per
    decade), unit, trajectory ("none", "linear", or "peak"/"trough": a curve with its extremum at
    ``extremum_age`` and no linear trend), extremum_age, curvature (unit per squared decade), kvp_effect (HU
    that the lower kVp adds: KVP_HU_EFFECT of the structure's group; 0 for volumes)."""
    groups = load_structure_table("total_v1").set_index("name")["group"]
    rows = []
    for s in ANATOMY:
        rows.append(
            (
                s.name,
                "volume_ml",
                int(np.sign(s.volume_per_decade)),
                s.volume_per_decade,
                "relative change per decade",
                "linear" if s.volume_per_decade else "none",
                np.nan,
                0.0,
                0.0,
            )
        )
        if s.hu_per_decade_squared:
            trajectory, extremum = "peak" if s.hu_per_decade_squared < 0 else "trough", REFERENCE_AGE
        else:
            trajectory, extremum = ("linear" if s.hu_per_decade else "none"), np.nan
        rows.append(
            (
                s.name,
                "hu_mean",
                int(np.sign(s.hu_per_decade)),
                s.hu_per_decade,
                "HU per decade",
                trajectory,
                extremum,
                s.hu_per_decade_squared,
                kvp_offset(groups[s.name], KVP_SETTINGS[0]),
            )
        )
    return pd.DataFrame(
        rows,
        columns=[
            "structure",
            "measure",
            "direction",
            "effect",
            "unit",
            "trajectory",
            "extremum_age",
            "curvature",
            "kvp_effect",
        ],
    )


def subject_id(index: int) -> str:
    return f"demo{index + 1:03d}"


def subject_ids(n: int) -> list[str]:
    return [subject_id(i) for i in range(n)]


def _subject_rng(seed: int, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, index])


@dataclass(frozen=True)
class SubjectDraw:
    age: int
    sex: str
    contrast: int
    crop: str  # "", "top" (clavicles cut) or "bottom" (pelvis cut)
    gallbladder_removed: bool
    volume_noise: np.ndarray
    hu_noise: np.ndarray
    image_seed: int
    accelerated: bool = False  # every age effect follows age + ACCELERATED_YEARS
    kvp: int = KVP_SETTINGS[1]

    @property
    def biological_age(self) -> float:
        """The age the planted age effects follow."""
        return self.age + ACCELERATED_YEARS * self.accelerated


def draw_subject(seed: int, index: int) -> SubjectDraw:
    """Covariates and per-structure noise of one subject (cheap: no image)."""
    rng = _subject_rng(seed, index)
    age = int(rng.integers(18, 96))
    sex = "M" if rng.random() < 0.62 else "F"
    contrast = int(rng.random() < 0.75)
    crop_draw = rng.random()
    crop = "top" if crop_draw < 0.06 else "bottom" if crop_draw < 0.12 else ""
    gallbladder_removed = bool(rng.random() < 0.08)
    volume_noise = rng.normal(0.0, VOLUME_SUBJECT_SD, len(ANATOMY))
    hu_noise = rng.normal(0.0, 1.0, len(ANATOMY))
    image_seed = int(rng.integers(2**31))
    accelerated = bool(rng.random() < ACCELERATED_SHARE)  # drawn late: the earlier draws stay as they were
    low_share = LOW_KVP_SHARE if age < KVP_AGE_SPLIT else 1.0 - LOW_KVP_SHARE
    kvp = KVP_SETTINGS[0] if rng.random() < low_share else KVP_SETTINGS[1]
    return SubjectDraw(
        age, sex, contrast, crop, gallbladder_removed, volume_noise, hu_noise, image_seed, accelerated, kvp
    )


def kvp_offset(tissue: str, kvp: int) -> float:
    """HU that a scan at ``kvp`` adds to ``tissue`` (fat, muscle; 0 for any other) over the higher setting."""
    return KVP_HU_EFFECT.get(tissue, 0.0) if kvp == KVP_SETTINGS[0] else 0.0


def _volume_factor(s: Structure, group: str, draw: SubjectDraw, k: int) -> float:
    factor = 1.0 + s.volume_per_decade * (draw.biological_age - REFERENCE_AGE) / 10.0
    factor *= SEX_VOLUME_FACTOR[draw.sex] * np.exp(draw.volume_noise[k])
    if draw.contrast:
        factor *= CONTRAST_VOLUME_FACTOR.get("kidney" if s.name.startswith("kidney") else group, 1.0)
    return factor


def _attenuation(s: Structure, group: str, draw: SubjectDraw, k: int) -> float:
    decades = (draw.biological_age - REFERENCE_AGE) / 10.0
    hu = s.hu + s.hu_per_decade * decades + s.hu_per_decade_squared * decades**2 + SEX_HU_OFFSET[draw.sex]
    hu += s.hu_contrast * draw.contrast + kvp_offset(group, draw.kvp)
    return hu + s.hu_subject_sd * draw.hu_noise[k]


def _grid(spacing, crop: str):
    (x0, x1), (y0, y1), (z0, z1) = FIELD_OF_VIEW
    if crop == "top":
        z1 = 222.0  # through the clavicles
    elif crop == "bottom":
        z0 = -228.0  # through the gluteus maximus and femora
    shape = tuple(int(round((hi - lo) / d)) for (lo, hi), d in zip(((x0, x1), (y0, y1), (z0, z1)), spacing))
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = (x0 + spacing[0] / 2, y0 + spacing[1] / 2, z0 + spacing[2] / 2)
    return shape, affine


def _scale(shape: str, volume_factor: float) -> float:
    # ellipsoids grow in all three axes; tubes keep their centre line and widen
    return volume_factor ** (1.0 / 3.0) if shape == "ellipsoid" else volume_factor**0.5


def _inside(shape: str, geometry: tuple, scale: float, x, y, z) -> np.ndarray:
    if shape == "ellipsoid":
        centre, axes = geometry
        return sum(((c - m) / (a * scale)) ** 2 for c, m, a in zip((x, y, z), centre, axes)) <= 1.0
    start, end, (radius,) = geometry
    start, end = np.asarray(start, float), np.asarray(end, float)
    axis = end - start
    t = np.clip(
        ((x - start[0]) * axis[0] + (y - start[1]) * axis[1] + (z - start[2]) * axis[2]) / (axis @ axis), 0.0, 1.0
    )
    distance2 = sum((c - (p + t * a)) ** 2 for c, p, a in zip((x, y, z), start, axis))
    return distance2 <= (radius * scale) ** 2


def _bounds(shape: str, geometry: tuple, scale: float):
    if shape == "ellipsoid":
        centre, axes = np.asarray(geometry[0], float), np.asarray(geometry[1], float) * scale
        return centre - axes, centre + axes
    start, end, (radius,) = geometry
    start, end = np.asarray(start, float), np.asarray(end, float)
    r = radius * scale
    return np.minimum(start, end) - r, np.maximum(start, end) + r


def rasterize(structure: Structure, volume_factor: float, affine: np.ndarray, shape) -> tuple[tuple, np.ndarray]:
    """(index box, mask inside the box) of one structure, its volume scaled by volume_factor, on a grid."""
    scale = _scale(structure.shape, volume_factor)
    lo, hi = _bounds(structure.shape, structure.geometry, scale)
    origin, spacing = affine[:3, 3], np.diag(affine)[:3]
    first = np.maximum(np.floor((lo - origin) / spacing).astype(int), 0)
    last = np.minimum(np.ceil((hi - origin) / spacing).astype(int) + 1, shape)
    if np.any(last <= first):
        return (slice(0, 0),) * 3, np.zeros((0, 0, 0), bool)
    box = tuple(slice(a, b) for a, b in zip(first, last))
    x, y, z = (origin[i] + spacing[i] * np.arange(first[i], last[i]) for i in range(3))
    mask = _inside(structure.shape, structure.geometry, scale, x[:, None, None], y[None, :, None], z[None, None, :])
    return box, mask


def render_subject(draw: SubjectDraw, spacing=DEFAULT_SPACING) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(CT in HU as int16, label map uint8 with v1 ids, affine) of one drawn subject."""
    table = load_structure_table("total_v1").set_index("name")
    shape, affine = _grid(spacing, draw.crop)
    labels = np.zeros(shape, np.uint8)
    hu_of_label = np.zeros(256, np.float32)
    for k, s in enumerate(ANATOMY):
        if s.name == "gallbladder" and draw.gallbladder_removed:
            continue
        label, group = int(table.at[s.name, "label"]), table.at[s.name, "group"]
        box, mask = rasterize(s, _volume_factor(s, group, draw, k), affine, shape)
        labels[box][mask] = label
        hu_of_label[label] = _attenuation(s, group, draw, k)

    x, y = (affine[i, 3] + spacing[i] * np.arange(shape[i]) for i in range(2))
    body = (x[:, None] / BODY_SEMI_AXES[0]) ** 2 + (y[None, :] / BODY_SEMI_AXES[1]) ** 2 <= 1.0
    fat = np.float32(FAT_HU + kvp_offset("fat", draw.kvp))
    image = np.where(body[:, :, None], fat, np.float32(AIR_HU))
    image = np.where(labels > 0, hu_of_label[labels], image)
    # partial volume: about one millimetre of blur, then scanner noise
    image = ndimage.gaussian_filter(image, sigma=[1.0 / d for d in spacing])
    rng = np.random.default_rng(draw.image_seed)
    image += rng.normal(0.0, NOISE_HU, image.shape).astype(np.float32)
    ct = np.clip(np.rint(image), -1024, 3071).astype(np.int16)
    return ct, labels, affine


def covariates(n: int, seed: int) -> pd.DataFrame:
    """subject, age, sex, contrast, kvp of a phantom cohort, without rendering it."""
    rows = []
    for index, subject in enumerate(subject_ids(n)):
        draw = draw_subject(seed, index)
        rows.append((subject, draw.age, draw.sex, draw.contrast, draw.kvp))
    return pd.DataFrame(rows, columns=["subject", "age", "sex", "contrast", "kvp"])


def subject_truth(n: int, seed: int) -> pd.DataFrame:
    """subject, age, accelerated (0/1), biological_age (the age the planted effects follow) of each subject."""
    draws = [draw_subject(seed, index) for index in range(n)]
    return pd.DataFrame(
        {
            "subject": subject_ids(n),
            "age": [d.age for d in draws],
            "accelerated": [int(d.accelerated) for d in draws],
            "biological_age": [d.biological_age for d in draws],
        }
    )


def cohort_sheet(n: int, seed: int) -> pd.DataFrame:
    """The phantom's cohort sheet; paths relative to the cohort folder."""
    sheet = covariates(n, seed)
    sheet.insert(1, "ct", [f"ct/{s}.nii.gz" for s in sheet["subject"]])
    sheet.insert(2, "seg", [f"labels/{s}.nii.gz" for s in sheet["subject"]])
    sheet.insert(3, "reference", sheet["seg"])
    return sheet


def write_subject(out_dir: str | Path, seed: int, index: int, spacing=DEFAULT_SPACING) -> None:
    out_dir = Path(out_dir)
    subject = subject_id(index)
    ct, labels, affine = render_subject(draw_subject(seed, index), spacing)
    for folder, array in (("ct", ct), ("labels", labels)):
        (out_dir / folder).mkdir(parents=True, exist_ok=True)
        img = nib.Nifti1Image(array, affine)
        img.header.set_xyzt_units("mm", "sec")
        nib.save(img, out_dir / folder / f"{subject}.nii.gz")


def write_cohort(out_dir: str | Path, n: int, seed: int, spacing=DEFAULT_SPACING, processes: int = 1) -> None:
    """Scans, label maps, cohort.tsv, truth.tsv and truth_subjects.tsv of an n-subject phantom cohort under
    out_dir."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    map_processes(write_subject, [out_dir] * n, [seed] * n, range(n), [spacing] * n, processes=processes)
    write_tsv(cohort_sheet(n, seed), out_dir / "cohort.tsv", missing=BLANK)  # a blank cell: unknown
    write_tsv(truth_table(), out_dir / "truth.tsv", missing=BLANK)
    write_tsv(subject_truth(n, seed), out_dir / "truth_subjects.tsv", missing=BLANK)
