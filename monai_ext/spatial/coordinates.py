"""Coordinate systems of an image grid and conversions between them.

Frames (all in array axis order, i.e. component ``i`` is along spatial axis ``i`` of a
``(B, C, *spatial)`` tensor, unless stated otherwise):

* **voxel**: index coordinates, integer = voxel centre (``align_corners=True`` semantics);
* **centred normalised** (SITReg's "world" frame): ``x_d = (i_d - (N_d - 1) / 2) * h_d`` with
  ``h_d = (2 / N_m) * (s_d / s_m)``, ``m`` the axis of largest physical field of view ``N_d * s_d``;
  that axis spans exactly ``[-1, 1]`` at the voxel *edges*, anisotropic voxels keep their aspect;
* **normalised** (KeyMorph / ``grid_sample``): every axis independently in ``[-1, 1]``, at voxel
  centres (``align_corners=True``) or at voxel edges (``align_corners=False``);
* **physical**: millimetres in RAS (NIfTI / MONAI ``MetaTensor.affine``) or LPS (ITK), with
  ``x_LPS = -x_RAS``, ``y_LPS = -y_RAS``, ``z_LPS = z_RAS``.

Maps between frames are homogeneous matrices ``(n + 1, n + 1)`` or batched ``(B, n + 1, n + 1)``
acting on column vectors ``[p; 1]``; a function named ``a_to_b`` returns the matrix taking
coordinates in frame ``a`` to coordinates of the same point in frame ``b``. Apply one to points
``(B, N, n)`` with :func:`monai_ext.spatial.affine.transform_points`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from monai_ext.spatial.sampling import check_ddf

__all__ = [
    "centered_normalized_spacing",
    "voxel_to_centered_normalized",
    "downsampled_voxel_to_voxel",
    "voxel_to_normalized",
    "ras_to_lps",
    "voxel_to_world",
    "invert_homogeneous",
    "change_frames",
    "ddf_voxel_to_world",
    "ddf_world_to_voxel",
]


def _spatial_shape(spatial_shape: Sequence[int]) -> tuple[int, ...]:
    shape = tuple(int(s) for s in spatial_shape)
    if len(shape) not in (2, 3) or min(shape) < 1:
        raise ValueError(f"spatial_shape must hold 2 or 3 positive sizes, got {tuple(spatial_shape)}")
    return shape


def _check_matrix(matrix: torch.Tensor, name: str, n: int | None = None) -> int:
    """Return ``n`` after checking ``matrix`` is ``(n + 1, n + 1)`` or ``(B, n + 1, n + 1)`` with ``n`` 2 or 3."""
    if not isinstance(matrix, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(matrix).__name__}")
    size = matrix.shape[-1] if matrix.ndim in (2, 3) else -1
    if size not in (3, 4) or matrix.shape[-2] != size or (n is not None and size != n + 1):
        want = "(n + 1, n + 1) with n in (2, 3)" if n is None else f"({n + 1}, {n + 1})"
        raise ValueError(f"{name} must be a homogeneous matrix {want} or a batch of them, got {tuple(matrix.shape)}")
    return size - 1


def _diagonal_map(scale: Sequence[float], offset: Sequence[float], dtype, device) -> torch.Tensor:
    """Homogeneous matrix of ``p -> scale * p + offset`` (per axis)."""
    n = len(scale)
    matrix = torch.eye(n + 1, dtype=torch.float64)
    matrix[:n, :n] = torch.diag(torch.tensor(scale, dtype=torch.float64))
    matrix[:n, n] = torch.tensor(offset, dtype=torch.float64)
    return matrix.to(dtype=dtype, device=device)


def centered_normalized_spacing(
    spatial_shape: Sequence[int], voxel_size: Sequence[float] | None = None
) -> tuple[float, ...]:
    """Voxel spacing ``h`` of the centred normalised frame of a grid (SITReg's world frame).

    Args:
        spatial_shape: grid size ``N`` (length ``n``).
        voxel_size: physical voxel size ``s`` along each array axis (any unit, only ratios matter);
            isotropic if ``None``.

    Returns:
        ``h_d = (2 / N_m) * (s_d / s_m)`` where ``m`` is the axis of largest field of view ``N_d * s_d``.
    """
    shape = _spatial_shape(spatial_shape)
    size = (1.0,) * len(shape) if voxel_size is None else tuple(float(s) for s in voxel_size)
    if len(size) != len(shape) or not all(np.isfinite(s) and s > 0 for s in size):
        raise ValueError(f"voxel_size must hold {len(shape)} positive finite values, got {voxel_size}")
    m = max(range(len(shape)), key=lambda d: shape[d] * size[d])
    return tuple(2.0 / shape[m] * size[d] / size[m] for d in range(len(shape)))


def voxel_to_centered_normalized(
    spatial_shape: Sequence[int],
    voxel_size: Sequence[float] | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Homogeneous ``(n + 1, n + 1)`` matrix from voxel to centred normalised coordinates.

    ``x_d = (i_d - (N_d - 1) / 2) * h_d`` with ``h`` from :func:`centered_normalized_spacing`;
    the grid is centred on the origin and its largest physical axis spans ``[-1, 1]`` at voxel edges.
    Use :func:`invert_homogeneous` for the inverse map.
    """
    shape = _spatial_shape(spatial_shape)
    h = centered_normalized_spacing(shape, voxel_size)
    return _diagonal_map(h, [-(s - 1) / 2 * hd for s, hd in zip(shape, h)], dtype, device)


def downsampled_voxel_to_voxel(
    factor: int | Sequence[int], ndim: int, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None
) -> torch.Tensor:
    """Homogeneous ``(n + 1, n + 1)`` matrix from voxels of a grid downsampled by ``factor`` to full-resolution voxels.

    Both grids share the left edge of their first voxel (the receptive field of a stride-``f``
    convolution or pooling), so coarse voxel ``j`` is centred at full-resolution ``f * j + (f - 1) / 2``.
    SITReg's feature level ``k`` uses ``factor = 2 ** k``; compose with
    :func:`voxel_to_centered_normalized` of the full-resolution grid to get a level's coordinates.
    """
    factors = (factor,) * ndim if isinstance(factor, int) else tuple(factor)
    if ndim not in (2, 3) or len(factors) != ndim or min(factors) < 1:
        raise ValueError(f"factor must be a positive int or {ndim} of them with ndim in (2, 3), got {factor}")
    return _diagonal_map([float(f) for f in factors], [(f - 1) / 2 for f in factors], dtype, device)


def voxel_to_normalized(
    spatial_shape: Sequence[int],
    align_corners: bool = True,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Homogeneous ``(n + 1, n + 1)`` matrix from voxel to per-axis normalised ``[-1, 1]`` coordinates.

    ``align_corners=True``: ``i -> -1 + 2 i / (N - 1)`` (voxel centres at +-1; KeyMorph keypoints and
    centre of mass; an axis of size 1 maps to 0). ``align_corners=False``: ``i -> (2 i + 1) / N - 1``
    (voxel edges at +-1; KeyMorph's ``grid_sample`` calls and real-world conversions).
    Components stay in array (``ij``) order; ``grid_sample`` wants them reversed (``.flip(-1)``).
    """
    shape = _spatial_shape(spatial_shape)
    if align_corners:
        scale = [2.0 / (s - 1) if s > 1 else 0.0 for s in shape]
        return _diagonal_map(scale, [-1.0 if s > 1 else 0.0 for s in shape], dtype, device)
    return _diagonal_map([2.0 / s for s in shape], [1.0 / s - 1.0 for s in shape], dtype, device)


def ras_to_lps(
    ndim: int = 3, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None
) -> torch.Tensor:
    """Homogeneous ``(n + 1, n + 1)`` matrix from RAS to LPS mm (its own inverse): negates the first two axes."""
    if ndim not in (2, 3):
        raise ValueError(f"ndim must be 2 or 3, got {ndim}")
    return _diagonal_map([-1.0, -1.0] + [1.0] * (ndim - 2), [0.0] * ndim, dtype, device)


def voxel_to_world(affine: torch.Tensor | np.ndarray, lps: bool = False) -> torch.Tensor:
    """Voxel to physical (mm) matrix from an image affine.

    Args:
        affine: ``(n + 1, n + 1)`` or ``(B, n + 1, n + 1)`` voxel to RAS mm matrix, as in NIfTI and
            MONAI's ``MetaTensor.affine`` (voxel indices of the array as stored).
        lps: return voxel to LPS mm (ITK's physical frame) instead of RAS.

    Returns:
        a tensor of the same shape (floating dtype kept, float64 for other inputs).
    """
    matrix = torch.as_tensor(affine).as_subclass(torch.Tensor)  # a plain tensor, also from a MetaTensor
    if not matrix.is_floating_point():
        matrix = matrix.to(torch.float64)
    n = _check_matrix(matrix, "affine")
    if not torch.isfinite(matrix).all():
        raise ValueError("affine contains non-finite values")
    return ras_to_lps(n, matrix.dtype, matrix.device) @ matrix if lps else matrix


def invert_homogeneous(matrix: torch.Tensor) -> torch.Tensor:
    """Inverse of affine homogeneous matrices ``(..., n + 1, n + 1)``: ``[A, t] -> [A^-1, -A^-1 t]``.

    The last row stays exactly ``[0, ..., 0, 1]``. Raises ``ValueError`` for a singular linear part.
    """
    n = _check_matrix(matrix, "matrix")
    linear, info = torch.linalg.inv_ex(matrix[..., :n, :n])
    if (info != 0).any():
        raise ValueError("matrix has a singular linear part and cannot be inverted")
    inverse = torch.zeros_like(matrix)
    inverse[..., :n, :n] = linear
    inverse[..., :n, n:] = -linear @ matrix[..., :n, n:]
    inverse[..., n, n] = 1
    return inverse


def change_frames(
    matrix: torch.Tensor, input_to_new: torch.Tensor, output_to_new: torch.Tensor | None = None
) -> torch.Tensor:
    """Express a map between two frames in other frames (change of basis).

    Args:
        matrix: ``(n + 1, n + 1)`` or ``(B, n + 1, n + 1)`` map ``M`` from frame ``a`` to frame ``b``
            (e.g. fixed voxels to moving voxels, the pull-back direction of a DDF).
        input_to_new: map ``C_a`` from frame ``a`` to the new input frame (e.g. fixed voxel to world).
        output_to_new: map ``C_b`` from frame ``b`` to the new output frame (e.g. moving voxel to
            world); defaults to ``input_to_new`` (one frame shared by both ends, ``C M C^-1``).

    Returns:
        ``C_b M C_a^-1`` (promoted dtype): the same map acting on new-frame coordinates (e.g. fixed
        world to moving world). Pass inverses to go back (e.g. world to voxel).
    """
    _check_matrix(matrix, "matrix")
    n = _check_matrix(input_to_new, "input_to_new", matrix.shape[-1] - 1)
    output_to_new = input_to_new if output_to_new is None else output_to_new
    _check_matrix(output_to_new, "output_to_new", n)
    dtype = torch.promote_types(torch.promote_types(matrix.dtype, input_to_new.dtype), output_to_new.dtype)
    return output_to_new.to(dtype) @ matrix.to(dtype) @ invert_homogeneous(input_to_new.to(dtype))


def _grid_term(ddf: torch.Tensor, linear: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """``linear @ ddf(x) + offset @ [x; 1]`` on the DDF grid; ``linear`` ``([B,] n, n)``, ``offset`` ``([B,] n, n+1)``.

    Computed as a sum of small terms (not as world(x + ddf) - world(x)) to keep float32 precision.
    """
    n, spatial = ddf.shape[1], ddf.shape[2:]
    linear, offset = linear.to(ddf), offset.to(ddf)
    out = (linear @ ddf.reshape(ddf.shape[0], n, -1)).reshape(-1, n, *spatial)
    batch = offset.shape[:-2]
    for axis, size in enumerate(spatial):  # offset[:, :n] @ x one axis at a time: no voxel grid is formed
        index = torch.arange(size, dtype=ddf.dtype, device=ddf.device).view(size, *([1] * (n - 1 - axis)))
        out += offset[..., axis].reshape(*batch, n, *([1] * n)) * index
    return out.add_(offset[..., n].reshape(*batch, n, *([1] * n)))


def _frame_pair(ddf: torch.Tensor, fixed_to_world: torch.Tensor, moving_to_world: torch.Tensor | None):
    """Checked ``(fixed_to_world, moving_to_world, n)``, matrices in float64 (the result follows the DDF's dtype)."""
    check_ddf(ddf)
    n = ddf.shape[1]
    _check_matrix(fixed_to_world, "fixed_to_world", n)
    moving_to_world = fixed_to_world if moving_to_world is None else moving_to_world
    _check_matrix(moving_to_world, "moving_to_world", n)
    batches = {ddf.shape[0]} | {m.shape[0] for m in (fixed_to_world, moving_to_world) if m.ndim == 3}
    if len(batches - {1}) > 1:
        raise ValueError(
            f"batch sizes of ddf {tuple(ddf.shape)}, fixed_to_world {tuple(fixed_to_world.shape)} and "
            f"moving_to_world {tuple(moving_to_world.shape)} do not broadcast"
        )
    return fixed_to_world.to(torch.float64), moving_to_world.to(torch.float64), n


def ddf_voxel_to_world(
    ddf: torch.Tensor, fixed_to_world: torch.Tensor, moving_to_world: torch.Tensor | None = None
) -> torch.Tensor:
    """Voxel DDF to world displacement vectors.

    Args:
        ddf: ``(B, n, *spatial)`` voxel DDF on the fixed grid: fixed voxel ``x`` maps to moving voxel
            ``x + ddf(x)``.
        fixed_to_world: ``(n + 1, n + 1)`` or ``(B, n + 1, n + 1)`` fixed voxel to world matrix
            (e.g. :func:`voxel_to_world`, or :func:`voxel_to_centered_normalized`).
        moving_to_world: moving voxel to world matrix; defaults to ``fixed_to_world`` (same grid).

    Returns:
        ``(B, n, *spatial)`` world displacement (world units and axis order, e.g. mm LPS for ITK) at
        every fixed voxel: ``W_m (x + ddf(x)) - W_f x``, the moving world point minus the fixed one.
    """
    fixed, moving, n = _frame_pair(ddf, fixed_to_world, moving_to_world)
    return _grid_term(ddf, moving[..., :n, :n], (moving - fixed)[..., :n, :])


def ddf_world_to_voxel(
    ddf: torch.Tensor, fixed_to_world: torch.Tensor, moving_to_world: torch.Tensor | None = None
) -> torch.Tensor:
    """World displacement vectors to a voxel DDF (inverse of :func:`ddf_voxel_to_world`).

    Args:
        ddf: ``(B, n, *spatial)`` world displacement on the fixed grid: the fixed voxel ``x`` at world
            point ``W_f x`` maps to the moving world point ``W_f x + ddf(x)``.
        fixed_to_world: ``(n + 1, n + 1)`` or ``(B, n + 1, n + 1)`` fixed voxel to world matrix.
        moving_to_world: moving voxel to world matrix; defaults to ``fixed_to_world``.

    Returns:
        ``(B, n, *spatial)`` voxel DDF ``W_m^-1 (W_f x + ddf(x)) - x`` from fixed voxels into moving voxels.
    """
    fixed, moving, n = _frame_pair(ddf, fixed_to_world, moving_to_world)
    world_to_moving = invert_homogeneous(moving)
    offset = (world_to_moving @ fixed)[..., :n, :] - torch.eye(n, n + 1, dtype=torch.float64, device=fixed.device)
    return _grid_term(ddf, world_to_moving[..., :n, :n], offset)
