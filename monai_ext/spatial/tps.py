"""Thin-plate splines (TPS): regularised fit on corresponding points and chunked evaluation (KeyMorph ``TPS``).

A TPS maps a point ``p`` (``n`` = 2 or 3 coordinates, array-axis order) to

    ``f(p) = a_0 + A p + sum_k w_k U(|p - c_k|)``

with control points ``c_k``. The parameters are stored as ``theta`` ``(B, K + n + 1, n)``: rows ``0..K-1``
are the spline weights ``w_k``, row ``K`` the constant ``a_0``, rows ``K+1..K+n`` the linear part (row
``K+1+i`` multiplies coordinate ``i``); column ``d`` is output coordinate ``d``. This is the layout of
KeyMorph's ``theta``, so released thetas and fits are interchangeable. Units are those of the points.

Kernels (``kernel`` argument; the fit and its evaluation must use the same one):

* ``"thin_plate"`` (default): KeyMorph's ``U = r^2 ln(r + 1e-6)`` with ``r = sqrt(|p - c|^2 + 1e-6)``. This is
  the 2-D thin-plate kernel, which KeyMorph uses unchanged in 3-D; the offsets are kept because released
  KeyMorph / BrainMorph models were trained with exactly this map (``U(c, c) = -6.9e-6``, not 0).
* ``"biharmonic"``: ``U = -r``, the fundamental solution of the biharmonic operator in 3-D (the sign makes
  the kernel conditionally positive definite, so that ``lmbda > 0`` smooths).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Literal

import torch

from monai_ext.spatial.affine import check_point_sets, check_spread

__all__ = ["fit_tps", "tps_transform_points", "tps_dense"]

Kernel = Literal["thin_plate", "biharmonic"]


def fit_tps(
    control: torch.Tensor,
    target: torch.Tensor,
    lmbda: float | torch.Tensor = 0.0,
    weights: torch.Tensor | None = None,
    kernel: Kernel = "thin_plate",
) -> torch.Tensor:
    """Fit a TPS with ``f(control_k) ~ target_k``.

    Solves, for all output coordinates at once (the same matrix for each), the ``(K + n + 1)`` system

        ``[[U + lmbda diag(1 / w), P], [P^T, 0]] [s; a] = [target; 0]``,  ``U_ij = U(|c_i - c_j|)``,  ``P = [1, c]``

    (``s`` the spline weights, ``a`` the affine part), with ``torch.linalg.solve`` in the inputs' dtype on
    their device (KeyMorph assembles it on the CPU).
    ``lmbda = 0`` interpolates exactly; ``lmbda -> inf`` tends to the (weighted) least-squares affine fit; an
    affine target map is reproduced exactly for any ``lmbda``. Weights make the regularisation per point,
    ``lmbda / w_k`` (heavier points are fitted more closely); they are used as given, so their scale
    trades off against ``lmbda``. KeyMorph's weighted TPS adds the elementwise reciprocal of the full matrix
    ``diag(w) + 1e-6`` (``1e6 * lmbda`` off the diagonal), which for ``lmbda > 0`` reduces to the unweighted
    affine fit; that bug is not reproduced (for ``lmbda = 0`` both agree).

    Args:
        control: ``(B, K, n)`` control points (the TPS's input space), ``K >= n + 2``, not collinear (2-D) /
            coplanar (3-D), distinct when ``lmbda = 0``.
        target: ``(B, K, n)`` values at the control points (output space, usually the same units).
        lmbda: regularisation ``>= 0``, a scalar or ``(B,)``.
        weights: optional ``(B, K)`` positive per-point weights.
        kernel: ``"thin_plate"`` (KeyMorph-compatible) or ``"biharmonic"``, see the module docstring.

    Returns:
        ``theta`` ``(B, K + n + 1, n)`` in the layout of the module docstring.
    """
    check_point_sets(control, target, weights, 2, names=("control", "target"))
    if weights is not None and (weights <= 0).any():
        raise ValueError("weights must be > 0 for a TPS (a point's regularisation is lmbda / weight)")
    check_spread(control, None, control.shape[-1], "control")
    batch, k, n = control.shape
    lmbda = torch.as_tensor(lmbda, dtype=control.dtype, device=control.device)
    if lmbda.ndim > 1 or lmbda.numel() not in (1, batch):
        raise ValueError(f"lmbda must be a scalar or ({batch},), got shape {tuple(lmbda.shape)}")
    if not torch.isfinite(lmbda).all() or (lmbda < 0).any():
        raise ValueError("lmbda must be finite and >= 0")
    penalty = lmbda.reshape(-1, 1).expand(batch, k)
    if weights is not None:
        penalty = penalty / weights.to(control.dtype)
    affine_basis = torch.cat([torch.ones_like(control[..., :1]), control], dim=2)
    system = torch.cat(
        [
            torch.cat([_kernel(control, control, kernel) + torch.diag_embed(penalty), affine_basis], dim=2),
            torch.cat([affine_basis.transpose(1, 2), control.new_zeros(batch, n + 1, n + 1)], dim=2),
        ],
        dim=1,
    )
    rhs = torch.cat([target, target.new_zeros(batch, n + 1, n)], dim=1)
    try:
        theta = torch.linalg.solve(system, rhs)
    except torch.linalg.LinAlgError as error:
        raise ValueError("the TPS system is singular (duplicate control points with lmbda = 0?)") from error
    if not torch.isfinite(theta).all():
        raise ValueError("the TPS system is singular (duplicate control points with lmbda = 0?)")
    return theta


def tps_transform_points(
    theta: torch.Tensor,
    control: torch.Tensor,
    points: torch.Tensor,
    chunk_size: int = 65536,
    kernel: Kernel = "thin_plate",
) -> torch.Tensor:
    """Evaluate a TPS at ``points`` ``(B, N, n)`` (same coordinates as ``control``); returns ``(B, N, n)``.

    ``theta`` ``(B, K + n + 1, n)`` and ``control`` ``(B, K, n)`` come from :func:`fit_tps` (same ``kernel``).
    Points are processed ``chunk_size`` at a time (and the kernel in cache-sized blocks, :func:`_evaluate`), so
    the largest temporaries are a few ``(B, chunk_size, K)`` tensors at most. A batch size of 1 in ``points`` is
    broadcast.
    """
    _check_theta(theta, control, chunk_size)
    if points.ndim != 3 or points.shape[-1] != control.shape[-1] or points.shape[0] not in (1, control.shape[0]):
        raise ValueError(
            f"points must be (B, N, {control.shape[-1]}) with B in (1, {control.shape[0]}), got {tuple(points.shape)}"
        )
    if not torch.isfinite(points).all():
        raise ValueError("points contains non-finite values")
    chunks = [_evaluate(theta, control, chunk, kernel) for chunk in points.split(chunk_size, dim=1)]
    return torch.cat(chunks, dim=1)


def tps_dense(
    theta: torch.Tensor,
    control: torch.Tensor,
    spatial_shape: Sequence[int],
    to_points: Callable[[torch.Tensor], torch.Tensor] | None = None,
    chunk_size: int = 65536,
    kernel: Kernel = "thin_plate",
) -> torch.Tensor:
    """Evaluate a TPS at every voxel of a grid without materialising a ``(K, prod(spatial_shape))`` tensor.

    Args:
        theta: ``(B, K + n + 1, n)`` from :func:`fit_tps`.
        control: ``(B, K, n)`` its control points.
        spatial_shape: the grid shape, length ``n``.
        to_points: maps voxel indices ``(M, n)`` (array-axis order, float in ``theta``'s dtype) of one chunk to
            the TPS's input coordinates, ``(M, n)`` or ``(B, M, n)``; identity (voxel units) if None. E.g.
            KeyMorph's normalized coordinates are ``lambda v: 2 * v / (size - 1) - 1`` with ``size`` the shape.
        chunk_size: voxels per chunk; the largest temporaries are a few ``(B, min(chunk_size, block), K)``
            tensors (``block`` from :func:`_evaluate`: about 1 MB each), plus the output (256^3 voxels, float32:
            0.2 GB, held twice while the chunks are concatenated).
        kernel: as in :func:`fit_tps`.

    Returns:
        ``(B, *spatial_shape, n)``: the mapped coordinates ``f(to_points(v))`` (in the TPS's output units and
        axis order, not a displacement). For KeyMorph's fixed -> moving TPS these are normalized moving-image
        ``ij`` coordinates; reverse the last axis for ``grid_sample``, or convert to voxels and subtract the
        grid for a DDF. For gradients on large grids, wrap the call in ``torch.utils.checkpoint``.
    """
    _check_theta(theta, control, chunk_size)
    batch, _, n = control.shape
    if len(spatial_shape) != n or any(int(s) < 1 for s in spatial_shape):
        raise ValueError(f"spatial_shape must have {n} positive sizes, got {tuple(spatial_shape)}")
    shape = tuple(int(s) for s in spatial_shape)
    total = math.prod(shape)
    chunks = []
    for start in range(0, total, chunk_size):
        index = torch.arange(start, min(start + chunk_size, total), device=theta.device)
        voxels = torch.stack(torch.unravel_index(index, shape), dim=-1).to(theta.dtype)
        points = voxels if to_points is None else to_points(voxels)
        if (
            points.shape[-2:] != voxels.shape
            or points.ndim not in (2, 3)
            or points.ndim == 3
            and points.shape[0] not in (1, batch)
        ):
            raise ValueError(
                f"to_points must return ({len(index)}, {n}) or ({batch}, {len(index)}, {n}), got {tuple(points.shape)}"
            )
        chunks.append(_evaluate(theta, control, points.expand(batch, *voxels.shape), kernel))
    return torch.cat(chunks, dim=1).reshape(batch, *shape, n)


def _check_theta(theta: torch.Tensor, control: torch.Tensor, chunk_size: int) -> None:
    if control.ndim != 3 or control.shape[-1] not in (2, 3):
        raise ValueError(f"control must be (B, K, n) with n in (2, 3), got {tuple(control.shape)}")
    batch, k, n = control.shape
    if theta.shape != (batch, k + n + 1, n):
        raise ValueError(
            f"theta must be ({batch}, {k + n + 1}, {n}) for control {tuple(control.shape)}, got {tuple(theta.shape)}"
        )
    if int(chunk_size) < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")


def _kernel(points: torch.Tensor, control: torch.Tensor, kernel: Kernel) -> torch.Tensor:
    """``U(|p - c|)`` for points ``(B, N, n)`` and control points ``(B, K, n)``: ``(B, N, K)``.

    ``torch.cdist`` without the matrix-product shortcut: exact differences (no ``|p|^2 + |c|^2 - 2 p.c``
    cancellation), no ``(B, N, K, n)`` temporary, and a zero (not NaN) gradient at coincident points.
    """
    if kernel not in ("thin_plate", "biharmonic"):
        raise ValueError(f"kernel must be 'thin_plate' or 'biharmonic', got {kernel!r}")
    dist = torch.cdist(points, control, compute_mode="donot_use_mm_for_euclid_dist")
    if kernel == "biharmonic":
        return -dist
    sq_r = dist.square() + 1e-6
    return sq_r * torch.log(sq_r.sqrt() + 1e-6)


_BLOCK_ELEMENTS = 2**18
"""Elements of one ``(B, block, K)`` kernel block: small enough for the CPU's L2 cache (a 256^3 TPS grid runs about
three times faster than in 65536-point blocks), large enough to amortise the per-operation overhead."""


def _evaluate(theta: torch.Tensor, control: torch.Tensor, points: torch.Tensor, kernel: Kernel) -> torch.Tensor:
    """TPS evaluation of points ``(B, N, n)`` -> ``(B, N, n)``, the kernel in blocks of ``_BLOCK_ELEMENTS``.

    Every point's value depends only on its own kernel row: the blocks change at most the rounding of the matrix
    products (nothing for blocks of more than a few rows).
    """
    b, k = control.shape[:2]
    values = [
        _kernel(block, control, kernel) @ theta[:, :k] + block @ theta[:, k + 1 :] + theta[:, k : k + 1]
        for block in points.split(max(1, _BLOCK_ELEMENTS // (b * k)), dim=1)
    ]
    return torch.cat(values, dim=1)
