"""Voxel grids and resampling: the one place that knows how array axes map to patient space.

Convention used everywhere in fedfusion:
- A volume is a numpy array ``vol[k, j, i]`` of shape ``(D, H, W)``: ``k`` slice, ``j`` row, ``i`` column.
- Its affine is a 4x4 matrix mapping the index vector ``(k, j, i, 1)`` to **RAS** millimetres (NIfTI's world).
- DICOM geometry is LPS; :func:`dicom_affine` converts (RAS = diag(-1, -1, 1) · LPS).
- NIfTI files written by fedfusion store the ``(D, H, W)`` array as is with that affine; NIfTI files from
  elsewhere may use any axis order, which is fine because readers resample through the affines.
"""

from __future__ import annotations

import gzip
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, BinaryIO

import numpy as np
from scipy import ndimage

from .bounded_io import BoundedReader
from .limits import DEFAULT_LIMITS, LimitExceeded, ReaderLimits, check_file_size, check_voxels

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass(frozen=True)
class Grid:
    """A voxel grid: ``shape`` ``(D, H, W)`` voxels and ``affine`` (4x4, index ``(k, j, i)`` -> RAS mm)."""

    shape: tuple[int, int, int]
    affine: np.ndarray

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size ``(dz, dy, dx)`` in mm."""
        return affine_spacing(self.affine)


def affine_spacing(affine: np.ndarray) -> tuple[float, float, float]:
    """Voxel size along each array axis ``(dk, dj, di)`` in mm."""
    norms = np.linalg.norm(np.asarray(affine, dtype=float)[:3, :3], axis=0)
    return float(norms[0]), float(norms[1]), float(norms[2])


def dicom_affine(
    first_position: Sequence[float],
    orientation: Sequence[float],
    pixel_spacing: Sequence[float],
    slice_step: Sequence[float],
) -> np.ndarray:
    """RAS affine of a DICOM series stacked as ``vol[k, j, i]``.

    Args:
        first_position: ImagePositionPatient of slice ``k = 0`` (LPS mm).
        orientation: ImageOrientationPatient, 6 direction cosines: row direction (increasing column ``i``)
            then column direction (increasing row ``j``).
        pixel_spacing: PixelSpacing ``[between rows (dj), between columns (di)]`` in mm.
        slice_step: LPS vector (mm) from slice ``k`` to slice ``k + 1``.
    """
    x = np.asarray(orientation[:3], dtype=float)
    y = np.asarray(orientation[3:6], dtype=float)
    lps = np.eye(4)
    lps[:3, 0] = np.asarray(slice_step, dtype=float)
    lps[:3, 1] = y * float(pixel_spacing[0])
    lps[:3, 2] = x * float(pixel_spacing[1])
    lps[:3, 3] = np.asarray(first_position, dtype=float)
    return LPS_TO_RAS @ lps


def dicom_geometry(affine: np.ndarray, k: int) -> tuple[list[float], list[float], list[float], float]:
    """Inverse of :func:`dicom_affine` for writers: (ImagePositionPatient of slice ``k``, ImageOrientationPatient,
    PixelSpacing, slice thickness) in DICOM's LPS convention."""
    lps = LPS_TO_RAS @ np.asarray(affine, dtype=float)  # diag(-1,-1,1) is its own inverse
    dk, dj, di = affine_spacing(affine)
    x = lps[:3, 2] / di
    y = lps[:3, 1] / dj
    position = lps[:3, 3] + k * lps[:3, 0]
    return [float(v) for v in position], [float(v) for v in (*x, *y)], [dj, di], dk


def resample_to_grid(
    vol: np.ndarray, src_affine: np.ndarray, dst: Grid, order: int = 1, cval: float = 0.0
) -> np.ndarray:
    """Resample ``vol`` (on ``src_affine``) onto grid ``dst`` by physical position.

    ``order=1`` (trilinear) for images, ``order=0`` (nearest) for label maps. Points outside the source get
    ``cval``. Returns an array of shape ``dst.shape`` with ``vol``'s dtype for ``order=0``, float32 otherwise.
    """
    src_affine = np.asarray(src_affine, dtype=float)
    if vol.shape == tuple(dst.shape) and np.allclose(src_affine, dst.affine, atol=1e-4):
        return vol.copy() if order == 0 else vol.astype(np.float32, copy=True)
    index_map = np.linalg.inv(src_affine) @ np.asarray(dst.affine, dtype=float)
    out = ndimage.affine_transform(
        vol.astype(np.float32) if order else vol,
        index_map[:3, :3],
        offset=index_map[:3, 3],
        output_shape=tuple(dst.shape),
        order=order,
        mode="constant",
        cval=cval,
        prefilter=False,
    )
    return out if order == 0 else out.astype(np.float32, copy=False)


def save_nifti(vol: np.ndarray, affine: np.ndarray, path: str | os.PathLike[str]) -> None:
    """Write ``vol`` ``(D, H, W)`` with its RAS ``affine`` as NIfTI-1 (gzip if the name ends in ``.gz``)."""
    import nibabel as nib

    img = nib.Nifti1Image(np.asarray(vol), np.asarray(affine, dtype=float))
    img.set_qform(img.affine, code=1)
    img.set_sform(img.affine, code=1)
    nib.save(img, os.fspath(path))


def _nifti_class(stream: BinaryIO, where: str) -> Any:
    """The nibabel image class of a single-file NIfTI stream, from its ``sizeof_hdr`` (348: NIfTI-1, 540: NIfTI-2)."""
    import nibabel as nib

    first = stream.read(4)
    stream.seek(0)
    if len(first) == 4:
        for order in ("<", ">"):
            size = struct.unpack(f"{order}i", first)[0]
            if size == 348:
                return nib.Nifti1Image
            if size == 540:
                return nib.Nifti2Image
    raise ValueError(f"{where}: not a NIfTI-1 or NIfTI-2 file (header size field {first!r})")


def check_affine(affine: np.ndarray, where: str) -> np.ndarray:
    """``affine`` as a float 4x4 array, or ValueError naming ``where`` when it is not finite and invertible (a zero
    voxel size or a NaN would make resampling fail later, for the whole case)."""
    affine = np.asarray(affine, dtype=float)
    if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
        raise ValueError(f"{where}: the voxel-to-world affine is not a finite 4x4 matrix; fix the qform/sform")
    if abs(float(np.linalg.det(affine[:3, :3]))) < 1e-9:
        raise ValueError(f"{where}: the voxel-to-world affine is singular (a voxel size of zero?); fix pixdim or the "
                         "qform/sform")
    return affine


def load_nifti(
    path: str | os.PathLike[str], limits: ReaderLimits = DEFAULT_LIMITS, channels: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Read a 3D NIfTI image as ``(array, RAS affine)``; a trailing singleton 4th axis is dropped.

    With ``channels=True`` a 4D image (one volume per channel along the 4th axis, as the Decathlon stores its
    modalities) is accepted too: the array is then ``(X, Y, Z, C)`` (``C = 1`` for a 3D file).

    Nothing is trusted before it is checked: the file size, then (through a :class:`BoundedReader`, which also caps
    what a ``.gz`` file may inflate to, header extensions included) the header's dimensions and data type against
    ``limits`` (all channels together), and only then the array is read.

    Raises:
        LimitExceeded: (a ValueError) naming the file and the limit it is over.
        ValueError: naming the file when it is not a readable 3D image.
    """
    where = os.fspath(path)
    try:
        check_file_size(os.stat(where).st_size, where, limits)
        raw = gzip.open(where, "rb") if where.lower().endswith(".gz") else open(where, "rb")
        with BoundedReader(raw, limits.max_file_bytes, where) as stream:
            image_class = _nifti_class(stream, where)
            img = image_class.from_file_map(image_class.make_file_map({"image": stream}), mmap=False)
            shape = tuple(int(n) for n in img.shape)
            while len(shape) > 3 and shape[-1] == 1:
                shape = shape[:-1]
            if channels and len(shape) == 3:
                shape = (*shape, 1)
            if len(shape) != (4 if channels else 3):
                expected = "a 3D or 4D (channels last) image" if channels else "a 3D image"
                raise ValueError(f"{where}: expected {expected}, got shape {tuple(img.shape)}")
            check_voxels(shape, img.get_data_dtype().itemsize, where, limits)
            data = np.asarray(img.dataobj).reshape(shape)
            affine = check_affine(img.affine, where)
    except LimitExceeded:
        raise
    except ValueError as exc:
        raise ValueError(str(exc) if where in str(exc) else f"{where}: not a readable NIfTI image ({exc})") from exc
    except Exception as exc:
        raise ValueError(f"{where}: not a readable NIfTI image ({exc})") from exc
    return data, affine


#: Axis directions of fedfusion's canonical grid for ``vol[k, j, i]``: slices inferior->superior, rows
#: anterior->posterior, columns right->left, i.e. the usual DICOM axial stack (so ``vol[k]`` is an axial slice).
CANONICAL_AXCODES: tuple[str, str, str] = ("S", "P", "L")


def reorient_grid(grid: Grid, axcodes: Sequence[str] = CANONICAL_AXCODES) -> Grid:
    """The same voxels as ``grid`` with axes permuted/flipped to point along ``axcodes`` (RAS letters).

    Only axis order and direction change (no interpolation: resampling onto the result with
    :func:`resample_to_grid` moves whole voxels), so e.g. a NIfTI stored x-first becomes slice-first.
    """
    from nibabel.orientations import axcodes2ornt, inv_ornt_aff, io_orientation, ornt_transform

    affine = np.asarray(grid.affine, dtype=float)
    transform = ornt_transform(io_orientation(affine), axcodes2ornt(tuple(axcodes)))
    new_affine = affine @ inv_ornt_aff(transform, tuple(grid.shape))
    shape = [0, 0, 0]
    for axis, (new_axis, _flip) in enumerate(transform):
        shape[int(new_axis)] = int(grid.shape[axis])
    return Grid((shape[0], shape[1], shape[2]), new_affine)
