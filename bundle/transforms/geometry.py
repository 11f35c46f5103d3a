"""Volume geometry: file voxel index <-> closest-canonical (RAS+) index <-> axial display slice.

A volume loaded by MONAI (or nibabel) is in the file's index order with a RAS affine. Its closest-canonical order
(``nib.as_closest_canonical``) has axes R, A, S. The network sees axial slices in radiological display orientation:
rows anterior -> posterior, columns patient right -> left, i.e. display ``[row, col] = canonical[n0 - 1 - col,
n1 - 1 - row, k]`` (the orientation of the prepared training slices, :mod:`bundle.data.synapse`, and of inference,
:mod:`bundle.inference`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch


def orientation(affine: Any) -> np.ndarray:
    """nibabel orientation (file axis -> [RAS axis, flip]) of a 4x4 RAS affine (the identity if it is not 4x4)."""
    import nibabel as nib

    aff = np.asarray(affine.detach().cpu() if isinstance(affine, torch.Tensor) else affine, dtype=np.float64)
    if aff.shape != (4, 4):
        aff = np.eye(4)
    return nib.orientations.io_orientation(aff)


def to_canonical(volume: np.ndarray, affine: Any) -> np.ndarray:
    """(I, J, K) volume in file order -> closest-canonical RAS+ order (as ``nib.as_closest_canonical``)."""
    import nibabel as nib

    return nib.orientations.apply_orientation(volume, orientation(affine))


def from_canonical(volume: np.ndarray, affine: Any) -> np.ndarray:
    """Inverse of :func:`to_canonical`."""
    import nibabel as nib

    back = nib.orientations.ornt_transform(nib.orientations.axcodes2ornt(("R", "A", "S")), orientation(affine))
    return nib.orientations.apply_orientation(volume, back)


def voxel_to_canonical(ijk: Sequence[float], shape: Sequence[int], affine: Any) -> list[float]:
    """File voxel index -> closest-canonical RAS+ voxel index."""
    out = [0.0, 0.0, 0.0]
    for axis, (ras_axis, flip) in enumerate(orientation(affine)):
        v = float(ijk[axis])
        out[int(ras_axis)] = shape[axis] - 1 - v if flip < 0 else v
    return out


def slice_to_canonical(k: int, shape: Sequence[int], affine: Any) -> int:
    """A slice index along the file axis closest to S -> the canonical axial slice index; ``IndexError`` when it
    is outside the volume, ``ValueError`` when the volume has no axial axis."""
    for axis, (ras_axis, flip) in enumerate(orientation(affine)):
        if int(ras_axis) == 2:
            if not 0 <= k < shape[axis]:
                raise IndexError(f"slice_index {k} is outside the volume ({shape[axis]} axial slices)")
            return shape[axis] - 1 - k if flip < 0 else k
    raise ValueError("the volume has no axial axis")


def display_slice(volume: np.ndarray, k: int) -> np.ndarray:
    """Axial slice k of a RAS+ volume in radiological display orientation (H = anterior->posterior, W = R->L)."""
    return np.ascontiguousarray(volume[::-1, ::-1, k].T)


def set_display_slice(volume: np.ndarray, k: int, image: np.ndarray) -> None:
    """Write a display-orientation ``image`` (H, W) into axial slice k of the RAS+ ``volume`` (inverse of
    :func:`display_slice`)."""
    volume[:, :, k] = image.T[::-1, ::-1]


def display_shape(canonical_shape: Sequence[int]) -> tuple[int, int]:
    """(rows, columns) of a display slice of a RAS+ volume of ``canonical_shape``."""
    return int(canonical_shape[1]), int(canonical_shape[0])


def canonical_to_display(ab: Sequence[float], canonical_shape: Sequence[int]) -> list[float]:
    """In-plane RAS+ voxel index (a, b) -> (x, y) = (column, row) of the display slice."""
    return [canonical_shape[0] - 1 - ab[0], canonical_shape[1] - 1 - ab[1]]
