"""Group (cycle) consistency loss of SITReg's LUMIR fine-tuning (Honkamaa & Marttinen, MELBA 2024; the
authors' reference implementation fine-tunes its LUMIR model with it).

Three images ``I_1, I_2, I_3`` are registered pairwise around a cycle: pair ``r`` (``r = 1, 2, 3``)
registers ``I_r`` (moving, SITReg's image 1) with ``I_{r+1 mod 3}`` (fixed, image 2). With the package's
DDF convention the forward DDF of pair ``r`` lives on the grid of ``I_{r+1}`` and maps it into ``I_r``
(``phi_f^r: I_{r+1} -> I_r``); the inverse DDF lives on the grid of ``I_r`` and maps it into ``I_{r+1}``.
Hence both cycles start and end in space 1::

    C_f = phi_f^1 o phi_f^2 o phi_f^3     (space 1 -> 3 -> 2 -> 1)
    C_i = phi_i^3 o phi_i^2 o phi_i^1     (space 1 -> 2 -> 3 -> 1)

and a perfectly consistent triplet gives ``C_f = C_i = identity``. Each DDF carries the body mask of the
image whose grid it lives on (its domain): ``phi_f^1``: M2, ``phi_i^1``: M1, ``phi_f^2``: M3, ``phi_i^2``: M2,
``phi_f^3``: M1, ``phi_i^3``: M3.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from monai_ext.spatial.coordinates import centered_normalized_spacing
from monai_ext.spatial.sampling import check_ddf, sample, voxel_grid

__all__ = [
    "LUMIR_CONSISTENCY_SCHEDULE",
    "compose_cycle",
    "cycle_consistency",
    "scale_gradient",
    "consistency_weight",
    "GroupConsistencyLoss",
]

LUMIR_CONSISTENCY_SCHEDULE: tuple[float, ...] = (0.0,) * 31 + (40.0,)
"""SITReg's ``consistency_loss_weight_per_epoch`` of the LUMIR fine-tune: 0 up to epoch 30, 40 from epoch 31."""


def _check_mask(mask: torch.Tensor, ddf: torch.Tensor, name: str) -> None:
    if not isinstance(mask, torch.Tensor) or mask.ndim != ddf.ndim or mask.shape[1] != 1:
        got = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"{name} must be a (B, 1, *spatial) mask, got {got}")
    if mask.shape[2:] != ddf.shape[2:] or mask.shape[0] not in (1, ddf.shape[0]):
        raise ValueError(f"{name} {tuple(mask.shape)} does not match its DDF {tuple(ddf.shape)}")


def compose_cycle(
    ddfs: Sequence[torch.Tensor], masks: Sequence[torch.Tensor | None] | None = None, mask_threshold: float = 1e-3
) -> tuple[torch.Tensor, torch.Tensor]:
    """Voxel DDF and validity mask of the composition ``phi_1 o phi_2 o ... o phi_k``, evaluated on the grid.

    Every ``phi_j(x) = x + ddfs[j](x)`` is a multilinearly interpolated, border-extrapolated voxel DDF
    carrying the mask ``masks[j]`` on its own grid (its domain). The composition is evaluated exactly
    (nested, innermost ``ddfs[-1]`` first, no resampling between the pieces); its mask at ``x`` is the
    product over the pieces of the piece's mask sampled where the piece is evaluated: linear with zero
    padding, valid if ``>= 1 - mask_threshold`` (composable-mapping's ``LinearInterpolator`` masking, so
    points leaving a piece's field of view are invalid too).

    Args:
        ddfs: voxel DDFs ``(B, n, *spatial)``, outermost first, all on grids of one shape (the result
            lives on the grid of ``ddfs[-1]``).
        masks: one ``(B, 1, *spatial)`` mask (or ``None`` = all ones) per DDF, or ``None`` for no masks.
        mask_threshold: interpolated mask tolerance in ``[0, 1)``; 1e-3 as
            :func:`monai_ext.losses.symmetric.warped_validity_mask` (composable-mapping's own default is
            1e-5; the two differ only for points within 1e-3 voxel of a mask or field-of-view edge).

    Returns:
        ``(ddf, mask)``: the composed voxel displacement ``(B, n, *spatial)`` (differentiable w.r.t. every
        input DDF) and its mask ``(B, 1, *spatial)`` in {0, 1} (no gradient).
    """
    if len(ddfs) == 0:
        raise ValueError("ddfs must hold at least one DDF")
    if not 0 <= mask_threshold < 1:
        raise ValueError(f"mask_threshold must be in [0, 1), got {mask_threshold}")
    masks = [None] * len(ddfs) if masks is None else list(masks)
    if len(masks) != len(ddfs):
        raise ValueError(f"masks must hold one entry per DDF ({len(ddfs)}), got {len(masks)}")
    for j, ddf in enumerate(ddfs):
        check_ddf(ddf, f"ddfs[{j}]")
        if ddf.shape != ddfs[-1].shape:
            raise ValueError(f"all ddfs must have one shape, got {tuple(ddf.shape)} and {tuple(ddfs[-1].shape)}")
        if masks[j] is not None:
            _check_mask(masks[j], ddf, f"masks[{j}]")
    inner = ddfs[-1]
    grid = voxel_grid(inner.shape[2:], inner.dtype, inner.device)[None]
    ones = inner.new_ones(1, 1, *inner.shape[2:])
    threshold = 1 - mask_threshold
    mask = ones if masks[-1] is None else (masks[-1].to(inner.dtype) >= threshold).to(inner.dtype)
    points = grid + inner
    for ddf, piece_mask in zip(reversed(ddfs[:-1]), reversed(masks[:-1])):
        piece_mask = ones if piece_mask is None else piece_mask.to(inner.dtype)
        sampled = sample(piece_mask, points.detach(), mode="linear", padding="zeros")
        mask = mask * (sampled >= threshold).to(inner.dtype)
        points = points + sample(ddf, points)
    return points - grid, mask.expand(points.shape[0], 1, *points.shape[2:])


def cycle_consistency(
    forward_ddfs: Sequence[torch.Tensor],
    inverse_ddfs: Sequence[torch.Tensor],
    masks: Sequence[torch.Tensor | None] | None = None,
    voxel_size: Sequence[float] | None = None,
    mask_threshold: float = 1e-3,
) -> torch.Tensor:
    """SITReg's group consistency loss of a registered triplet, a scalar.

    ``(c(C_f) + c(C_i)) / 2`` with ``C_f = phi_f^1 o phi_f^2 o phi_f^3`` and ``C_i = phi_i^3 o phi_i^2 o phi_i^1``
    (see the module docstring) composed by :func:`compose_cycle`, and
    ``c(C) = mean_{batch, voxels}( mask * sum_channels (h * (C(x) - x))^2 )``: the squared cycle displacement
    in the *world* units of the centred-normalised frame (``h`` = :func:`centered_normalized_spacing`; one
    voxel of a 224-voxel axis is ``2 / 224``), masked voxels counting as zeros in the mean.

    Args:
        forward_ddfs: ``(u_f^1, u_f^2, u_f^3)``, ``u_f^r`` ``(B, n, *spatial)`` the forward voxel DDF of pair
            ``r`` = (moving ``I_r``, fixed ``I_{r+1}``): on the grid of ``I_{r+1}``, mapping into ``I_r``.
        inverse_ddfs: ``(u_i^1, u_i^2, u_i^3)``, on the grid of ``I_r``, mapping into ``I_{r+1}``.
        masks: ``(M1, M2, M3)`` body masks ``(B, 1, *spatial)`` of the three images (entries may be ``None``
            = all ones), or ``None``. Points leaving the field of view are masked out regardless.
        voxel_size: relative voxel size of the (shared) image grid; ``None`` = isotropic.
        mask_threshold: tolerance of the interpolated masks (see :func:`compose_cycle`).
    """
    if len(forward_ddfs) != 3 or len(inverse_ddfs) != 3:
        raise ValueError(
            f"forward_ddfs and inverse_ddfs must hold 3 DDFs each, got {len(forward_ddfs)} and {len(inverse_ddfs)}"
        )
    if masks is not None and len(masks) != 3:
        raise ValueError(f"masks must hold 3 entries (M1, M2, M3), got {len(masks)}")
    m1, m2, m3 = (None, None, None) if masks is None else masks
    (f1, f2, f3), (i1, i2, i3) = forward_ddfs, inverse_ddfs
    for name, ddfs in (("forward_ddfs", forward_ddfs), ("inverse_ddfs", inverse_ddfs)):
        for k, ddf in enumerate(ddfs):
            check_ddf(ddf, f"{name}[{k}]")
            if ddf.shape != f1.shape:
                raise ValueError(
                    f"{name}[{k}] {tuple(ddf.shape)} must have the shape of forward_ddfs[0] {tuple(f1.shape)}"
                )
    for k, mask in enumerate((m1, m2, m3)):
        if mask is not None:
            _check_mask(mask, f1, f"masks[{k}]")
    spatial = f1.shape[2:]
    h = torch.tensor(centered_normalized_spacing(spatial, voxel_size), dtype=f1.dtype, device=f1.device)
    h = h.view(1, -1, *([1] * len(spatial)))
    losses = []
    for ddfs, cycle_masks in (((f1, f2, f3), (m2, m3, m1)), ((i3, i2, i1), (m3, m2, m1))):
        displacement, mask = compose_cycle(ddfs, cycle_masks, mask_threshold)
        losses.append(((displacement * h).square().sum(1, keepdim=True) * mask).mean())
    return (losses[0] + losses[1]) / 2


class _ScaleGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor: torch.Tensor, factor: float) -> torch.Tensor:
        ctx.factor = factor
        return tensor.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad * ctx.factor, None


def scale_gradient(tensor: torch.Tensor, factor: float) -> torch.Tensor:
    """Identity in the forward pass; multiplies the incoming gradient by ``factor`` in the backward pass."""
    return _ScaleGradient.apply(tensor, float(factor))


def consistency_weight(epoch: float, schedule: Sequence[float] = LUMIR_CONSISTENCY_SCHEDULE) -> float:
    """Consistency loss weight at fractional epoch ``epoch`` (0-based, ``epoch + step / steps_per_epoch``).

    ``schedule[k]`` is the weight at epoch ``k``; linear interpolation in between (``numpy.interp``) and the
    end values beyond the ends. The default ramps 0 -> 40 during epoch 30 (the first LUMIR fine-tune epoch).
    """
    if len(schedule) == 0:
        raise ValueError("schedule must hold at least one weight")
    if not np.isfinite(epoch):
        raise ValueError(f"epoch must be finite, got {epoch}")
    return float(np.interp(float(epoch), np.arange(len(schedule)), np.asarray(schedule, dtype=np.float64)))


class GroupConsistencyLoss(nn.Module):
    """:func:`cycle_consistency` of a triplet registered by the 3 processes of a process group.

    Group rank ``r`` (0, 1, 2) registers pair ``r + 1`` = (moving ``I_{r+1}``, fixed ``I_{(r+1) mod 3 + 1}``) and
    passes its own DDFs; they are all-gathered within ``group`` (the received tensors carry no gradient, the
    rank's own stay differentiable), every rank evaluates the same loss value, and the backward pass returns
    only ``d loss / d (own DDFs)``, **multiplied by 3**.

    Why x3: the full gradient of the consistency loss is ``sum_r dL/du_r * du_r/dtheta``, and rank ``r``
    computes exactly the ``r``-th term. ``DistributedDataParallel`` *averages* the parameter gradients over
    all ``W`` ranks. Scaling each rank's term by the group size 3 makes the group's average
    ``(1/3) sum_r 3 * term_r`` equal to the full gradient, so a DDP step equals a single-process step on
    ``mean(pairwise losses of the 3 pairs) + consistency`` (averaged over the ``W / 3`` triplets when there
    are several groups). The pairwise losses are left unscaled: DDP's average is their mean over the pairs.

    Args:
        group: process group of exactly 3 ranks (see ``monai_ext.engines.consistency.triplet_group``);
            ``None`` = the default group, which then must have 3 ranks.
        voxel_size: relative voxel size of the image grid (world frame of the loss); ``None`` = isotropic.
        mask_threshold: tolerance of the interpolated masks.
    """

    def __init__(
        self,
        group: dist.ProcessGroup | None = None,
        voxel_size: Sequence[float] | None = None,
        mask_threshold: float = 1e-3,
    ) -> None:
        super().__init__()
        self.group = group
        self.voxel_size = None if voxel_size is None else tuple(float(v) for v in voxel_size)
        self.mask_threshold = float(mask_threshold)

    @property
    def group_rank(self) -> int:
        """This process's rank ``r`` (0, 1 or 2) in ``group``; it registers images ``r + 1`` and ``(r + 1) % 3 + 1``."""
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("GroupConsistencyLoss needs torch.distributed to be initialised (init_process_group)")
        size = dist.get_world_size(self.group)
        if size != 3:
            raise ValueError(f"the consistency process group must have 3 ranks, got {size}")
        return dist.get_rank(self.group)

    def forward(
        self,
        forward_ddf: torch.Tensor,
        inverse_ddf: torch.Tensor,
        masks: Sequence[torch.Tensor | None] | None = None,
    ) -> torch.Tensor:
        """
        Args:
            forward_ddf, inverse_ddf: this rank's voxel DDFs ``(B, n, *spatial)`` (same shape on every rank).
            masks: ``(M1, M2, M3)`` body masks of the triplet (identical on every rank) or ``None``.

        Returns:
            the consistency loss (a scalar, the same value on the 3 ranks) whose gradient w.r.t. the own DDFs
            is 3 times the true one.
        """
        rank = self.group_rank
        check_ddf(forward_ddf, "forward_ddf")
        check_ddf(inverse_ddf, "inverse_ddf")
        if inverse_ddf.shape != forward_ddf.shape:
            raise ValueError(
                f"forward_ddf {tuple(forward_ddf.shape)} and inverse_ddf {tuple(inverse_ddf.shape)} must match"
            )
        own = torch.stack((forward_ddf, inverse_ddf)).detach().contiguous()
        gathered = [torch.empty_like(own) for _ in range(3)]
        dist.all_gather(gathered, own, group=self.group)
        forward_ddfs = [forward_ddf if r == rank else gathered[r][0] for r in range(3)]
        inverse_ddfs = [inverse_ddf if r == rank else gathered[r][1] for r in range(3)]
        loss = cycle_consistency(forward_ddfs, inverse_ddfs, masks, self.voxel_size, self.mask_threshold)
        return scale_gradient(loss, 3.0)
