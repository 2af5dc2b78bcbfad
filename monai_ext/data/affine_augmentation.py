"""SITReg's random affine augmentation (the authors' reference implementation uses it for NLST training).

Independently for every image, with probability ``prob`` (0.9), a matrix ``M = S R T`` is drawn in
the image's centred-normalised world frame (:mod:`monai_ext.spatial.coordinates`; its largest axis
spans [-1, 1]): ``T`` translates by ``t ~ N(0, 0.025)`` per axis (world units), ``R = expm(Skew(r))``
with ``r ~ N(0, 5 deg)`` per rotation plane, ``S = expm(Sym(log-scales, log-shears))`` with
log-scales ``~ N(0, 0.05)`` and log-shears ``~ N(0, 0.025)`` — the generator of
:func:`monai_ext.spatial.affine.affine_matrix_from_parameters`. The image is replaced by
``I(M x)`` (linear interpolation, border extrapolation) on its own grid, so ``M`` maps output world
points to input world points; a FOV mask marks the output voxels whose ``M x`` lies inside the input
grid. An image feature at input world point ``p`` appears at output world point ``M^-1 p``.

MONAI's ``RandAffined`` is not used: it draws rotation / shear / scale / translation with uniform
distributions in a different composition order and in voxel / pixel units.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, RandomizableTransform

from monai_ext.spatial.affine import affine_matrix_from_parameters, transform_points
from monai_ext.spatial.coordinates import invert_homogeneous, voxel_to_centered_normalized
from monai_ext.spatial.sampling import affine_to_ddf, voxel_grid, warp

__all__ = ["resample_world_affine", "RandSITRegAffined"]

_FOV_TOLERANCE = 1e-4  # voxels: points this close outside the outermost voxel centres still count as inside


def _voxel_matrix(
    world_matrix: torch.Tensor, spatial_shape: Sequence[int], voxel_size: Sequence[float] | None
) -> torch.Tensor:
    """``W^-1 M W`` (float64): the world map ``M`` as a map from output voxels to input voxels."""
    to_world = voxel_to_centered_normalized(spatial_shape, voxel_size, dtype=torch.float64)
    return invert_homogeneous(to_world) @ world_matrix.to(torch.float64) @ to_world


def resample_world_affine(
    image: torch.Tensor,
    world_matrix: torch.Tensor,
    voxel_size: Sequence[float] | None = None,
    mode: str = "linear",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Resample ``image`` as ``I(M x)`` with ``M`` given in the centred-normalised world frame of its grid.

    Args:
        image: ``(C, *spatial)`` (one image, channel first), ``n = len(spatial)`` in (2, 3).
        world_matrix: ``(n + 1, n + 1)`` map from output world points to input world points.
        voxel_size: physical voxel size per axis (only ratios matter); isotropic if ``None``.
        mode: ``"linear"`` or ``"nearest"``; border extrapolation.

    Returns:
        ``(resampled (C, *spatial), fov_mask (1, *spatial))``: the image's type (MetaTensor with the same
        affine) and dtype are kept; the mask is 1.0 where ``M x`` falls inside the input grid (between its
        outermost voxel centres) and 0.0 elsewhere, in the image's floating dtype.
    """
    n = image.ndim - 1
    if n not in (2, 3):
        raise ValueError(f"image must be (C, *spatial) with 2 or 3 spatial dims, got {tuple(image.shape)}")
    if world_matrix.shape != (n + 1, n + 1) or not torch.isfinite(world_matrix).all():
        raise ValueError(f"world_matrix must be a finite ({n + 1}, {n + 1}) matrix, got {tuple(world_matrix.shape)}")
    shape = tuple(image.shape[1:])
    voxel_matrix = _voxel_matrix(world_matrix, shape, voxel_size)
    plain = torch.as_tensor(image).as_subclass(torch.Tensor)
    dtype = plain.dtype if plain.is_floating_point() else torch.float32
    ddf = affine_to_ddf(voxel_matrix[None], shape)  # float64: keeps the FOV test exact
    coords = ddf + voxel_grid(shape, torch.float64)
    upper = torch.tensor(shape, dtype=torch.float64).view(1, n, *[1] * n) - 1
    inside = ((coords >= -_FOV_TOLERANCE) & (coords <= upper + _FOV_TOLERANCE)).all(dim=1)
    warped = warp(plain[None], ddf.to(dtype=dtype, device=plain.device), mode=mode, padding="border")[0].to(plain.dtype)
    if isinstance(image, MetaTensor):  # same grid: the image keeps its affine and metadata
        warped = MetaTensor(warped, meta=dict(image.meta))
    return warped, inside.to(dtype=dtype, device=plain.device)


class RandSITRegAffined(RandomizableTransform, MapTransform):
    """SITReg's NLST affine augmentation as a MONAI dictionary transform (module docstring).

    Every key of ``keys`` (e.g. ``("moving_image", "fixed_image")``) gets its own draw: applied with
    probability ``prob``, otherwise the identity. For each key the transform writes
    ``<key>_aug_matrix`` (``(n + 1, n + 1)`` float64 world matrix ``M``, output -> input; identity when not
    applied) and ``<key>_fov_mask`` (``(1, *spatial)``, see :func:`resample_world_affine`).

    Args:
        keys: image keys, ``(C, *spatial)`` tensors (MetaTensors after ``LoadImaged``).
        mask_keys: per image key, a mask key resampled with the same ``M`` (nearest) and multiplied by
            the FOV mask, or ``None``; a sequence aligned with ``keys``.
        point_keys: per image key, a key of ``(N, n)`` voxel points of that image, moved to
            ``M^-1 p`` (in world coordinates) so they stay on the same anatomy, or ``None``.
        prob: probability of augmenting each image (SITReg 0.9).
        translation_std: world units (the largest axis spans 2).
        rotation_std: degrees, per rotation plane.
        log_scale_std, log_shear_std: standard deviations of the log-scales and log-shears.
        voxel_size: physical voxel size for the world frame; ``None`` reads ``pixdim`` of a MetaTensor,
            isotropic for a plain tensor (SITReg uses the configured isotropic size: only ratios matter).
    """

    def __init__(
        self,
        keys: KeysCollection,
        mask_keys: Sequence[str | None] | None = None,
        point_keys: Sequence[str | None] | None = None,
        prob: float = 0.9,
        translation_std: float = 0.025,
        rotation_std: float = 5.0,
        log_scale_std: float = 0.05,
        log_shear_std: float = 0.025,
        voxel_size: Sequence[float] | None = None,
    ) -> None:
        if not 0.0 <= prob <= 1.0:
            raise ValueError(f"prob must be in [0, 1], got {prob}")
        MapTransform.__init__(self, keys)
        RandomizableTransform.__init__(self, prob)
        stds = {"translation_std": translation_std, "rotation_std": rotation_std,
                "log_scale_std": log_scale_std, "log_shear_std": log_shear_std}
        for name, value in stds.items():
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be finite and >= 0, got {value}")
        self.mask_keys = self._aligned(mask_keys, "mask_keys")
        self.point_keys = self._aligned(point_keys, "point_keys")
        self.translation_std, self.rotation_std = float(translation_std), float(rotation_std)
        self.log_scale_std, self.log_shear_std = float(log_scale_std), float(log_shear_std)
        self.voxel_size = voxel_size

    def _aligned(self, keys: Sequence[str | None] | None, name: str) -> list[str | None]:
        keys = [None] * len(self.keys) if keys is None else list(keys)
        if len(keys) != len(self.keys):
            raise ValueError(f"{name} must have one entry (or None) per key of {list(self.keys)}, got {keys}")
        return keys

    def sample_parameters(self, ndim: int) -> np.ndarray | None:
        """One draw: ``None`` (not applied, probability ``1 - prob``) or the parameter vector of
        :func:`affine_matrix_from_parameters` ``[log-scales, log-shears | rotations (rad) | translations]``."""
        if ndim not in (2, 3):
            raise ValueError(f"ndim must be 2 or 3, got {ndim}")
        if self.R.rand() >= self.prob:
            return None
        n_off = ndim * (ndim - 1) // 2
        return np.concatenate(
            [
                self.R.normal(0.0, self.log_scale_std, ndim),
                self.R.normal(0.0, self.log_shear_std, n_off),
                self.R.normal(0.0, math.radians(self.rotation_std), n_off),
                self.R.normal(0.0, self.translation_std, ndim),
            ]
        )

    def randomize(self, data: Any = None) -> None:
        """Not used on its own: every key draws in :meth:`sample_parameters` (one draw per image)."""

    def _voxel_size(self, image: torch.Tensor) -> Sequence[float] | None:
        if self.voxel_size is not None:
            return self.voxel_size
        if isinstance(image, MetaTensor):
            return [float(s) for s in image.pixdim]
        return None

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key, mask_key, point_key in zip(self.keys, self.mask_keys, self.point_keys):
            image = d[key]
            n = image.ndim - 1
            params = self.sample_parameters(n)
            if params is None:
                matrix = torch.eye(n + 1, dtype=torch.float64)
            else:
                matrix = affine_matrix_from_parameters(torch.as_tensor(params, dtype=torch.float64)[None])[0]
            voxel_size = self._voxel_size(image)
            d[key], fov = resample_world_affine(image, matrix, voxel_size, "linear")
            if mask_key is not None:
                mask, _ = resample_world_affine(d[mask_key], matrix, voxel_size, "nearest")
                d[mask_key] = mask * fov.to(mask.dtype)
            if point_key is not None:
                voxel_matrix = _voxel_matrix(matrix, image.shape[1:], voxel_size)
                points = torch.as_tensor(d[point_key])
                moved = transform_points(invert_homogeneous(voxel_matrix)[None], points.to(torch.float64)[None])[0]
                d[point_key] = moved.to(points.dtype if points.is_floating_point() else torch.float32)
            d[f"{key}_aug_matrix"] = matrix
            d[f"{key}_fov_mask"] = fov
        return d
