"""Cubic B-spline control points -> dense displacement field, and SITReg's control-point bound.

SITReg predicts, at a coarse level with integer upsampling factor ``f_d`` per axis, a grid of cubic
B-spline *control points* (approximating spline, no prefilter) and evaluates it on the full-resolution
grid. Per axis, full-resolution voxel ``i`` sits at coarse voxel coordinate ``p = (i + 0.5) / f - 0.5``
(the grids share the left edge of voxel 0) and receives weight ``B(p - j)`` from control point ``j``::

    B(t) = 2/3 - t^2 + |t|^3 / 2   for |t| < 1
           (2 - |t|)^3 / 6         for 1 <= |t| < 2
           0                       otherwise

Control points outside the coarse grid take the value of the nearest border control point.
If every control point satisfies ``|c| <= control_point_bound(factors)``, the multilinearly interpolated
full-resolution displacement ``u`` has Lipschitz constant <= 1 (< 1 below the bound; SITReg uses 0.99 x bound)
for the infinity norm in coarse voxel units, so ``x -> x + u(x)`` is invertible and the fixed-point inversion
iteration contracts.

MONAI has no approximating (non-prefiltered) B-spline evaluation on an offset grid, so both are written
here as small separable tensor contractions.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from functools import lru_cache

import numpy as np
import torch

from monai_ext.spatial.sampling import all_finite

__all__ = ["cubic_bspline", "control_point_bound", "bspline_upsample"]


def cubic_bspline(t: np.ndarray) -> np.ndarray:
    """Centred cubic B-spline basis ``B(t)`` (support ``(-2, 2)``), elementwise."""
    a = np.abs(t)
    return np.where(a < 1, 2.0 / 3.0 - a**2 + a**3 / 2, np.where(a < 2, (2 - a) ** 3 / 6, 0.0))


def _positive_ints(values: Sequence[int], name: str) -> tuple[int, ...]:
    try:
        out = tuple(operator.index(v) for v in values)
    except TypeError:
        raise ValueError(f"{name} must be positive integers, got {values!r}") from None
    if not out or any(v < 1 for v in out):
        raise ValueError(f"{name} must be a non-empty sequence of positive integers, got {values!r}")
    return out


def control_point_bound(factors: Sequence[int]) -> float:
    """SITReg's upper bound for cubic B-spline control-point magnitudes (computed in float64).

    Args:
        factors: integer upsampling factor per spatial axis (``len`` = number of spatial dims, any >= 1),
            i.e. full-resolution voxels per control-point spacing.

    Returns:
        ``1 / L`` where ``L`` is the worst case, over all ``|c| <= 1`` and all cell corners (one-sided limits),
        of the infinity-norm (max row sum) Jacobian norm of the multilinearly interpolated upsampled
        displacement, both the displacement and the position measured in coarse (control-point) voxels.
        For equal factors this is the same as measuring both in full-resolution voxels. The bound is tight,
        also for folding: with all channels equal ``det(I + J) = 1 + div u``, and the worst control-point
        sign pattern scaled to ``(1 + eps) * bound`` gives ``det <= 0``.

    Algorithm (``compute_max_control_point_value`` of the SITReg paper's code): for every phase
    ``s_d in [0, ceil((f_d + 1) / 2))`` of the fine grid relative to the control points, the weights of the
    control points in the forward difference along axis ``a`` (scaled by ``f_a``) are summed over ``a`` and
    their absolute values summed over the control points; ``L`` is the maximum over phases. The phases are
    vectorised, the result cached.
    """
    return _bound(_positive_ints(factors, "factors"))


def _phase_weights(factor: int) -> tuple[np.ndarray, np.ndarray]:
    """Per phase, the B-spline weights of one fine voxel and of its forward difference.

    Returns two ``(n_phases, 5)`` float64 arrays (values, differences) over the at most 5 control points
    touched by a fine voxel and its successor (zero-padded).
    """
    odd = factor % 2
    size = 4 * factor - odd
    kernel = cubic_bspline(np.arange(size) / factor + ((1 + odd) / (2 * factor) - 2))
    padded = np.pad(kernel, 1)
    values, diffs = padded[:-1], np.diff(padded)
    n_phases = math.ceil((factor + 1) / 2)
    out_values = np.zeros((n_phases, 5))
    out_diffs = np.zeros((n_phases, 5))
    for s in range(n_phases):
        taps = values[s::factor]
        out_values[s, : len(taps)] = taps
        out_diffs[s, : len(taps)] = diffs[s::factor]
    return out_values, out_diffs


@lru_cache(maxsize=None)
def _bound(factors: tuple[int, ...]) -> float:
    n = len(factors)
    weights = [_phase_weights(f) for f in factors]
    values, diffs = zip(*weights)
    # chunk the phases of axis 0 so that a chunk holds at most ~4M entries of (phases..., taps...)
    rest = math.prod(v.shape[0] for v in values[1:]) * 5**n
    chunk = max(1, (1 << 22) // rest)
    letters = "abcdefgh"[:n]
    taps = "ABCDEFGH"[:n]
    equation = ",".join(f"{p}{t}" for p, t in zip(letters, taps)) + f"->{letters}{taps}"
    worst = 0.0
    for start in range(0, values[0].shape[0], chunk):
        total = 0.0
        for a in range(n):
            operands = [(diffs[d] if d == a else values[d]) for d in range(n)]
            operands[0] = operands[0][start : start + chunk]
            total = total + factors[a] * np.einsum(equation, *operands)
        worst = max(worst, float(np.abs(total).reshape(total.shape[:n] + (-1,)).sum(-1).max()))
    return 1.0 / worst


@lru_cache(maxsize=256)
def _upsampling_matrix(n_in: int, factor: int, n_out: int) -> np.ndarray:
    """``(n_out, n_in)`` float64 weights of one axis, with out-of-grid control points folded onto the border."""
    p = (np.arange(n_out) + 0.5) / factor - 0.5
    first = np.floor(p).astype(np.int64) - 1
    matrix = np.zeros((n_out, n_in))
    rows = np.arange(n_out)
    for k in range(4):
        j = first + k
        np.add.at(matrix, (rows, np.clip(j, 0, n_in - 1)), cubic_bspline(p - j))
    return matrix


def bspline_upsample(
    control_points: torch.Tensor, factors: int | Sequence[int], output_shape: Sequence[int]
) -> torch.Tensor:
    """Evaluate cubic B-spline control points on the full-resolution grid (SITReg's atomic displacement).

    Args:
        control_points: ``(B, n, *coarse_shape)``, ``n`` = 2 or 3 spatial dims; displacement control points
            in **coarse-level voxel units** (channel ``i`` along spatial axis ``i``).
        factors: integer upsampling factor (full-resolution voxels per coarse voxel), one for all axes or
            one per axis.
        output_shape: full-resolution spatial shape (length ``n``); any size, typically
            ``coarse_shape == ceil(output_shape / factors)``.

    Returns:
        DDF ``(B, n, *output_shape)`` in **full-resolution voxel units** (channel ``i`` multiplied by
        ``factors[i]``), same dtype and device as ``control_points``; the map it defines is ``x -> x + u(x)``.

    Exact, separable evaluation: per axis one small ``(out, in)`` weight matrix (border replication folded in)
    applied by a matrix product; differentiable w.r.t. ``control_points``.
    """
    if not isinstance(control_points, torch.Tensor):
        raise TypeError(f"control_points must be a torch.Tensor, got {type(control_points).__name__}")
    n = control_points.ndim - 2
    if n not in (2, 3) or control_points.shape[1] != n:
        raise ValueError(
            "control_points must have shape (B, n, *coarse_shape) with n = len(coarse_shape) in (2, 3), "
            f"got {tuple(control_points.shape)}"
        )
    if not control_points.is_floating_point():
        raise ValueError(f"control_points must be floating point, got {control_points.dtype}")
    if any(s < 1 for s in control_points.shape[2:]):
        raise ValueError(f"control_points has an empty spatial axis: {tuple(control_points.shape)}")
    if not all_finite(control_points.detach()):
        raise ValueError("control_points contains non-finite values")
    factors = _positive_ints([factors] * n if np.ndim(factors) == 0 else factors, "factors")
    if len(factors) != n:
        raise ValueError(f"factors must be one integer or {n} integers, got {factors}")
    output_shape = _positive_ints(output_shape, "output_shape")
    if len(output_shape) != n:
        raise ValueError(f"output_shape must have {n} entries (spatial dims of control_points), got {output_shape}")

    scale = torch.tensor(factors, dtype=control_points.dtype, device=control_points.device)
    out = control_points * scale.view(1, n, *([1] * n))
    # last axis first, each contraction a (batched) matrix product on the tensor's own layout (no permuted copies)
    for axis in reversed(range(n)):
        weights = torch.from_numpy(_upsampling_matrix(out.shape[2 + axis], factors[axis], output_shape[axis])).to(out)
        lead, trail = out.shape[: 2 + axis], out.shape[3 + axis :]
        if trail:
            folded = out.reshape(-1, out.shape[2 + axis], math.prod(trail))
            out = torch.matmul(weights, folded).view(*lead, weights.shape[0], *trail)
        else:
            out = torch.matmul(out, weights.T)
    return out
