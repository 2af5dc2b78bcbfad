"""Symmetric registration objective of SITReg (Honkamaa & Marttinen, MELBA 2024): both directions of a forward /
inverse DDF pair."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from monai_ext.spatial.sampling import check_ddf, sample, voxel_grid, warp

__all__ = ["SymmetricRegistrationLoss", "warped_validity_mask"]


def warped_validity_mask(ddf: torch.Tensor, mask: torch.Tensor | None = None, threshold: float = 1e-3) -> torch.Tensor:
    """Validity of the warped image ``image(x + ddf(x))`` on the DDF's grid, ``(B, 1, *spatial)`` in {0, 1}.

    As SITReg's extrapolation masking: the moving mask (all ones when ``None``) is sampled linearly with
    zero padding at ``x + ddf(x)`` and thresholded at ``>= 1 - threshold``. This is 0 where the sample
    point is outside the moving field of view (tolerating ``threshold`` voxel) or touches the mask's zeros.

    Args:
        ddf: ``(B, n, *spatial)`` voxel DDF into the moving image (same grid size as the moving image).
        mask: moving-image mask ``(B, 1, *spatial)`` or ``None``.
    """
    check_ddf(ddf)
    if mask is None:
        mask = ddf.new_ones(ddf.shape[0], 1, *ddf.shape[2:])
    coords = voxel_grid(ddf.shape[2:], ddf.dtype, ddf.device)[None] + ddf
    sampled = sample(mask.to(ddf.dtype), coords, mode="linear", padding="zeros")
    return (sampled >= 1 - threshold).to(ddf.dtype)


class SymmetricRegistrationLoss(nn.Module):
    """``L = 1/2 Sim(moving o phi_f, fixed) + 1/2 Sim(fixed o phi_i, moving) + 1/2 sum_r w_r (R_r(u_f) + R_r(u_i))``.

    ``moving`` is SITReg's image 1 and ``fixed`` its image 2. ``forward_ddf`` ``u_f`` maps fixed-grid voxels
    into the moving image (``moving(x + u_f(x))`` resembles ``fixed``), ``inverse_ddf`` ``u_i`` maps
    moving-grid voxels into the fixed image. Both images share one grid size.

    Before each similarity both images are multiplied by ``warped_validity_mask(ddf, source mask)`` times
    the target's own mask (the reference's mask product; masked voxels still count in the mean).

    Args:
        similarity: ``similarity(pred, target) -> scalar`` loss, e.g.
            :class:`monai_ext.losses.similarity.LocalNormalizedCrossCorrelation`.
        regularizers: ``{name: (module, weight)}`` or a sequence of ``(module, weight)`` (named
            ``regularizer0``, ``regularizer1``, ...); each ``module(ddf) -> scalar``.

    Returns (from ``forward``):
        dict of scalars: ``forward_similarity``, ``inverse_similarity``, ``forward_<name>``, ``inverse_<name>``
        (all unweighted) and ``loss`` (the weighted total).
    """

    def __init__(
        self,
        similarity: nn.Module,
        regularizers: Mapping[str, tuple[nn.Module, float]] | Sequence[tuple[nn.Module, float]] = (),
    ) -> None:
        super().__init__()
        items = regularizers.items() if isinstance(regularizers, Mapping) else (
            (f"regularizer{i}", entry) for i, entry in enumerate(regularizers)
        )
        self.similarity = similarity
        self.regularizers = nn.ModuleDict()
        self.weights: dict[str, float] = {}
        for name, entry in items:
            if not (isinstance(entry, (tuple, list)) and len(entry) == 2 and isinstance(entry[0], nn.Module)):
                raise ValueError(f"regularizer {name!r} must be a (module, weight) pair, got {entry!r}")
            if name in ("similarity", "loss"):
                raise ValueError(f"regularizer name {name!r} is reserved")
            self.regularizers[name] = entry[0]
            self.weights[name] = float(entry[1])

    def forward(
        self,
        moving: torch.Tensor,
        fixed: torch.Tensor,
        forward_ddf: torch.Tensor,
        inverse_ddf: torch.Tensor,
        moving_mask: torch.Tensor | None = None,
        fixed_mask: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """
        Args:
            moving, fixed: ``(B, C, *spatial)`` images.
            forward_ddf: ``(B, n, *spatial)`` voxel DDF, fixed grid -> moving image.
            inverse_ddf: ``(B, n, *spatial)`` voxel DDF, moving grid -> fixed image.
            moving_mask, fixed_mask: ``(B, 1, *spatial)`` masks or ``None`` (field-of-view masking only).
        """
        check_ddf(forward_ddf, "forward_ddf")
        check_ddf(inverse_ddf, "inverse_ddf")
        shape = forward_ddf.shape
        if inverse_ddf.shape != shape:
            raise ValueError(f"forward_ddf {tuple(shape)} and inverse_ddf {tuple(inverse_ddf.shape)} must match")
        inputs = (("moving", moving, None), ("fixed", fixed, None))
        inputs += (("moving_mask", moving_mask, 1), ("fixed_mask", fixed_mask, 1))
        for name, tensor, channels in inputs:
            if tensor is None:
                continue
            if tensor.ndim != len(shape) or tensor.shape[0] != shape[0] or tensor.shape[2:] != shape[2:]:
                raise ValueError(
                    f"{name} must be (B, C, *spatial) matching the DDFs {tuple(shape)}, got {tuple(tensor.shape)}"
                )
            if channels is not None and tensor.shape[1] != channels:
                raise ValueError(f"{name} must have 1 channel, got {tensor.shape[1]}")
        if moving.shape[1] != fixed.shape[1]:
            raise ValueError(
                f"moving and fixed must have the same channels, got {moving.shape[1]} and {fixed.shape[1]}"
            )

        terms: dict[str, torch.Tensor] = {}
        directions = (("forward", moving, fixed, forward_ddf, moving_mask, fixed_mask),
                      ("inverse", fixed, moving, inverse_ddf, fixed_mask, moving_mask))
        for direction, source, target, ddf, source_mask, target_mask in directions:
            mask = warped_validity_mask(ddf, source_mask)
            if target_mask is not None:
                mask = mask * target_mask.to(mask.dtype)
            terms[f"{direction}_similarity"] = self.similarity(warp(source, ddf) * mask, target * mask)
            for name, regularizer in self.regularizers.items():
                terms[f"{direction}_{name}"] = regularizer(ddf)
        loss = 0.5 * (terms["forward_similarity"] + terms["inverse_similarity"])
        for name, weight in self.weights.items():
            loss = loss + 0.5 * weight * (terms[f"forward_{name}"] + terms[f"inverse_{name}"])
        terms["loss"] = loss
        return terms
