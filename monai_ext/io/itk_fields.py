"""ITK / ANTs-compatible outputs: displacement fields, affine transform files and images.

Conventions (see :mod:`monai_ext.spatial.coordinates`):

* image geometry is given as a NIfTI / MONAI ``(n + 1, n + 1)`` voxel to **RAS** mm affine (``MetaTensor.affine``);
  ITK stores the same geometry as origin, spacing and direction in **LPS** mm (``x_LPS = -x_RAS``,
  ``y_LPS = -y_RAS``);
* a voxel DDF ``(1, n, *spatial)`` on the fixed grid maps fixed voxel ``x`` to moving voxel ``x + u(x)``;
* an ITK displacement field holds, at each fixed-grid point ``p`` (LPS mm), the vector ``d(p)`` such that
  ``p + d(p)`` is the corresponding moving point (LPS mm). ITK and ANTs transforms map **fixed physical
  points to moving physical points** (the pull-back direction used when resampling the moving image), the
  same direction as our DDFs. Written as NIfTI it is the 5-D ``(X, Y, Z, 1, 3)`` float vector image with
  ``intent_code = 1007`` (vector) that ``antsApplyTransforms`` and ``itk.imread`` read.

MONAI's ``ITKWriter`` writes that layout but leaves the vector components untouched (it neither converts
voxel displacements to millimetres nor RAS to LPS), hence the conversion here. Every writer is atomic
(:func:`monai_ext.data.atomic.atomic_output`).
"""

from __future__ import annotations

import os
from pathlib import Path

import itk
import numpy as np
import torch

from monai_ext.data.atomic import atomic_output
from monai_ext.spatial.coordinates import (
    change_frames,
    ddf_voxel_to_world,
    ddf_world_to_voxel,
    ras_to_lps,
    voxel_to_world,
)
from monai_ext.spatial.sampling import check_ddf

__all__ = [
    "itk_geometry",
    "affine_from_itk",
    "ddf_to_itk_displacement",
    "itk_displacement_to_ddf",
    "write_displacement_field",
    "read_displacement_field",
    "write_itk_affine",
    "read_itk_affine",
    "write_image",
]

_TRANSFORM_SUFFIXES = (".tfm", ".txt", ".mat", ".h5", ".hdf5")
# numpy dtypes ITK Python can write as scalar images, and what other dtypes are stored as
_ITK_DTYPES = {np.dtype(t) for t in (np.uint8, np.int16, np.uint16, np.int32, np.uint32, np.float32, np.float64)}
_STORED_AS = {
    np.dtype(np.bool_): np.uint8,
    np.dtype(np.int8): np.int16,
    np.dtype(np.int64): np.int32,
    np.dtype(np.uint64): np.uint32,
    np.dtype(np.float16): np.float32,
}


def _affine(affine, name: str = "affine") -> torch.Tensor:
    """A single ``(n + 1, n + 1)`` voxel to RAS float64 matrix (a leading batch of 1 is dropped)."""
    try:
        matrix = voxel_to_world(affine).to(torch.float64).cpu()
    except ValueError as err:
        raise ValueError(f"{name}: {err}") from None
    if matrix.ndim == 3:
        if matrix.shape[0] != 1:
            raise ValueError(f"{name} must be a single matrix, got a batch of {matrix.shape[0]}")
        matrix = matrix[0]
    return matrix


def itk_geometry(affine) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ITK origin ``(n,)``, spacing ``(n,)`` and direction ``(n, n)`` (all LPS, float64) of a voxel to RAS affine.

    Raises ``ValueError`` when the affine has a shear (non-orthogonal axes), which ITK images cannot represent.
    """
    matrix = _affine(affine)
    n = matrix.shape[0] - 1
    lps = ras_to_lps(n, torch.float64) @ matrix
    linear = lps[:n, :n].numpy()
    spacing = np.linalg.norm(linear, axis=0)
    if not (spacing > 0).all():
        raise ValueError(f"affine has a zero-length voxel axis: {lps.numpy().tolist()}")
    direction = linear / spacing
    if np.abs(direction.T @ direction - np.eye(n)).max() > 1e-4:
        raise ValueError("affine has sheared (non-orthogonal) voxel axes, which an ITK image cannot represent")
    return lps[:n, n].numpy(), spacing, direction


def affine_from_itk(image) -> torch.Tensor:
    """``(n + 1, n + 1)`` float64 voxel to RAS matrix of an ITK image (inverse of :func:`itk_geometry`)."""
    n = image.GetImageDimension()
    direction = itk.array_from_matrix(image.GetDirection())
    lps = np.eye(n + 1)
    lps[:n, :n] = direction * np.asarray(image.GetSpacing(), dtype=np.float64)
    lps[:n, n] = np.asarray(image.GetOrigin(), dtype=np.float64)
    return ras_to_lps(n, torch.float64) @ torch.from_numpy(lps)


def _to_itk(array: np.ndarray | torch.Tensor, affine, ttype=None):
    """ITK image of ``array`` (spatial axes in our order, optional trailing vector axis) with ``affine``'s geometry.

    A tensor is reordered by torch (a blocked copy, ~3x faster than numpy's for a 256^3 vector field)."""
    origin, spacing, direction = itk_geometry(affine)
    n = len(spacing)
    order = tuple(reversed(range(n))) + tuple(range(n, array.ndim))  # ITK arrays are indexed (z, y, x[, c])
    if isinstance(array, torch.Tensor):
        buffer = array.permute(order).contiguous().numpy()
    else:
        buffer = np.ascontiguousarray(array.transpose(order))
    image = itk.image_from_array(buffer) if ttype is None else itk.image_from_array(buffer, ttype=ttype)
    image.SetOrigin(origin.tolist())
    image.SetSpacing(spacing.tolist())
    image.SetDirection(itk.matrix_from_array(np.ascontiguousarray(direction)))
    return image


def _single_ddf(ddf: torch.Tensor) -> torch.Tensor:
    check_ddf(ddf)
    if ddf.shape[0] != 1:
        raise ValueError(f"ddf must hold one field (1, n, *spatial), got batch size {ddf.shape[0]}")
    return ddf.as_subclass(torch.Tensor).detach().cpu()


def ddf_to_itk_displacement(ddf: torch.Tensor, fixed_affine, moving_affine=None):
    """Voxel DDF on the native fixed grid -> ITK displacement field image.

    Args:
        ddf: ``(1, n, *spatial)`` voxel DDF mapping native fixed voxel ``x`` to native moving voxel ``x + u(x)``.
        fixed_affine: ``(n + 1, n + 1)`` voxel to RAS affine of the fixed grid (the field's grid).
        moving_affine: voxel to RAS affine of the moving image's grid; defaults to ``fixed_affine``.

    Returns:
        ``itk.Image[itk.Vector[itk.F, n], n]`` on the fixed grid (origin / spacing / direction in LPS) holding
        ``W_m (x + u(x)) - W_f x`` in LPS mm, ``W`` the voxel to LPS matrices.
    """
    ddf = _single_ddf(ddf)
    n = ddf.shape[1]
    fixed = _affine(fixed_affine, "fixed_affine")
    moving = fixed if moving_affine is None else _affine(moving_affine, "moving_affine")
    for name, matrix in (("fixed_affine", fixed), ("moving_affine", moving)):
        if matrix.shape != (n + 1, n + 1):
            raise ValueError(f"{name} must be ({n + 1}, {n + 1}) for a {n}-D ddf, got {tuple(matrix.shape)}")
    lps = ras_to_lps(n, torch.float64)
    world = ddf_voxel_to_world(ddf.to(torch.float64), lps @ fixed, lps @ moving)[0]
    return _to_itk(world.movedim(0, -1).to(torch.float32), fixed, itk.Image[itk.Vector[itk.F, n], n])


def itk_displacement_to_ddf(field, moving_affine=None) -> tuple[torch.Tensor, torch.Tensor]:
    """ITK displacement field image -> ``(ddf, fixed_affine)`` (inverse of :func:`ddf_to_itk_displacement`).

    Args:
        field: ITK vector image of ``n`` LPS mm components on the fixed grid.
        moving_affine: voxel to RAS affine of the moving grid the voxel DDF should point into; defaults
            to the field's own grid.

    Returns:
        ``ddf`` ``(1, n, *spatial)`` float32 voxel DDF (fixed voxels -> moving voxels) and the fixed grid's
        ``(n + 1, n + 1)`` float64 voxel to RAS affine.
    """
    n = field.GetImageDimension()
    vectors = itk.array_from_image(field)
    if vectors.ndim != n + 1 or vectors.shape[-1] != n:
        raise ValueError(f"a displacement field needs {n} vector components per voxel, got array {vectors.shape}")
    fixed = affine_from_itk(field)
    moving = fixed if moving_affine is None else _affine(moving_affine, "moving_affine")
    order = tuple(reversed(range(n))) + (n,)
    world = torch.from_numpy(np.ascontiguousarray(vectors.transpose(order))).to(torch.float64).movedim(-1, 0)[None]
    lps = ras_to_lps(n, torch.float64)
    if not torch.isfinite(world).all():
        raise ValueError("displacement field contains non-finite values")
    return ddf_world_to_voxel(world, lps @ fixed, lps @ moving).to(torch.float32), fixed


def _existing(path: str | os.PathLike) -> Path:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    return path


def write_displacement_field(path: str | os.PathLike, ddf: torch.Tensor, fixed_affine, moving_affine=None) -> Path:
    """Save a native voxel DDF as an ITK / ANTs displacement field (``.nii.gz`` 5-D vector, ``.nrrd``, ``.mha``).

    Arguments as in :func:`ddf_to_itk_displacement`. The file is usable directly as a warp by
    ``antsApplyTransforms -t path`` or ``itk.DisplacementFieldTransform`` (fixed -> moving points).
    Written atomically; returns the path.
    """
    image = ddf_to_itk_displacement(ddf, fixed_affine, moving_affine)
    with atomic_output(path) as tmp:
        itk.imwrite(image, str(tmp), compression=True)
    return Path(path)


def read_displacement_field(path: str | os.PathLike, moving_affine=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Read an ITK / ANTs displacement field file: ``(ddf, fixed_affine)`` as in :func:`itk_displacement_to_ddf`."""
    path = _existing(path)
    try:
        field = itk.imread(str(path))
    except Exception as err:  # ITK raises RuntimeError subclasses with long C++ traces
        raise ValueError(f"cannot read displacement field {path}: {str(err).strip().splitlines()[-1]}") from None
    try:
        return itk_displacement_to_ddf(field, moving_affine)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None


def write_itk_affine(
    path: str | os.PathLike, matrix: torch.Tensor | np.ndarray, fixed_affine=None, moving_affine=None
) -> Path:
    """Save an affine map as an ITK transform file (``.tfm``/``.txt`` text, ``.mat`` as ANTs writes, ``.h5``).

    Args:
        path: destination; the extension chooses the format.
        matrix: ``(n + 1, n + 1)`` (or ``(1, n + 1, n + 1)``) homogeneous map from the **fixed** to the
            **moving** image: in RAS mm world coordinates when no affines are given, or in voxel coordinates
            (fixed voxel -> moving voxel, like :func:`monai_ext.spatial.sampling.affine_to_ddf`) when both
            ``fixed_affine`` and ``moving_affine`` (voxel to RAS) are given.

    The file holds ``AffineTransform_double_n_n`` in LPS mm with centre 0: it maps fixed physical points to
    moving physical points, ITK's resampling convention. Written atomically; returns the path.
    """
    path = Path(path)
    if not path.name.lower().endswith(_TRANSFORM_SUFFIXES):
        raise ValueError(f"transform file {path} must end with one of {_TRANSFORM_SUFFIXES}")
    world = _affine(matrix, "matrix")
    n = world.shape[0] - 1
    if (fixed_affine is None) != (moving_affine is None):
        raise ValueError("give both fixed_affine and moving_affine (voxel matrix) or neither (RAS world matrix)")
    if fixed_affine is not None:
        world = change_frames(world, _affine(fixed_affine, "fixed_affine"), _affine(moving_affine, "moving_affine"))
    lps = change_frames(world, ras_to_lps(n, torch.float64)).numpy()
    transform = itk.AffineTransform[itk.D, n].New()
    transform.SetMatrix(itk.matrix_from_array(np.ascontiguousarray(lps[:n, :n])))
    transform.SetTranslation(lps[:n, n].tolist())
    with atomic_output(path) as tmp:
        itk.transformwrite([transform], str(tmp))
    return path


def read_itk_affine(path: str | os.PathLike) -> torch.Tensor:
    """Read a single affine-like ITK transform file; returns the ``(n + 1, n + 1)`` float64 RAS world matrix
    from fixed to moving points (inverse of :func:`write_itk_affine` without affines)."""
    path = _existing(path)
    try:
        transforms = itk.transformread(str(path))
    except Exception as err:
        raise ValueError(f"cannot read transform file {path}: {str(err).strip().splitlines()[-1]}") from None
    if len(transforms) != 1 or not hasattr(transforms[0], "GetMatrix"):
        raise ValueError(f"{path} must hold exactly one affine transform, got {[type(t).__name__ for t in transforms]}")
    transform = transforms[0]
    linear = itk.array_from_matrix(transform.GetMatrix())
    n = linear.shape[0]
    lps = torch.eye(n + 1, dtype=torch.float64)
    lps[:n, :n] = torch.from_numpy(np.asarray(linear, dtype=np.float64))
    lps[:n, n] = torch.tensor(list(transform.GetOffset()), dtype=torch.float64)  # the offset includes the centre
    return change_frames(lps, ras_to_lps(n, torch.float64))


def _storage(array: np.ndarray, dtype) -> np.ndarray:
    """``array`` cast to a dtype ITK writes: ``dtype`` if given, else its own (int64 as int32, bool as uint8)."""
    target = np.dtype(_STORED_AS.get(array.dtype, array.dtype) if dtype is None else dtype)
    if target not in _ITK_DTYPES:
        raise ValueError(f"dtype must be one of {sorted(str(t) for t in _ITK_DTYPES)}, got {target}")
    if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
        raise ValueError("image contains non-finite values")
    if np.issubdtype(target, np.integer) and array.size:
        if np.issubdtype(array.dtype, np.floating) and not (array == np.rint(array)).all():
            raise ValueError(f"image has non-integer values and cannot be stored as {target}")
        info = np.iinfo(target)
        if array.min() < info.min or array.max() > info.max:
            raise ValueError(f"image values [{array.min()}, {array.max()}] do not fit {target}")
    return array.astype(target, copy=False)


def write_image(path: str | os.PathLike, image: torch.Tensor | np.ndarray, affine, dtype=None) -> Path:
    """Save a single-channel image with a voxel to RAS affine (NIfTI, NRRD, MHA; chosen by extension).

    Args:
        path: destination.
        image: ``(*spatial)``, ``(1, *spatial)`` or ``(1, 1, *spatial)`` with ``n = len(spatial)`` given by the affine.
        affine: ``(n + 1, n + 1)`` voxel to RAS matrix of the image's grid (e.g. the native fixed affine for a
            warped image, warped labels or a Jacobian determinant map).
        dtype: numpy dtype stored; by default the image's own, so integer label maps stay integer
            (int64 is stored as int32, bool as uint8). Float values cast to an integer dtype must be integral.

    Written atomically; returns the path.
    """
    matrix = _affine(affine)
    n = matrix.shape[0] - 1
    array = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    if array.ndim < n or int(np.prod(array.shape[:-n])) != 1:
        raise ValueError(
            f"image must be (*spatial), (1, *spatial) or (1, 1, *spatial) with {n} spatial dims, got {array.shape}"
        )
    itk_image = _to_itk(_storage(array.reshape(array.shape[-n:]), dtype), matrix)
    with atomic_output(path) as tmp:
        itk.imwrite(itk_image, str(tmp), compression=True)
    return Path(path)
