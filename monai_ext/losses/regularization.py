"""Regularisers of dense displacement fields (SITReg spec 3.2 and 3.4).

Both take voxel DDFs ``(B, n, *spatial)`` (channel ``i`` = displacement along spatial axis ``i``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from monai_ext.metrics.deformation import non_diffeomorphic_volume
from monai_ext.spatial.sampling import check_ddf

__all__ = ["GradientDeformationLoss", "NDVLoss"]


class GradientDeformationLoss(nn.Module):
    """Mean squared displacement gradient in world units ("grad" of SITReg / VoxelMorph ``Grad('l2')``).

    For every axis ``d``: forward differences of ``u`` along ``d`` (``N_d - 1`` positions), channel ``c``
    scaled by ``s_c / s_d`` (``du_c / dx_d`` in world units since ``u_c`` is in voxels of axis ``c``), squared
    and averaged over channels and positions; then averaged over the ``n`` axes and the batch.
    Only voxel-size *ratios* matter, so ``voxel_size=None`` (isotropic) gives plain voxel differences.

    MONAI's ``BendingEnergyLoss`` / ``DiffusionLoss`` use central differences and no voxel-size scaling,
    hence this class.

    Args:
        voxel_size: per-axis voxel size ``(s_0, .., s_{n-1})`` or ``None`` (isotropic).
    """

    def __init__(self, voxel_size: Sequence[float] | None = None) -> None:
        super().__init__()
        if voxel_size is not None and (len(voxel_size) not in (2, 3) or min(voxel_size) <= 0):
            raise ValueError(f"voxel_size must hold 2 or 3 positive values, got {voxel_size}")
        self.voxel_size = None if voxel_size is None else tuple(float(s) for s in voxel_size)

    def forward(self, ddf: torch.Tensor) -> torch.Tensor:
        """``ddf``: ``(B, n, *spatial)`` voxel DDF; returns a scalar."""
        check_ddf(ddf)
        n = ddf.ndim - 2
        if self.voxel_size is not None and len(self.voxel_size) != n:
            raise ValueError(f"voxel_size has {len(self.voxel_size)} values but ddf has {n} spatial dims")
        if min(ddf.shape[2:]) < 2:
            raise ValueError(f"ddf needs at least 2 voxels per axis, got {tuple(ddf.shape)}")
        size = torch.tensor(self.voxel_size or (1.0,) * n, dtype=ddf.dtype, device=ddf.device)
        total = ddf.new_zeros(ddf.shape[0])
        for d in range(n):
            diff = torch.diff(ddf, dim=2 + d) * (size / size[d]).view(1, n, *([1] * n))
            total = total + diff.square().flatten(1).mean(1)
        return (total / n).mean()


class NDVLoss(nn.Module):
    """Non-diffeomorphic volume of a 3-D voxel DDF, summed over the batch (SITReg's LUMIR NDV loss, spec 3.4).

    See :func:`monai_ext.metrics.deformation.non_diffeomorphic_volume`; SITReg weights it by 1e-5.
    """

    def forward(self, ddf: torch.Tensor) -> torch.Tensor:
        """``ddf``: ``(B, 3, D, H, W)`` voxel DDF; returns a scalar (volume in voxels)."""
        return non_diffeomorphic_volume(ddf, reduction="sum")
