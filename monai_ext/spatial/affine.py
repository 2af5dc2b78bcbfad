"""Affine maps: the SITReg matrix parameterisation and closed-form point-set fits (KeyMorph aligners).

All matrices are homogeneous ``(B, n + 1, n + 1)`` acting on column vectors ``[p_0, ..., p_{n-1}, 1]``
with ``p`` in array-axis order (``ij``); ``n`` is 2 or 3. The functions are unit-agnostic: a fit
returns a matrix in whatever units (voxels, normalized ``[-1, 1]``, millimetres) the points are given in.
Everything runs in the inputs' dtype on their device and is differentiable.
"""

from __future__ import annotations

import torch

__all__ = [
    "affine_matrix_from_parameters",
    "check_point_sets",
    "check_spread",
    "fit_affine",
    "fit_rigid",
    "transform_points",
]


def affine_matrix_from_parameters(params: torch.Tensor) -> torch.Tensor:
    """SITReg's affine generator (``generate_affine_transformation_matrix``, "full" type).

    Args:
        params: ``(B, 12)`` in 3-D, ``(B, 6)`` in 2-D, laid out as
            ``[n log-scales, n(n-1)/2 shears | n(n-1)/2 rotations | n translations]``.

    Returns:
        ``(B, n + 1, n + 1)`` matrix of ``x -> S R (x + t)`` where ``S = expm(Sym)`` (``Sym`` has the
        log-scales on the diagonal and the shears at the upper-triangular positions ``(0,1), (0,2), (1,2)``,
        mirrored), ``R = expm(Skew)`` (``Skew[0,1] = r_0, Skew[0,2] = r_1, Skew[1,2] = r_2``, minus the
        transpose) and ``t`` the translations. In 2-D a rotation ``r`` gives ``[[cos r, sin r], [-sin r, cos r]]``.
        Units are those of the coordinates the matrix is applied to (SITReg: centred-normalised world).
    """
    if params.ndim != 2 or params.shape[1] not in (6, 12):
        raise ValueError(f"params must be (B, 6) for 2-D or (B, 12) for 3-D, got {tuple(params.shape)}")
    if not torch.isfinite(params).all():
        raise ValueError("params contains non-finite values")
    n = 3 if params.shape[1] == 12 else 2
    n_off = n * (n - 1) // 2
    log_scales, shears, rotations, translations = params.split([n, n_off, n_off, n], dim=1)
    rows, cols = torch.triu_indices(n, n, offset=1, device=params.device)
    upper = params.new_zeros(params.shape[0], n, n)
    upper[:, rows, cols] = shears
    symmetric = upper + upper.transpose(1, 2) + torch.diag_embed(log_scales)
    skew = params.new_zeros(params.shape[0], n, n)
    skew[:, rows, cols] = rotations
    skew = skew - skew.transpose(1, 2)
    linear = torch.linalg.matrix_exp(symmetric) @ torch.linalg.matrix_exp(skew)
    return _homogeneous(linear, (linear @ translations[..., None])[..., 0])


def check_point_sets(
    source: torch.Tensor,
    target: torch.Tensor,
    weights: torch.Tensor | None = None,
    min_points_offset: int = 1,
    names: tuple[str, str] = ("source", "target"),
) -> None:
    """Raise ``ValueError`` unless the inputs are valid corresponding point sets.

    ``source`` and ``target`` must be finite ``(B, K, n)`` tensors of the same shape with ``n`` in (2, 3) and
    ``K >= n + min_points_offset``; ``weights``, if given, finite ``(B, K)``, ``>= 0``, positive sum per batch.
    """
    for name, value in zip(names, (source, target)):
        if not isinstance(value, torch.Tensor) or value.ndim != 3 or value.shape[-1] not in (2, 3):
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(f"{name} must be a (B, K, n) tensor with n in (2, 3), got {shape}")
        if not torch.isfinite(value).all():
            raise ValueError(f"{name} contains non-finite values")
    if source.shape != target.shape:
        raise ValueError(
            f"{names[0]} {tuple(source.shape)} and {names[1]} {tuple(target.shape)} must have the same shape"
        )
    batch, k, n = source.shape
    if k < n + min_points_offset:
        raise ValueError(f"{names[0]} has {k} points; at least {n + min_points_offset} are needed in {n}-D")
    if weights is not None:
        if weights.shape != (batch, k):
            raise ValueError(f"weights must be ({batch}, {k}), got {tuple(weights.shape)}")
        if not torch.isfinite(weights).all() or (weights < 0).any():
            raise ValueError("weights must be finite and >= 0")
        if (weights.sum(1) <= 0).any():
            raise ValueError("weights must have a positive sum in every batch element")


def check_spread(points: torch.Tensor, weights: torch.Tensor | None, min_rank: int, name: str) -> None:
    """Raise ``ValueError`` if the (weighted) centred point cloud ``(B, K, n)`` has numerical rank ``< min_rank``.

    The rank counts singular values of ``sqrt(w) (p - c)`` above ``sqrt(eps) * max singular value`` (``eps`` of
    the dtype): below that, the normal equations of a fit lose all precision. ``min_rank = n`` rejects
    collinear (2-D) / coplanar (3-D) sets, ``n - 1`` rejects coincident (2-D) / collinear (3-D) sets.
    """
    with torch.no_grad():
        w = _normalized_weights(points, weights)
        centred = (points - (w * points).sum(1, keepdim=True)) * w.sqrt()
        singular = torch.linalg.svdvals(centred)
        tol = singular[:, 0] * torch.finfo(points.dtype).eps ** 0.5
        if (singular[:, min_rank - 1] <= tol).any():
            n = points.shape[-1]
            kind = {(2, 2): "collinear", (3, 3): "coplanar", (2, 1): "coincident", (3, 2): "collinear"}[(n, min_rank)]
            raise ValueError(f"{name} points are degenerate (numerically {kind} or worse): the fit is not determined")


def fit_affine(source: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Closed-form (weighted) least-squares affine map from ``source`` to ``target`` points.

    Minimises ``sum_k w_k |A p_k + t - q_k|^2`` (KeyMorph's ``AffineKeypointAligner.fit``, solved here on
    weight-centred points, which is the same optimum with better conditioning; any batch size).

    Args:
        source: ``(B, K, n)`` points ``p``, ``K >= n + 1`` and not collinear (2-D) / coplanar (3-D).
        target: ``(B, K, n)`` corresponding points ``q``, same units.
        weights: optional ``(B, K)`` non-negative weights (scale-free).

    Returns:
        ``(B, n + 1, n + 1)`` homogeneous matrix mapping source coordinates to target coordinates.
    """
    check_point_sets(source, target, weights, 1)
    n = source.shape[-1]
    w = _normalized_weights(source, weights)
    check_spread(source, weights, n, "source")
    source_mean, target_mean = (w * source).sum(1), (w * target).sum(1)
    src, tgt = source - source_mean[:, None], target - target_mean[:, None]
    cov_ss = src.transpose(1, 2) @ (w * src)
    cov_ts = tgt.transpose(1, 2) @ (w * src)
    linear = torch.linalg.solve(cov_ss, cov_ts, left=False)
    return _homogeneous(linear, target_mean - (linear @ source_mean[..., None])[..., 0])


def fit_rigid(source: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Closed-form (weighted) least-squares rigid map (rotation + translation), Kabsch / Arun.

    Minimises ``sum_k w_k |R p_k + t - q_k|^2`` over proper rotations (``det R = +1``). With the SVD
    ``sum_k w_k (q_k - c_q)(p_k - c_p)^T = U S V^T``, ``R = U diag(1, ..., 1, d) V^T`` with ``d = det(U V^T)``:
    when the unconstrained optimum is a reflection, the singular vector of the *smallest* singular value is
    flipped (standard Kabsch, the least-squares optimum). This deliberately differs from KeyMorph's
    ``RigidKeypointAligner``, which flips the last *row* of V (a proper rotation but not the optimum), and
    from its weighted variant, which assumes ``sum w = 1`` and weights the covariance by ``w^2``; here
    weights are normalised and enter linearly, as in the objective above.

    Args:
        source: ``(B, K, n)`` points, ``K >= n``, not all collinear (3-D) / coincident (2-D).
        target: ``(B, K, n)`` corresponding points, same units and the same condition.
        weights: optional ``(B, K)`` non-negative weights (scale-free).

    Returns:
        ``(B, n + 1, n + 1)`` homogeneous matrix mapping source coordinates to target coordinates. If the
        correspondences leave the rotation ambiguous (rank-deficient covariance although both sets are
        spread), one of the optimal rotations is returned.
    """
    check_point_sets(source, target, weights, 0)
    n = source.shape[-1]
    w = _normalized_weights(source, weights)
    check_spread(source, weights, n - 1, "source")
    check_spread(target, weights, n - 1, "target")
    source_mean, target_mean = (w * source).sum(1), (w * target).sum(1)
    cov = (target - target_mean[:, None]).transpose(1, 2) @ (w * (source - source_mean[:, None]))
    u, _, vh = torch.linalg.svd(cov)
    signs = torch.ones_like(cov[:, 0])
    signs[:, -1] = torch.linalg.det(u @ vh).detach().sign()
    rotation = (u * signs[:, None, :]) @ vh
    return _homogeneous(rotation, target_mean - (rotation @ source_mean[..., None])[..., 0])


def transform_points(matrix: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Apply homogeneous ``matrix`` ``(B, n + 1, n + 1)`` to ``points`` ``(B, N, n)``; returns ``(B, N, n)``.

    A batch size of 1 in either argument is broadcast.
    """
    if points.ndim != 3 or points.shape[-1] not in (2, 3):
        raise ValueError(f"points must be (B, N, n) with n in (2, 3), got {tuple(points.shape)}")
    n = points.shape[-1]
    if matrix.ndim != 3 or matrix.shape[1:] != (n + 1, n + 1):
        raise ValueError(f"matrix must be (B, {n + 1}, {n + 1}) for {n}-D points, got {tuple(matrix.shape)}")
    if matrix.shape[0] != points.shape[0] and 1 not in (matrix.shape[0], points.shape[0]):
        raise ValueError(f"batch sizes of matrix {matrix.shape[0]} and points {points.shape[0]} do not match")
    return points @ matrix[:, :n, :n].transpose(1, 2) + matrix[:, None, :n, n]


def _normalized_weights(points: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """``(B, K, 1)`` weights summing to 1 (uniform if ``weights`` is None)."""
    if weights is None:
        return torch.full_like(points[..., :1], 1.0 / points.shape[1])
    weights = weights.to(points.dtype)
    return (weights / weights.sum(1, keepdim=True))[..., None]


def _homogeneous(linear: torch.Tensor, translation: torch.Tensor) -> torch.Tensor:
    """``(B, n + 1, n + 1)`` from a linear part ``(B, n, n)`` and a translation ``(B, n)``."""
    top = torch.cat([linear, translation[..., None]], dim=2)
    bottom = torch.zeros_like(top[:, :1])
    bottom[:, 0, -1] = 1
    return torch.cat([top, bottom], dim=1)
