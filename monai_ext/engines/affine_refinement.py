"""Intensity-based refinement of an affine alignment (e.g. a KeyMorph keypoint fit) by mutual information.

A keypoint fit is robust to large rotations but its accuracy is limited by the keypoints' localisation; gradient
steps on an image similarity, started from the fit, recover the remaining misalignment (the two-stage scheme of
classical affine registration: a global initialisation, then local optimisation). The similarity is MONAI's
:class:`~monai.losses.GlobalMutualInformationLoss` (Parzen-window mutual information, valid across MR contrasts),
evaluated on a fresh random sample of fixed voxels at each step (stochastic gradient descent, as ITK's and ANTs'
random metric sampling) so that a step costs the same on any grid; the optimiser is Adam on a 12-parameter
correction, coarse to fine over average-pooled copies of the images.
MONAI has the loss but no affine optimisation loop over a given initial matrix, hence this module.

The refinement may run on finer grids than the network's (``refine_grids``: the same images resampled at a
smaller voxel size, e.g. 2 mm against a 4 mm model grid): the keypoint fit is then polished at the precision the
outputs are judged at. Matrices are carried between grids through the ``MetaTensor.affine`` s (voxel -> world).

Conventions: images ``(1, 1, D, H, W)``; the affine is the **fixed voxel -> moving voxel** matrix ``(1, 4, 4)`` of
the grids it is given with (the pull-back map: ``warp(moving, affine_to_ddf(matrix))`` resembles ``fixed``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from monai.data import MetaTensor
from monai.losses import GlobalMutualInformationLoss

from monai_ext.spatial.affine import transform_points
from monai_ext.spatial.coordinates import invert_homogeneous, voxel_to_normalized
from monai_ext.spatial.sampling import affine_to_ddf

__all__ = ["refine_affine", "refine_keymorph_result"]


def _check_image(name: str, image: torch.Tensor) -> None:
    if image.ndim != 5 or image.shape[:2] != (1, 1):
        raise ValueError(f"{name} must be (1, 1, D, H, W), got {tuple(image.shape)}")


def _foreground_box(image: torch.Tensor, threshold: float = 0.05, margin: float = 0.1) -> tuple[torch.Tensor, ...]:
    """Lowest and highest voxel index ``(3,)`` (int64) of the box around the voxels of ``image`` ``(D, H, W)`` above
    ``threshold`` x its maximum, enlarged by ``margin`` x the grid size per side (clipped to the grid)."""
    sizes = torch.tensor(image.shape, device=image.device)
    mask = image > threshold * image.max()
    if not mask.any():
        return torch.zeros_like(sizes), sizes - 1
    index = torch.nonzero(mask)
    pad = (margin * sizes).long()
    return (index.min(0).values - pad).clamp_min(0), (index.max(0).values + pad).minimum(sizes - 1)


def _pooled_to_voxel(factor: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``(4, 4)`` map from a voxel of a ``factor`` x average-pooled grid to the voxel of the full grid at its
    centre (``factor * j + (factor - 1) / 2``)."""
    matrix = torch.eye(4, dtype=dtype, device=device)
    matrix[:3, :3] *= int(factor)
    matrix[:3, 3] = (int(factor) - 1) / 2
    return matrix


def refine_affine(
    moving: torch.Tensor,
    fixed: torch.Tensor,
    matrix: torch.Tensor,
    steps: Sequence[int] = (25, 25, 25),
    factors: Sequence[int] = (4, 2, 1),
    learning_rate: float = 0.01,
    num_bins: int = 16,
    num_samples: int = 10000,
    kernel_type: str = "gaussian",
    seed: int = 0,
) -> torch.Tensor:
    """Refine ``matrix`` (fixed voxel -> moving voxel, ``(1, 4, 4)``) to maximise the mutual information of
    ``fixed`` and the warped ``moving`` (both ``(1, 1, D, H, W)``, any two grids, intensities in about ``[0, 1]``).

    The correction ``C`` acts in the fixed grid's normalised coordinates (``[-1, 1]`` per axis, so the 9 linear
    and 3 translation parameters share one scale): ``A' = A C`` with ``A`` the map between the normalised frames.
    Level ``i`` runs ``steps[i]`` Adam steps (learning rate ``learning_rate / 2^i``) on the images average-pooled by
    ``factors[i]`` (1: the images themselves); each step draws ``num_samples`` level voxels of ``fixed`` (generator seeded
    with ``seed``: the result is deterministic) in the box around the fixed foreground (above 5 % of the maximum,
    enlarged by 10 % of the grid per side) and samples the moving image there (trilinear, 0 outside).
    Returns the refined ``(1, 4, 4)`` matrix in the dtype of ``matrix``; the input itself if ``sum(steps) == 0``.
    """
    _check_image("moving", moving)
    _check_image("fixed", fixed)
    if matrix.shape != (1, 4, 4):
        raise ValueError(f"matrix must be (1, 4, 4), got {tuple(matrix.shape)}")
    if len(steps) != len(factors) or any(int(s) < 0 for s in steps) or any(int(f) < 1 for f in factors):
        raise ValueError(f"steps (>= 0) and factors (>= 1) must be of one length, got {steps} and {factors}")
    if num_samples < 1 or num_bins < 2:
        raise ValueError(f"num_samples must be >= 1 and num_bins >= 2, got {num_samples} and {num_bins}")
    if sum(int(s) for s in steps) == 0:
        return matrix
    dtype, device = torch.float64, fixed.device
    fixed_shape, moving_shape = fixed.shape[2:], moving.shape[2:]
    normalize_fixed = voxel_to_normalized(fixed_shape, True, dtype, device)
    normalize_moving = voxel_to_normalized(moving_shape, True, dtype, device)
    start = normalize_moving @ matrix[0].to(dtype=dtype, device=device) @ invert_homogeneous(normalize_fixed)
    delta = torch.zeros(3, 4, dtype=dtype, device=device, requires_grad=True)  # C = I + delta: normalised fixed
    loss_function = GlobalMutualInformationLoss(kernel_type=kernel_type, num_bins=num_bins)
    generator = torch.Generator(device=device).manual_seed(int(seed))
    with torch.enable_grad():
        for level, (count, factor) in enumerate(zip(steps, factors)):
            if int(count) == 0:
                continue
            level_fixed, level_moving = (F.avg_pool3d(x.float(), int(factor), ceil_mode=True) for x in (fixed, moving))
            level_fixed = level_fixed[0, 0]
            low, high = _foreground_box(level_fixed)
            # fixed level voxel -> normalised fixed; normalised moving -> normalised moving level grid
            sample_to_fixed = (normalize_fixed @ _pooled_to_voxel(factor, dtype, device)).float()
            moving_to_level = (
                voxel_to_normalized(level_moving.shape[2:], True, dtype, device)
                @ invert_homogeneous(_pooled_to_voxel(factor, dtype, device))
                @ invert_homogeneous(normalize_moving)
            )
            optimizer = torch.optim.Adam([delta], lr=learning_rate / 2**level)
            for _ in range(int(count)):
                uniform = torch.rand(3, num_samples, generator=generator, device=device, dtype=dtype)
                index = (low[:, None] + uniform * (high - low + 1)[:, None]).long().minimum(high[:, None])
                points = sample_to_fixed @ torch.cat([index.float(), torch.ones(1, num_samples, device=device)])
                correction = torch.eye(4, dtype=dtype, device=device) + F.pad(delta, (0, 0, 0, 1))
                moved = (moving_to_level @ start @ correction).float() @ points  # (4, N) normalised ijk, level grid
                grid = moved[:3].flip(0).T.reshape(1, num_samples, 1, 1, 3)
                warped = F.grid_sample(level_moving, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
                target = level_fixed[index[0], index[1], index[2]]
                loss = loss_function(warped.reshape(1, 1, -1), target.reshape(1, 1, -1))
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
    correction = torch.eye(4, dtype=dtype, device=device) + F.pad(delta.detach(), (0, 0, 0, 1))
    refined = invert_homogeneous(normalize_moving) @ start @ correction @ normalize_fixed
    return refined[None].to(matrix.dtype)


def _grid_affine(image: torch.Tensor, name: str) -> torch.Tensor:
    """The ``(4, 4)`` float64 voxel -> world affine of a ``MetaTensor`` (batched affines: the first)."""
    if not isinstance(image, MetaTensor):
        raise TypeError(f"{name} must be a MetaTensor (its affine relates the grids), got {type(image).__name__}")
    affine = torch.as_tensor(image.affine, dtype=torch.float64).cpu()
    return affine[0] if affine.ndim == 3 else affine


def refine_keymorph_result(
    result: dict[str, torch.Tensor],
    moving: torch.Tensor,
    fixed: torch.Tensor,
    steps: Sequence[int] = (25, 25, 25),
    refine_grids: tuple[torch.Tensor, torch.Tensor] | None = None,
    **options: Any,
) -> dict[str, torch.Tensor]:
    """Refine an ``"affine"`` / ``"rigid"`` entry of :meth:`monai_ext.networks.keymorph.KeyMorph.register`
    (consistent grid convention, ``reference_grid=False``) by :func:`refine_affine`.

    ``moving`` / ``fixed``: the images given to ``register`` (``(1, 1, *spatial)``), the refinement's images unless
    ``refine_grids`` = ``(moving_fine, fixed_fine)`` gives the same images on other grids (``(1, 1, *spatial)``
    ``MetaTensor`` s in the world of ``moving`` / ``fixed``, which must then be ``MetaTensor`` s too); ``options``
    go to :func:`refine_affine` (``sigmas``, ``learning_rate``, ...). Returns a new dict in which
    ``inverse_matrix_voxel`` (in the grids of ``moving`` / ``fixed``) is refined and ``matrix_voxel``, the
    normalised ``inverse_matrix`` / ``matrix``, ``points_aligned`` and (if present) ``ddf`` follow it; ``grid`` is
    dropped. Keypoints are unchanged (the refined map no longer fits them exactly). A rigid entry becomes affine.
    """
    if "inverse_matrix_voxel" not in result:
        raise ValueError("only affine / rigid results (with inverse_matrix_voxel) can be refined")
    fit = result["inverse_matrix_voxel"].detach()
    plain = [x.as_tensor() if isinstance(x, MetaTensor) else x for x in (moving, fixed)]
    if refine_grids is None:
        refined = refine_affine(*plain, fit, steps, **options).detach()
    else:
        moving_fine, fixed_fine = refine_grids
        # voxel maps between each image's two grids (through its world): fine voxel -> model voxel
        moving_map = invert_homogeneous(_grid_affine(moving, "moving")) @ _grid_affine(moving_fine, "moving_fine")
        fixed_map = invert_homogeneous(_grid_affine(fixed, "fixed")) @ _grid_affine(fixed_fine, "fixed_fine")
        fine_fit = invert_homogeneous(moving_map) @ fit[0].double().cpu() @ fixed_map
        fine = [x.as_tensor() if isinstance(x, MetaTensor) else x for x in (moving_fine, fixed_fine)]
        fine_refined = refine_affine(*fine, fine_fit[None].to(fine[1].device), steps, **options).detach()
        refined = (moving_map @ fine_refined[0].double().cpu() @ invert_homogeneous(fixed_map))[None]
        refined = refined.to(dtype=fit.dtype, device=fit.device)
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
