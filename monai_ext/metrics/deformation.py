"""Deformation quality metrics: Jacobian determinants, folding, SDlogJ, NDV, inverse consistency, TRE.

All functions take voxel DDFs ``(B, n, *spatial)`` (channel ``i`` = displacement along spatial axis
``i``, voxel units) describing the map ``phi(x) = x + u(x)`` from the fixed grid into the moving
image (see :mod:`monai_ext.spatial.sampling`). Determinants are of the Jacobian of ``phi`` in voxel
units (identity -> 1); they are invariant to the voxel size because each row and column scale cancels.

Written by hand because MONAI has no finite-difference Jacobian with the schemes needed for parity
with the SITReg evaluator and the NDV of Liu et al. (IJCV 2024, "digital diffeomorphism").
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import product

import torch

from monai_ext.spatial.sampling import check_ddf, compose, sample, sample_points, voxel_grid

__all__ = [
    "jacobian_schemes",
    "jacobian_determinant",
    "folding_fraction",
    "sdlogj",
    "non_diffeomorphic_volume",
    "sampled_jacobian_determinant",
    "inverse_consistency_error",
    "target_registration_error",
]

# Stencil: (margin_low, margin_high, columns); column d is a list of (coefficient, offset) pairs and
# J[:, d] = sum coefficient * T(x + offset) over the output window x in [margin_low, N - 1 - margin_high].
_Stencil = tuple[int, int, list[list[tuple[float, tuple[int, ...]]]]]

# the two "star" (tetrahedral) schemes of Liu et al.; both give det = 2 for the identity
_STAR_OFFSETS = {
    "star1": ((-1, -1, 0), (-1, 0, -1), (0, -1, -1)),
    "star2": ((1, 1, 0), (0, 1, 1), (1, 0, 1)),
}


def _unit(n: int, axis: int, step: int = 1) -> tuple[int, ...]:
    return tuple(step if a == axis else 0 for a in range(n))


def _stencil(scheme: str, n: int) -> _Stencil:
    zero = (0,) * n
    if scheme == "central":
        return 1, 1, [[(0.5, _unit(n, d)), (-0.5, _unit(n, d, -1))] for d in range(n)]
    if scheme in ("forward", "crop_last"):
        return 0, 1, [[(1.0, _unit(n, d)), (-1.0, zero)] for d in range(n)]
    if scheme == "avg":
        # forward difference along d on each of the 2**(n-1) cell edges parallel to d, averaged
        weight = 1.0 / 2 ** (n - 1)
        columns = []
        for d in range(n):
            starts = [c for c in product((0, 1), repeat=n) if c[d] == 0]
            ends = [tuple(a + b for a, b in zip(c, _unit(n, d))) for c in starts]
            columns.append([(weight, c) for c in ends] + [(-weight, c) for c in starts])
        return 0, 1, columns
    if len(scheme) == n and set(scheme) <= {"p", "m"}:
        return 1, 1, [
            [(1.0, _unit(n, d)), (-1.0, zero)] if s == "p" else [(1.0, zero), (-1.0, _unit(n, d, -1))]
            for d, s in enumerate(scheme)
        ]
    if scheme in _STAR_OFFSETS and n == 3:
        return 1, 1, [[(1.0, offset), (-1.0, zero)] for offset in _STAR_OFFSETS[scheme]]
    raise ValueError(f"scheme must be one of {jacobian_schemes(n)} for {n}-D fields, got {scheme!r}")


def jacobian_schemes(n: int = 3) -> tuple[str, ...]:
    """Names of the finite-difference schemes :func:`jacobian_determinant` accepts for ``n``-D fields.

    * ``"central"``: central differences on the interior (output ``N - 2`` per axis);
    * one-sided ``"ppp" .. "mmm"`` (``"pp" .. "mm"`` in 2-D): letter ``a`` chooses forward (``p``,
      ``T(i+1) - T(i)``) or backward (``m``, ``T(i) - T(i-1)``) differences along axis ``a``, on the interior;
    * ``"star1"``, ``"star2"`` (3-D): the tetrahedral schemes of Liu et al. on the interior (identity -> 2);
    * ``"forward"`` (alias ``"crop_last"``, the SITReg evaluator's name): forward differences at voxels
      ``0 .. N - 2`` (output ``N - 1``);
    * ``"avg"``: Jacobian of the multilinear map at cell centres (forward differences averaged over the
      ``2**(n-1)`` parallel cell edges; output ``N - 1``).
    """
    one_sided = tuple("".join(s) for s in product("pm", repeat=n))
    return ("central", "forward", "crop_last", "avg") + one_sided + (tuple(_STAR_OFFSETS) if n == 3 else ())


def _window(volume: torch.Tensor, offset: Sequence[int], low: int, high: int) -> torch.Tensor:
    index = [slice(None), slice(None)]
    index += [slice(low + o, size - high + o) for o, size in zip(offset, volume.shape[2:])]
    return volume[tuple(index)]


def jacobian_determinant(ddf: torch.Tensor, scheme: str = "central") -> torch.Tensor:
    """Finite-difference Jacobian determinant of ``phi(x) = x + ddf(x)`` on the voxel grid.

    Args:
        ddf: ``(B, n, *spatial)`` voxel DDF, ``n`` in (2, 3).
        scheme: one of :func:`jacobian_schemes` (``"central"`` by default, the common Learn2Reg practice).

    Returns:
        ``(B, 1, *spatial')`` with ``spatial' = spatial - 2`` for interior schemes (``central``, one-sided,
        star) and ``spatial - 1`` for ``forward`` / ``crop_last`` / ``avg``.
    """
    check_ddf(ddf)
    n = ddf.ndim - 2
    low, high, columns = _stencil(scheme, n)
    if min(ddf.shape[2:]) < low + high + 1:
        raise ValueError(
            f"ddf needs at least {low + high + 1} voxels per axis for scheme {scheme!r}, got {tuple(ddf.shape)}"
        )
    # slabs of output rows along the first spatial axis (each reads its rows plus the stencil's margins), so that
    # the temporaries stay small for fields of any size (the same values as for the whole field)
    rows = ddf.shape[2] - low - high
    step = max(1, _DETERMINANT_BLOCK // max(1, ddf.shape[0] * ddf.shape[3:].numel()))
    blocks = []
    for first in range(0, rows, step):
        slab = ddf[:, :, first : min(rows, first + step) + low + high]
        grid = voxel_grid(slab.shape[2:], slab.dtype, slab.device)
        grid[0] += first
        mapping = slab + grid
        cols = [sum(coef * _window(mapping, offset, low, high) for coef, offset in column) for column in columns]
        blocks.append(_determinant(cols))
    return torch.cat(blocks, dim=2)


# output voxels per slab of jacobian_determinant (temporaries of a few tens of MB)
_DETERMINANT_BLOCK = 1 << 20


def _determinant(cols: list[torch.Tensor]) -> torch.Tensor:
    """``(B, 1, *spatial)`` determinants of the matrices whose column ``d`` is ``cols[d]`` ``(B, n, *spatial)``, by
    cofactor expansion (``torch.linalg.det`` would need the ``n x n`` matrices gathered voxel by voxel)."""
    if len(cols) == 2:
        (a, c), (b, d) = (col.unbind(1) for col in cols)
        return (a * d - b * c).unsqueeze(1)
    (a, d, g), (b, e, h), (c, f, i) = (col.unbind(1) for col in cols)  # rows a b c / d e f / g h i
    return (a * (e * i - f * h) - b * (d * i - f * g) + c * (d * h - e * g)).unsqueeze(1)


def folding_fraction(ddf: torch.Tensor, scheme: str = "central") -> torch.Tensor:
    """Fraction of determinants ``<= 0`` per batch item, ``(B,)``.

    Default: central differences on the interior (the common Learn2Reg practice); any scheme of
    :func:`jacobian_determinant` may be chosen (``"forward"`` is the SITReg evaluator's grid variant).
    """
    det = jacobian_determinant(ddf, scheme)
    return (det <= 0).flatten(1).to(ddf.dtype).mean(1)


def sdlogj(ddf: torch.Tensor, scheme: str = "central", clip: float = 1e-9) -> torch.Tensor:
    """Standard deviation of ``log det J`` per batch item, ``(B,)``.

    As in the Learn2Reg evaluation: central-difference determinants on the interior clipped to
    ``[clip, 1 / clip]`` (default ``1e-9``) before the log; population standard deviation (numpy's default).
    Note SITReg's evaluator reports ``det_std`` (std of det J, not of its log) instead.
    """
    det = jacobian_determinant(ddf, scheme).clamp(min=clip, max=1.0 / clip)
    return det.log().flatten(1).std(1, unbiased=False)


def non_diffeomorphic_volume(ddf: torch.Tensor, reduction: str = "none", percentage: bool = False) -> torch.Tensor:
    """Non-diffeomorphic volume (NDV) of Liu et al. (IJCV 2024) for 3-D voxel DDFs.

    ``NDV = sum over interior voxels and the 10 schemes (8 one-sided + star1 + star2) of max(-det, 0) / 12``
    (a volume in voxels). With ``percentage=True`` it is divided by the number of grid voxels and multiplied
    by 100, as in Liu et al.'s ``digital_diffeomorphism`` tool ("NDV (%)" of the LUMIR leaderboard; SITReg's
    loss has no percentage). Like SITReg's loss only interior voxels contribute; that tool pads the field first,
    so border voxels may add a little to its value.

    Args:
        ddf: ``(B, 3, D, H, W)`` voxel DDF.
        reduction: ``"none"`` -> ``(B,)``, ``"sum"`` -> scalar summed over the batch (SITReg's NDV loss),
            ``"mean"`` -> scalar batch mean.
        percentage: report ``100 * NDV / (D * H * W)`` per item.
    """
    check_ddf(ddf)
    if ddf.shape[1] != 3:
        raise ValueError(f"ddf must be a 3-D field (B, 3, D, H, W) for the NDV, got {tuple(ddf.shape)}")
    if reduction not in ("none", "sum", "mean"):
        raise ValueError(f"reduction must be 'none', 'sum' or 'mean', got {reduction!r}")
    schemes = ["".join(s) for s in product("pm", repeat=3)] + list(_STAR_OFFSETS)
    ndv = sum(torch.relu(-jacobian_determinant(ddf, s)).flatten(1).sum(1) for s in schemes) / 12
    if percentage:
        ndv = 100 * ndv / ddf.shape[2:].numel()
    return {"none": ndv, "sum": ndv.sum(), "mean": ndv.mean()}[reduction]


def sampled_jacobian_determinant(ddf: torch.Tensor, points_voxel: torch.Tensor) -> torch.Tensor:
    """Determinant of the Jacobian of the continuous map ``x + u(x)`` (``u`` multilinear, border) at points.

    The derivative along axis ``d`` is the one-sided (right) derivative of the multilinear interpolant,
    i.e. the limit of the forward finite differences the SITReg evaluator uses (``sampled_determinant``):
    within a cell it is the forward difference of ``u`` along ``d`` interpolated linearly along the other
    axes; it is 0 where the point is outside ``[0, N_d - 1)`` along ``d`` (border extrapolation).

    Args:
        ddf: ``(B, n, *spatial)`` voxel DDF.
        points_voxel: ``(B, N, n)`` voxel coordinates of the DDF's grid.

    Returns:
        ``(B, N)`` determinants.
    """
    check_ddf(ddf)
    n = ddf.ndim - 2
    if points_voxel.ndim != 3 or points_voxel.shape[-1] != n or points_voxel.shape[0] not in (1, ddf.shape[0]):
        raise ValueError(f"points_voxel must be (B, N, {n}) voxel coordinates, got {tuple(points_voxel.shape)}")
    if min(ddf.shape[2:]) < 2:
        raise ValueError(f"ddf needs at least 2 voxels per axis, got {tuple(ddf.shape)}")
    if not torch.isfinite(points_voxel).all():
        raise ValueError("points_voxel contains non-finite values")
    points = points_voxel.to(ddf.dtype).transpose(1, 2)  # (B, n, N)
    cols = []
    for d in range(n):
        size = ddf.shape[2 + d]
        diff = ddf.narrow(2 + d, 1, size - 1) - ddf.narrow(2 + d, 0, size - 1)  # forward differences along d
        cell = points[:, d].floor().clamp(0, size - 2)
        inside = (points[:, d] >= 0) & (points[:, d] < size - 1)
        coords = torch.cat([points[:, :d], cell[:, None], points[:, d + 1 :]], dim=1)
        column = sample(diff, coords) * inside[:, None].to(ddf.dtype)  # (B, n, N), derivative of u
        cols.append(column + torch.eye(n, dtype=ddf.dtype, device=ddf.device)[:, d, None])
    return torch.linalg.det(torch.stack(cols, dim=2).movedim(-1, 1))


def inverse_consistency_error(forward_ddf: torch.Tensor, inverse_ddf: torch.Tensor) -> dict[str, torch.Tensor]:
    """Inverse consistency of a forward / inverse DDF pair on the same grid (as SITReg's evaluation), voxel units.

    ``r = compose(forward, inverse)`` is the displacement of ``phi_f o phi_i - id`` (linear interpolation,
    border) and ``reverse`` that of ``phi_i o phi_f - id``.

    Returns:
        dict of ``(B,)`` tensors: ``mse`` (mean of ``r**2`` over channels and voxels), ``mae`` (mean ``|r|``),
        ``max`` (largest ``|r_c|`` over channels and voxels), and ``reverse_mse``, ``reverse_mae``, ``reverse_max``.
    """
    check_ddf(forward_ddf, "forward_ddf")
    check_ddf(inverse_ddf, "inverse_ddf")
    if forward_ddf.shape != inverse_ddf.shape:
        raise ValueError(f"forward_ddf {tuple(forward_ddf.shape)} and inverse_ddf {tuple(inverse_ddf.shape)} differ")
    out = {}
    for prefix, residual in (("", compose(forward_ddf, inverse_ddf)), ("reverse_", compose(inverse_ddf, forward_ddf))):
        flat = residual.flatten(1)
        out[prefix + "mse"] = flat.square().mean(1)
        out[prefix + "mae"] = flat.abs().mean(1)
        out[prefix + "max"] = flat.abs().amax(1)
    return out


def target_registration_error(
    ddf: torch.Tensor,
    fixed_points_voxel: torch.Tensor,
    moving_points_voxel: torch.Tensor,
    spacing: Sequence[float] | torch.Tensor | None = None,
) -> torch.Tensor:
    """Distance between fixed landmarks mapped by the DDF and the corresponding moving landmarks.

    Args:
        ddf: ``(B, n, *spatial)`` voxel DDF on the fixed grid, mapping fixed voxels into the moving image.
        fixed_points_voxel: ``(B, N, n)`` fixed-image landmarks (voxel coordinates of the fixed grid).
        moving_points_voxel: ``(B, N, n)`` corresponding moving-image landmarks (moving voxel coordinates).
        spacing: voxel size per axis (mm) of the moving image, used to convert the residual to mm;
            ``None`` gives voxel units.

    Returns:
        ``(B, N)`` distances ``|| s * (p + u(p) - q) ||`` (``u`` multilinearly interpolated, border).
    """
    check_ddf(ddf)
    n = ddf.ndim - 2
    for name, pts in (("fixed_points_voxel", fixed_points_voxel), ("moving_points_voxel", moving_points_voxel)):
        if pts.ndim != 3 or pts.shape[-1] != n or pts.shape[1] < 1:
            raise ValueError(f"{name} must be (B, N >= 1, {n}) voxel coordinates, got {tuple(pts.shape)}")
        if not torch.isfinite(pts).all():
            raise ValueError(f"{name} contains non-finite values")
    if fixed_points_voxel.shape != moving_points_voxel.shape:
        raise ValueError(
            f"fixed_points_voxel {tuple(fixed_points_voxel.shape)} and moving_points_voxel "
            f"{tuple(moving_points_voxel.shape)} must have the same shape"
        )
    fixed = fixed_points_voxel.to(ddf.dtype)
    residual = fixed + sample_points(ddf, fixed) - moving_points_voxel.to(ddf.dtype)
    if spacing is not None:
        spacing = torch.as_tensor(spacing, dtype=ddf.dtype, device=ddf.device)
        if spacing.shape != (n,) or not (spacing > 0).all():
            raise ValueError(f"spacing must hold {n} positive voxel sizes, got {spacing.tolist()}")
        residual = residual * spacing
    return residual.norm(dim=-1)
