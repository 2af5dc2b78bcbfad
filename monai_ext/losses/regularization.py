"""Regularisers of dense displacement fields used by SITReg (Honkamaa & Marttinen, MELBA 2024).

Both take voxel DDFs ``(B, n, *spatial)`` (channel ``i`` = displacement along spatial axis ``i``) and follow
MONAI's loss conventions (``_Loss`` with a :class:`monai.utils.LossReduction` over the batch).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.utils import LossReduction, look_up_option
from torch.nn.modules.loss import _Loss

from monai_ext.metrics.deformation import non_diffeomorphic_volume
from monai_ext.spatial.sampling import check_ddf

__all__ = ["GradientDeformationLoss", "NDVLoss"]


class GradientDeformationLoss(_Loss):
    """Mean squared displacement gradient in world units ("grad" of SITReg / VoxelMorph ``Grad('l2')``).

    For every axis ``d``: forward differences of ``u`` along ``d`` (``N_d - 1`` positions), channel ``c``
    scaled by ``s_c / s_d`` (``du_c / dx_d`` in world units since ``u_c`` is in voxels of axis ``c``), squared
    and averaged over channels and positions; then averaged over the ``n`` axes and reduced over the batch.
    Only voxel-size *ratios* matter, so ``voxel_size=None`` (isotropic) gives plain voxel differences.

    MONAI's ``BendingEnergyLoss`` / ``DiffusionLoss`` use central differences and no voxel-size scaling,
    hence this class.

    Args:
        voxel_size: per-axis voxel size ``(s_0, .., s_{n-1})`` or ``None`` (isotropic).
        reduction: over the batch: ``"mean"`` (the loss), ``"sum"`` or ``"none"`` (``(B,)``).
    """

    def __init__(
        self, voxel_size: Sequence[float] | None = None, reduction: LossReduction | str = LossReduction.MEAN
    ) -> None:
        super().__init__(reduction=look_up_option(reduction, LossReduction).value)
        if voxel_size is not None and (len(voxel_size) not in (2, 3) or min(voxel_size) <= 0):
            raise ValueError(f"voxel_size must hold 2 or 3 positive values, got {voxel_size}")
        self.voxel_size = None if voxel_size is None else tuple(float(s) for s in voxel_size)

    def forward(self, ddf: torch.Tensor) -> torch.Tensor:
        """``ddf``: ``(B, n, *spatial)`` voxel DDF; returns a scalar (``(B,)`` with ``reduction="none"``)."""
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
        per_item = total / n
        if self.reduction == LossReduction.NONE.value:
            return per_item
        if self.reduction == LossReduction.SUM.value:
            return per_item.sum()
        return per_item.mean()


class NDVLoss(_Loss):
    """Non-diffeomorphic volume of a 3-D voxel DDF, summed over the batch (SITReg's LUMIR NDV loss).

    The authors' SITReg implementation uses it only in the LUMIR group-consistency fine-tune, weighted by 1e-5
    (half of it for each direction); see :func:`monai_ext.metrics.deformation.non_diffeomorphic_volume`.

    Args:
        reduction: over the batch: ``"sum"`` (the default, SITReg's loss), ``"mean"`` or ``"none"`` (``(B,)``).
    """

    def __init__(self, reduction: LossReduction | str = LossReduction.SUM) -> None:
        super().__init__(reduction=look_up_option(reduction, LossReduction).value)

    def forward(self, ddf: torch.Tensor) -> torch.Tensor:
        """``ddf``: ``(B, 3, D, H, W)`` voxel DDF; returns a scalar (volume in voxels; ``(B,)`` for ``"none"``)."""
        return non_diffeomorphic_volume(ddf, reduction=self.reduction)
