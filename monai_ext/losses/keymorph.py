"""KeyMorph training losses (Yu et al., "KeyMorph", MIDL 2021; Wang et al., MedIA 2023), as the authors'
reference implementation trains with them.

* unsupervised: mean squared error of the warped moving image and the fixed image (``torch.nn.MSELoss``, the mean
  over batch, channels and voxels, as the reference's ``F.mse_loss``), or LNCC
  (:class:`~monai_ext.losses.similarity.LocalNormalizedCrossCorrelation`, an option the reference does not have);
* supervised: the reference's soft Dice on one-hot maps, per (batch item, channel)
  ``1 - (2 sum t p + 1) / (sum p^2 + sum t^2 + 1)``, **background included**, mean over batch and channels. This is
  exactly ``monai.losses.DiceLoss(squared_pred=True, smooth_nr=1, smooth_dr=1, include_background=True)`` (checked
  against outputs of the reference's ``softdiceloss`` in ``tests/test_keymorph_training.py``), so MONAI's class is
  used (:func:`keymorph_dice_loss`);
* keypoint consistency (legacy / tps branches): MSE between the keypoints of the same subject in two modalities
  after the same augmentation (:class:`KeypointConsistencyLoss`).
"""

from __future__ import annotations

import torch
from monai.losses import DiceLoss
from monai.utils import LossReduction, look_up_option
from torch import nn
from torch.nn.modules.loss import _Loss

from monai_ext.losses.similarity import LocalNormalizedCrossCorrelation

__all__ = ["keymorph_dice_loss", "KeyMorphLoss", "KeypointConsistencyLoss"]

_IMAGE_LOSSES = ("mse", "lncc")


def keymorph_dice_loss() -> DiceLoss:
    """KeyMorph's soft Dice loss (module docstring) as a configured ``monai.losses.DiceLoss``."""
    return DiceLoss(include_background=True, squared_pred=True, smooth_nr=1.0, smooth_dr=1.0)


def _check_pair(name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor) -> None:
    for name, value in ((name_a, a), (name_b, b)):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if a.ndim not in (4, 5) or a.shape != b.shape:
        raise ValueError(
            f"{name_a} and {name_b} must be (B, C, *spatial) with 2 or 3 spatial dims and equal shapes, "
            f"got {tuple(a.shape)} and {tuple(b.shape)}"
        )


class KeyMorphLoss(nn.Module):
    """The KeyMorph registration loss: a weighted sum of an image term and a label term.

    ``forward(moving_warped, fixed, moving_label_warped=None, fixed_label=None)`` returns a dict with the
    total ``"loss"`` and every active term under its name (``"mse"`` / ``"lncc"``, ``"dice"``), the shape the
    training iteration (:class:`monai_ext.engines.keymorph.KeyMorphTrainIteration`) puts into
    ``engine.state.output``. The reference trains with one term only: ``image_loss="mse"`` (unsupervised) or
    ``image_loss=None, label_loss="dice"`` (supervised).

    Args:
        image_loss: ``"mse"``, ``"lncc"`` or None.
        label_loss: ``"dice"`` (soft Dice on one-hot maps, :func:`keymorph_dice_loss`) or None.
        image_weight, label_weight: weights of the terms in the total.
        lncc_kernel_size: LNCC window.
    """

    def __init__(
        self,
        image_loss: str | None = "mse",
        label_loss: str | None = None,
        image_weight: float = 1.0,
        label_weight: float = 1.0,
        lncc_kernel_size: int = 7,
    ) -> None:
        super().__init__()
        if image_loss is not None and image_loss not in _IMAGE_LOSSES:
            raise ValueError(f"image_loss must be one of {_IMAGE_LOSSES} or None, got {image_loss!r}")
        if label_loss not in (None, "dice"):
            raise ValueError(f"label_loss must be 'dice' or None, got {label_loss!r}")
        if image_loss is None and label_loss is None:
            raise ValueError("at least one of image_loss and label_loss must be set")
        self.image_loss = image_loss
        self.label_loss = label_loss
        self.image_weight = float(image_weight)
        self.label_weight = float(label_weight)
        self.image_term = {
            None: None,
            "mse": nn.MSELoss(),
            "lncc": LocalNormalizedCrossCorrelation(lncc_kernel_size),
        }[image_loss]
        self.label_term = keymorph_dice_loss() if label_loss == "dice" else None

    @property
    def needs_labels(self) -> bool:
        """Whether :meth:`forward` needs the one-hot label maps."""
        return self.label_term is not None

    def forward(
        self,
        moving_warped: torch.Tensor,
        fixed: torch.Tensor,
        moving_label_warped: torch.Tensor | None = None,
        fixed_label: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """
        Args:
            moving_warped: the moving image warped onto the fixed grid ``(B, C, *spatial)``.
            fixed: the fixed image, same shape.
            moving_label_warped: the moving one-hot label map warped (linearly) onto the fixed grid
                ``(B, L, *spatial)``; required by ``label_loss``.
            fixed_label: the fixed one-hot label map ``(B, L, *spatial)`` with the same channel order.

        Returns:
            ``{"loss": total, <term>: value, ...}`` (scalars).
        """
        terms: dict[str, torch.Tensor] = {}
        total = None
        if self.image_term is not None:
            _check_pair("moving_warped", moving_warped, "fixed", fixed)
            terms[self.image_loss] = self.image_term(moving_warped, fixed)
            total = self.image_weight * terms[self.image_loss]
        if self.label_term is not None:
            if moving_label_warped is None or fixed_label is None:
                raise ValueError("label_loss='dice' needs moving_label_warped and fixed_label (one-hot maps)")
            _check_pair("moving_label_warped", moving_label_warped, "fixed_label", fixed_label)
            terms["dice"] = self.label_term(moving_label_warped, fixed_label)
            weighted = self.label_weight * terms["dice"]
            total = weighted if total is None else total + weighted
        terms["loss"] = total
        return terms


class KeypointConsistencyLoss(_Loss):
    """Keypoint consistency (legacy / tps KeyMorph): ``MSE(points_1, points_2)``, the mean over batch, keypoints
    and coordinates of normalised keypoints ``(B, K, n)`` detected in two co-registered images of one subject
    (e.g. T1 and T2) after the *same* augmentation. The reference scales it by ``kpconsistency_coeff``
    (10 in its README's example); here that is the training iteration's ``consistency_weight``.

    Args:
        reduction: a :class:`monai.utils.LossReduction` of the squared errors: ``"mean"`` (the loss), ``"sum"``
            or ``"none"`` (``(B, K, n)``).
    """

    def __init__(self, reduction: LossReduction | str = LossReduction.MEAN) -> None:
        super().__init__(reduction=look_up_option(reduction, LossReduction).value)

    def forward(self, points_1: torch.Tensor, points_2: torch.Tensor) -> torch.Tensor:
        for name, value in (("points_1", points_1), ("points_2", points_2)):
            if not isinstance(value, torch.Tensor) or value.ndim != 3 or value.shape[-1] not in (2, 3):
                shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                raise ValueError(f"{name} must be (B, K, n) keypoints with n in (2, 3), got {shape}")
        if points_1.shape != points_2.shape:
            raise ValueError(f"points_1 {tuple(points_1.shape)} and points_2 {tuple(points_2.shape)} must match")
        return nn.functional.mse_loss(points_1, points_2, reduction=self.reduction)
