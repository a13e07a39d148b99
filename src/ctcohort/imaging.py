"""Reading CT volumes and label maps as they come from the wild.

CT: int16/int32/float on disk, possibly with scl_slope/scl_inter; we return HU
without inflating to float64 when the scaling keeps values integral.
Label maps: often stored as float (nnU-Net and TotalSegmentator outputs are);
we cast to an integer type after checking the values really are integers.
"""

from pathlib import Path

import nibabel as nib
import numpy as np

AFFINE_TOLERANCE_MM = 1e-3


class GridMismatchError(ValueError):
    """The segmentation does not lie on the CT's voxel grid."""


def load_image(path: str | Path) -> nib.Nifti1Image:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such image: {path}")
    try:
        img = nib.load(path)
    except Exception as err:  # nibabel raises several types for unreadable files
        raise ValueError(f"cannot read {path} as NIfTI: {err}") from err
    if len(img.shape) != 3:
        raise ValueError(f"{path}: expected a 3-D volume, got shape {img.shape}")
    return img


def _scaling(img: nib.Nifti1Image) -> tuple[float, float]:
    slope, inter = img.dataobj.slope, img.dataobj.inter
    slope = 1.0 if slope is None or not np.isfinite(slope) or slope == 0 else float(slope)
    inter = 0.0 if inter is None or not np.isfinite(inter) else float(inter)
    return slope, inter


def ct_hounsfield(img: nib.Nifti1Image) -> np.ndarray:
    """CT voxel values in HU: an integer array where the scaling allows, else float32."""
    if not nib.is_proxy(img.dataobj):  # an image built in memory holds its values already
        return np.asanyarray(img.dataobj)
    raw = np.asanyarray(img.dataobj.get_unscaled())
    slope, inter = _scaling(img)
    if np.issubdtype(raw.dtype, np.integer) and slope.is_integer() and inter.is_integer():
        if slope == 1 and inter == 0:
            return raw
        return raw.astype(np.int32) * int(slope) + int(inter)
    hu = raw.astype(np.float32)
    if slope != 1 or inter != 0:
        hu = hu * np.float32(slope) + np.float32(inter)
    return hu


def label_array(img: nib.Nifti1Image, source: str | Path = "label map") -> np.ndarray:
    """Integer labels (uint8 or uint16) from a label map stored with any dtype."""
    values = np.asanyarray(img.dataobj)
    if not np.issubdtype(values.dtype, np.integer):
        rounded = np.rint(values)
        if not np.allclose(values, rounded, atol=1e-3, equal_nan=False):
            raise ValueError(f"{source}: label map holds non-integer values (is it a probability map?)")
        values = rounded
    lowest, highest = values.min(), values.max()
    if lowest < 0:
        raise ValueError(f"{source}: label map holds negative labels (min {lowest})")
    dtype = np.uint8 if highest <= np.iinfo(np.uint8).max else np.uint16
    if highest > np.iinfo(np.uint16).max:
        raise ValueError(f"{source}: label {highest} is too large for a label map")
    return values.astype(dtype, copy=False)


def voxel_volume_ml(affine: np.ndarray) -> float:
    return abs(float(np.linalg.det(affine[:3, :3]))) / 1000.0


def voxel_spacing_mm(affine: np.ndarray) -> np.ndarray:
    return np.sqrt((affine[:3, :3] ** 2).sum(axis=0))


def seg_on_ct_grid(seg: nib.Nifti1Image, ct: nib.Nifti1Image, source: str | Path = "segmentation") -> np.ndarray:
    """Labels of ``seg`` on the voxel grid of ``ct``.

    A segmentation stored in another orientation of the same grid (e.g. LPS
    instead of RAS) is reoriented; anything else is a GridMismatchError.
    """
    labels = label_array(seg, source)
    if seg.shape == ct.shape and np.allclose(seg.affine, ct.affine, atol=AFFINE_TOLERANCE_MM):
        return labels
    transform = nib.orientations.ornt_transform(
        nib.orientations.io_orientation(seg.affine), nib.orientations.io_orientation(ct.affine)
    )
    reoriented = nib.orientations.apply_orientation(labels, transform)
    affine = seg.affine @ nib.orientations.inv_ornt_aff(transform, seg.shape)
    if reoriented.shape == ct.shape and np.allclose(affine, ct.affine, atol=AFFINE_TOLERANCE_MM):
        return np.ascontiguousarray(reoriented)
    raise GridMismatchError(
        f"{source}: grid does not match the CT (shape {seg.shape} vs {ct.shape}, "
        f"affine\n{np.round(seg.affine, 3)}\nvs\n{np.round(ct.affine, 3)}); "
        "segment the CT itself or resample the label map onto it (nearest neighbour)"
    )
