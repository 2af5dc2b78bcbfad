"""Intensity-based refinement of an affine alignment (e.g. a KeyMorph keypoint fit) by mutual information.

A keypoint fit is robust to large rotations but its accuracy is limited by the keypoints' localisation; a few
gradient steps on an image similarity, started from the fit, recover the remaining misalignment (the two-stage
scheme of classical affine registration: a global initialisation, then local optimisation). The similarity is
MONAI's :class:`~monai.losses.GlobalMutualInformationLoss` (Parzen-window mutual information, valid across MR
contrasts); the optimiser is Adam on a 12-parameter correction, coarse to fine (2x average-pooled images first).
MONAI has the loss but no affine optimisation loop over a given initial matrix, hence this module.

Conventions: images ``(1, 1, D, H, W)`` on their own model grids; the affine is the **fixed voxel -> moving
voxel** matrix ``(1, 4, 4)`` (the pull-back map: ``warp(moving, affine_to_ddf(matrix))`` resembles ``fixed``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.losses import GlobalMutualInformationLoss

from monai_ext.spatial.affine import transform_points
from monai_ext.spatial.coordinates import invert_homogeneous, voxel_to_normalized
from monai_ext.spatial.sampling import affine_to_ddf, voxel_grid

__all__ = ["refine_affine", "refine_keymorph_result"]


def _normalized_grid(shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    """``(4, V)`` homogeneous normalised (align_corners=True) coordinates of every voxel of ``shape``."""
    points = voxel_grid(shape, dtype).reshape(3, -1)
    to_normalized = voxel_to_normalized(shape, True, dtype)
    return to_normalized @ torch.cat([points, torch.ones(1, points.shape[1], dtype=dtype)])


def refine_affine(
    moving: torch.Tensor,
    fixed: torch.Tensor,
    matrix: torch.Tensor,
    steps: Sequence[int] = (40, 20),
    learning_rate: float = 0.01,
    num_bins: int = 32,
) -> torch.Tensor:
    """Refine ``matrix`` (fixed voxel -> moving voxel, ``(1, 4, 4)``) to maximise the mutual information of
    ``fixed`` and the warped ``moving`` (both ``(1, 1, *spatial)``, intensities in about ``[0, 1]``).

    The correction ``C`` acts in the fixed image's normalised coordinates, ``A' = A C`` with ``A`` the matrix
    between the normalised frames (so all 12 parameters share one scale), ``steps[i]`` Adam steps at resolution
    level ``i`` (coarse first: ``2^(L - 1 - i)`` average pooling). Returns the refined ``(1, 4, 4)`` matrix in the
    dtype of ``matrix``; the input is returned unchanged if ``sum(steps) == 0``.
    """
    if moving.ndim != 5 or fixed.ndim != 5 or moving.shape[:2] != (1, 1) or fixed.shape[:2] != (1, 1):
        raise ValueError(f"moving and fixed must be (1, 1, D, H, W), got {tuple(moving.shape)} and {tuple(fixed.shape)}")
    if matrix.shape != (1, 4, 4):
        raise ValueError(f"matrix must be (1, 4, 4), got {tuple(matrix.shape)}")
    if sum(steps) == 0:
        return matrix
    dtype = torch.float64
    fixed_shape, moving_shape = fixed.shape[2:], moving.shape[2:]
    from_fixed = invert_homogeneous(voxel_to_normalized(fixed_shape, True, dtype))
    to_moving = voxel_to_normalized(moving_shape, True, dtype)
    start = (to_moving @ matrix[0].to(dtype) @ from_fixed).float()  # normalised fixed -> normalised moving
    delta = torch.zeros(3, 4, requires_grad=True)
    optimizer = torch.optim.Adam([delta], lr=learning_rate)
    loss_function = GlobalMutualInformationLoss(num_bins=num_bins)
    levels = len(steps)
    with torch.enable_grad():
        for level, count in enumerate(steps):
            factor = 2 ** (levels - 1 - level)
            level_fixed = F.avg_pool3d(fixed.float(), factor, ceil_mode=True) if factor > 1 else fixed.float()
            level_moving = F.avg_pool3d(moving.float(), factor, ceil_mode=True) if factor > 1 else moving.float()
            points = _normalized_grid(level_fixed.shape[2:], torch.float32)
            for _ in range(int(count)):
                correction = torch.eye(4) + F.pad(delta, (0, 0, 0, 1))
                moved = (start @ correction @ points)[:3]  # (3, V) normalised ij in the moving image
                grid = moved.flip(0).T.reshape(1, *level_fixed.shape[2:], 3)
                warped = F.grid_sample(level_moving, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
                loss = loss_function(warped, level_fixed)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
    correction = (torch.eye(4) + F.pad(delta.detach(), (0, 0, 0, 1))).to(dtype)
    refined = invert_homogeneous(to_moving) @ start.to(dtype) @ correction @ invert_homogeneous(from_fixed)
    return refined[None].to(matrix.dtype)


def refine_keymorph_result(
    result: dict[str, torch.Tensor],
    moving: torch.Tensor,
    fixed: torch.Tensor,
    steps: Sequence[int] = (40, 0),
    learning_rate: float = 0.01,
) -> dict[str, torch.Tensor]:
    """Refine an ``"affine"`` / ``"rigid"`` entry of :meth:`monai_ext.networks.keymorph.KeyMorph.register`
    (consistent grid convention, ``reference_grid=False``) by :func:`refine_affine` on the pair it registered.

    ``moving`` / ``fixed``: the images given to ``register`` (``(1, 1, *spatial)``). Returns a new dict in which
    ``inverse_matrix_voxel`` is refined and ``matrix_voxel``, the normalised ``inverse_matrix`` / ``matrix``,
    ``points_aligned`` and (if present) ``ddf`` follow it; ``grid`` is dropped. Keypoints are unchanged (the
    refined map no longer fits them exactly). A rigid entry becomes affine.
    """
    if "inverse_matrix_voxel" not in result:
        raise ValueError("only affine / rigid results (with inverse_matrix_voxel) can be refined")
    refined = refine_affine(moving, fixed, result["inverse_matrix_voxel"], steps, learning_rate).detach()
    dtype, device = refined.dtype, refined.device
    fixed_shape, moving_shape = fixed.shape[2:], moving.shape[2:]
    to_fixed = voxel_to_normalized(fixed_shape, True, dtype, device)
    to_moving = voxel_to_normalized(moving_shape, True, dtype, device)
    inverse = to_moving @ refined @ invert_homogeneous(to_fixed)
    out = {k: v for k, v in result.items() if k != "grid"}
    out.update(
        inverse_matrix_voxel=refined,
        matrix_voxel=invert_homogeneous(refined),
        inverse_matrix=inverse,
        matrix=invert_homogeneous(inverse),
    )
    out["points_aligned"] = transform_points(out["matrix"].to(result["points_moving"].dtype), result["points_moving"])
    if "ddf" in result:
        out["ddf"] = affine_to_ddf(refined.to(result["ddf"].dtype), fixed_shape)
    return out
