"""Instance (test-time) optimisation: fine-tune a copy of the network on each evaluated pair before inferring it.

:class:`InstanceOptimization` wraps an evaluator ``iteration_update`` (e.g.
:class:`monai_ext.engines.registration.RegistrationEvalIteration`)::

    "iteration_update": {
        "_target_": "monai_ext.engines.instance_optimization.InstanceOptimization",
        "iteration": {"_target_": "monai_ext.engines.registration.RegistrationEvalIteration"},
        "loss_function": {"_target_": "monai_ext.engines.instance_optimization.SymmetricPairLoss",
                          "loss_function": "@loss"},
        "steps": 50, "learning_rate": 1e-4}

Per pair it deep-copies ``engine.network``, runs ``steps`` Adam steps on the pair's own unsupervised loss,
runs the wrapped iteration with the copy and puts the original network back, so every pair starts from the
trained weights and the trained network is never modified. Only the weights change, not the architecture:
SITReg's symmetry, inverse consistency and topology preservation hold for the optimised copy as for any
weights. The pair loss is pluggable: any ``pair_loss(network, moving, fixed, moving_mask, fixed_mask)``
returning a dict with a scalar ``"loss"``; :class:`SymmetricPairLoss` is the SITReg training objective,
:class:`KeyMorphPairLoss` KeyMorph's unsupervised one (the keypoint detector is tuned; the closed-form
alignment stays the same).
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from monai.data import MetaTensor

from monai_ext.engines.registration import forward_and_inverse, pair_from_batch
from monai_ext.errors import InputError
from monai_ext.spatial.sampling import warp

__all__ = ["PairLoss", "SymmetricPairLoss", "KeyMorphPairLoss", "InstanceOptimization"]

PairLoss = Callable[
    [torch.nn.Module, torch.Tensor, torch.Tensor, "torch.Tensor | None", "torch.Tensor | None"],
    Mapping[str, torch.Tensor],
]


class SymmetricPairLoss:
    """Pair loss of a network with forward and inverse DDFs: ``loss_function(moving, fixed, forward_ddf, inverse_ddf)``.

    Args:
        loss_function: e.g. :class:`monai_ext.losses.symmetric.SymmetricRegistrationLoss` (returns a dict with
            ``"loss"`` and its terms) or any callable returning a scalar; default: the SITReg OASIS objective,
            local NCC (window 7) + gradient regulariser with weight 1.
    """

    def __init__(self, loss_function: Callable[..., Any] | None = None) -> None:
        if loss_function is None:
            from monai_ext.losses.regularization import GradientDeformationLoss
            from monai_ext.losses.similarity import LocalNormalizedCrossCorrelation
            from monai_ext.losses.symmetric import SymmetricRegistrationLoss

            loss_function = SymmetricRegistrationLoss(
                LocalNormalizedCrossCorrelation(kernel_size=7), {"grad": (GradientDeformationLoss(), 1.0)}
            )
        self.loss_function = loss_function

    def __call__(
        self,
        network: torch.nn.Module,
        moving: torch.Tensor,
        fixed: torch.Tensor,
        moving_mask: torch.Tensor | None = None,
        fixed_mask: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """``moving``, ``fixed`` ``(B, C, *spatial)``; masks ``(B, 1, *spatial)`` or ``None``."""
        forward_ddf, inverse_ddf = forward_and_inverse(network, moving, fixed)
        terms = self.loss_function(
            moving, fixed, forward_ddf, inverse_ddf, moving_mask=moving_mask, fixed_mask=fixed_mask
        )
        return dict(terms) if isinstance(terms, Mapping) else {"loss": terms}


class KeyMorphPairLoss:
    """Unsupervised KeyMorph pair loss: ``image_loss(warp(moving, ddf), fixed)`` for one alignment.

    Args:
        alignment: the alignment whose DDF is optimised (``affine``, ``rigid``, ``tps_<lambda>``).
        image_loss: ``(warped moving, fixed) -> scalar``; default MSE (KeyMorph's unsupervised loss); use
            :class:`monai_ext.losses.similarity.LocalNormalizedCrossCorrelation` for multi-contrast pairs.
    """

    def __init__(self, alignment: str = "affine", image_loss: Callable[..., torch.Tensor] | None = None) -> None:
        self.alignment = alignment
        self.image_loss = torch.nn.MSELoss() if image_loss is None else image_loss

    def __call__(
        self,
        network: torch.nn.Module,
        moving: torch.Tensor,
        fixed: torch.Tensor,
        moving_mask: torch.Tensor | None = None,
        fixed_mask: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """``moving``, ``fixed`` ``(B, C, D, H, W)``; ``network`` a :class:`~monai_ext.networks.keymorph.KeyMorph`."""
        ddf = network.register(moving, fixed, [self.alignment])[self.alignment]["ddf"]
        return {"loss": self.image_loss(warp(moving, ddf), fixed)}


def _plain(tensor: torch.Tensor | None) -> torch.Tensor | None:
    return tensor.as_tensor() if isinstance(tensor, MetaTensor) else tensor


class InstanceOptimization:
    """``iteration_update`` wrapper for ``SupervisedEvaluator`` optimising a copy of the network per pair.

    Args:
        iteration: the wrapped ``iteration_update(engine, batchdata)``, run with the optimised copy as
            ``engine.network``.
        loss_function: pair loss ``(network, moving, fixed, moving_mask, fixed_mask) -> {"loss": scalar, ...}``
            (:data:`PairLoss`); default :class:`SymmetricPairLoss` (SITReg).
        steps: Adam steps per pair; 0 runs ``iteration`` unchanged on the original network.
        learning_rate: Adam learning rate.
        log_every: log the loss every ``log_every`` steps (and the first and last step).
        moving_key, fixed_key: batch keys of the images.
        moving_mask_key, fixed_mask_key: optional batch keys of masks passed to the loss.

    The copy is optimised in ``eval`` mode (normalisation layers with running statistics keep them; SITReg has
    only GroupNorm, which is unaffected) with gradients enabled even though the evaluator runs without them.
    ``losses`` holds the loss of every step of the last pair (before each update), for monitoring.
    """

    def __init__(
        self,
        iteration: Callable[[Any, Mapping[str, Any]], Any],
        loss_function: PairLoss | None = None,
        steps: int = 0,
        learning_rate: float = 1e-4,
        log_every: int = 10,
        moving_key: str = "moving_image",
        fixed_key: str = "fixed_image",
        moving_mask_key: str | None = None,
        fixed_mask_key: str | None = None,
    ) -> None:
        if not callable(iteration):
            raise ValueError(f"iteration must be callable (an iteration_update), got {type(iteration).__name__}")
        if isinstance(steps, bool) or int(steps) != steps or steps < 0:
            raise InputError(f"instance optimisation steps must be a non-negative integer, got {steps!r}")
        if not learning_rate > 0:
            raise InputError(f"instance optimisation learning_rate must be positive, got {learning_rate!r}")
        if log_every < 1:
            raise ValueError(f"log_every must be >= 1, got {log_every}")
        self.iteration = iteration
        self.loss_function = SymmetricPairLoss() if loss_function is None else loss_function
        self.steps = int(steps)
        self.learning_rate = float(learning_rate)
        self.log_every = int(log_every)
        self.keys = (moving_key, fixed_key, moving_mask_key, fixed_mask_key)
        self.losses: list[float] = []
        self.logger = logging.getLogger(__name__)

    def optimize(
        self,
        network: torch.nn.Module,
        moving: torch.Tensor,
        fixed: torch.Tensor,
        moving_mask: torch.Tensor | None = None,
        fixed_mask: torch.Tensor | None = None,
        callback: Callable[[int, torch.nn.Module], None] | None = None,
    ) -> torch.nn.Module:
        """A copy of ``network`` after ``steps`` Adam steps on the pair loss (``network`` is not modified);
        ``callback(step, copy)`` runs after each step (e.g. to score the copy along the way)."""
        tuned = copy.deepcopy(network)
        tuned.eval()
        parameters = [p for p in tuned.parameters() if p.requires_grad]
        if not parameters:
            raise ValueError(f"{type(network).__name__} has no trainable parameters to optimise")
        optimizer = torch.optim.Adam(parameters, lr=self.learning_rate)
        moving, fixed, moving_mask, fixed_mask = (_plain(t) for t in (moving, fixed, moving_mask, fixed_mask))
        self.losses = []
        with torch.enable_grad():
            for step in range(1, self.steps + 1):
                optimizer.zero_grad(set_to_none=True)
                terms = self.loss_function(tuned, moving, fixed, moving_mask, fixed_mask)
                if not isinstance(terms, Mapping) or "loss" not in terms:
                    raise ValueError("loss_function must return a dict with key 'loss'")
                loss = terms["loss"].mean()
                value = float(loss.detach())
                if not math.isfinite(value):
                    raise ValueError(f"instance optimisation loss became {value} at step {step}")
                self.losses.append(value)
                loss.backward()
                optimizer.step()
                if step == 1 or step == self.steps or step % self.log_every == 0:
                    self.logger.info(f"instance optimisation step {step}/{self.steps}: loss {value:.6f}")
                if callback is not None:
                    callback(step, tuned)
        return tuned

    def __call__(self, engine: Any, batchdata: Mapping[str, Any]) -> Any:
        if self.steps == 0:
            return self.iteration(engine, batchdata)
        moving, fixed, moving_mask, fixed_mask = pair_from_batch(engine, batchdata, self.keys)
        original = engine.network
        engine.network = self.optimize(original, moving, fixed, moving_mask, fixed_mask)
        try:
            return self.iteration(engine, batchdata)
        finally:
            engine.network = original
