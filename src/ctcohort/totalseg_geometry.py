"""TotalSegmentator's pre- and postprocessing around nnU-Net (segmentation.resampling: totalsegmentator), on
the device with torch.

TotalSegmentator 2.18.0 (``nnUNet_predict_image``) reorients the CT to the closest canonical orientation,
resamples it to the task's spacing with ``scipy.ndimage.zoom`` (spline order 1, corner-aligned grids, output
shape round(shape x old spacing / new spacing), the old spacing as the NIfTI header stores it, in float32),
truncates the result to int32 (unless the spacing is already the target's, when nothing is resampled),
splits a very large image of a multi-part task into three overlapping slabs along z, and hands each file to
nnU-Net, which crops it to the bounding box of its non-zero voxels and predicts with a tile step of 0.8 for
the ``total`` tasks (0.5 otherwise). The parts' labels are merged on that grid and resampled back to the
canonical input grid with ``zoom`` of order 0, then reoriented back. The functions here reproduce each step;
``segment.Segmenter`` strings them together.
"""

from collections.abc import Sequence

import numpy as np

TOTAL_TILE_STEP = 0.8  # TotalSegmentator's sliding-window step for its total tasks; 0.5 for the others
# A resampled image of more voxels than this and more than SPLIT_MIN_Z slices is segmented in three slabs
# (multi-part tasks only), each with SPLIT_MARGIN slices of context on the inner sides.
SPLIT_MAX_VOXELS = 512 * 512 * 900
SPLIT_MIN_Z = 200
SPLIT_MARGIN = 20


def header_spacing(spacing: Sequence[float]) -> np.ndarray:
    """Voxel spacing as a NIfTI header stores it (float32), which TotalSegmentator's zoom factors start from."""
    return np.asarray(spacing, dtype=np.float32).astype(np.float64)


def resampled_shape(shape: Sequence[int], spacing: Sequence[float], target: Sequence[float]) -> tuple[int, ...]:
    """scipy.ndimage.zoom's output shape for zoom factors spacing / target (Python's round, half to even)."""
    return tuple(int(round(n * float(s) / float(t))) for n, s, t in zip(shape, header_spacing(spacing), target))


def _source_coordinates(n_in: int, n_out: int) -> np.ndarray:
    """Where zoom (grid_mode=False) samples the input for each output index: corners aligned, in float64."""
    if n_out <= 1:
        return np.zeros(n_out)
    return np.arange(n_out) * ((n_in - 1) / (n_out - 1))


def _linear_taps(n_in: int, n_out: int):
    """Per output index along one axis: the two input indices and their weights (1 - t, t), as scipy's
    order-1 spline gives them (the upper index clamped at the edge, mode nearest)."""
    where = _source_coordinates(n_in, n_out)
    low = np.floor(where).astype(np.int64)
    fraction = where - low
    return (np.minimum(low, n_in - 1), np.minimum(low + 1, n_in - 1)), (1.0 - fraction, fraction)


def zoom_linear(image, shape: Sequence[int], max_voxels: int = 1 << 24):
    """``image`` (a 3D float64 tensor) resampled onto ``shape`` as scipy.ndimage.zoom with order 1 does it, to
    about 1e-13: each output voxel sums its 8 neighbours' value x weight_0 x weight_1 x weight_2 (last axis
    fastest, as scipy sums them). In slabs of output planes along the first axis."""
    import torch

    device = image.device
    taps = [_linear_taps(n_in, n_out) for n_in, n_out in zip(image.shape, shape)]
    index = [[torch.from_numpy(i).to(device) for i in axis_taps[0]] for axis_taps in taps]
    weight = [[torch.from_numpy(w).to(device, image.dtype) for w in axis_taps[1]] for axis_taps in taps]
    out = torch.empty(tuple(shape), dtype=image.dtype, device=device)
    slab = max(1, max_voxels // max(1, shape[1] * shape[2]))
    for start in range(0, shape[0], slab):
        rows = slice(start, min(shape[0], start + slab))
        total = out[rows].zero_()
        for a in (0, 1):
            for b in (0, 1):
                for c in (0, 1):
                    # a gathered copy, multiplied in place in scipy's order
                    term = image[index[0][a][rows, None, None], index[1][b][None, :, None], index[2][c][None, None, :]]
                    term.mul_(weight[0][a][rows, None, None]).mul_(weight[1][b][None, :, None])
                    total.add_(term.mul_(weight[2][c][None, None, :]))
    return out


def zoom_nearest(labels, shape: Sequence[int]):
    """``labels`` (a 3D tensor) onto ``shape`` as scipy.ndimage.zoom with order 0 does it: each output voxel
    takes the input voxel at floor(coordinate + 0.5)."""
    import torch

    index = [
        torch.from_numpy(np.minimum(np.floor(_source_coordinates(n_in, n_out) + 0.5).astype(np.int64), n_in - 1)).to(
            labels.device
        )
        for n_in, n_out in zip(labels.shape, shape)
    ]
    return labels[index[0][:, None, None], index[1][None, :, None], index[2][None, None, :]]


def resample_ct(hu, spacing: Sequence[float], target: Sequence[float]):
    """The canonical CT ``hu`` (tensor, RAS voxel order, float) as TotalSegmentator feeds it to nnU-Net:
    resampled from ``spacing`` to ``target`` and truncated to integers, or unchanged where the spacings
    are equal."""
    import torch

    if np.array_equal(header_spacing(spacing), np.asarray(target, dtype=np.float64)):
        return hu
    resampled = zoom_linear(hu.to(torch.float64), resampled_shape(hu.shape, spacing, target))
    return torch.trunc(resampled).to(hu.dtype)  # numpy's astype(int32) truncates towards zero


def nonzero_box(image) -> tuple[slice, ...]:
    """nnU-Net's crop before prediction: the bounding box of the non-zero voxels (all of an image without any)."""
    import torch

    nonzero = image != 0
    box = []
    for axis in range(image.ndim):
        others = tuple(a for a in range(image.ndim) if a != axis)
        hits = torch.nonzero(nonzero.any(dim=others)).flatten()
        box.append(slice(int(hits[0]), int(hits[-1]) + 1) if len(hits) else slice(None))
    return tuple(box)


def slabs(depth: int, n_voxels: int, multi_part: bool) -> list[tuple[slice, slice, slice]]:
    """(input slab, its rows to keep, where they go) along z: three overlapping slabs where TotalSegmentator
    splits the image (a multi-part task on more than SPLIT_MAX_VOXELS voxels and SPLIT_MIN_Z slices), else one."""
    if not (multi_part and n_voxels > SPLIT_MAX_VOXELS and depth > SPLIT_MIN_Z):
        return [(slice(0, depth), slice(0, depth), slice(0, depth))]
    third, margin = depth // 3, SPLIT_MARGIN
    return [
        (slice(0, third + margin), slice(0, third), slice(0, third)),
        (slice(third + 1 - margin, 2 * third + margin), slice(margin - 1, margin - 1 + third), slice(third, 2 * third)),
        (
            slice(2 * third + 1 - margin, depth),
            slice(margin - 1, depth - 2 * third - 1 + margin),
            slice(2 * third, depth),
        ),
    ]


def tile_step(dataset_ids: Sequence[int | None], total_ids: set[int], default: float) -> float:
    """TotalSegmentator's sliding-window step: TOTAL_TILE_STEP for its total tasks, ``default`` for others."""
    return TOTAL_TILE_STEP if dataset_ids and all(i in total_ids for i in dataset_ids) else default
