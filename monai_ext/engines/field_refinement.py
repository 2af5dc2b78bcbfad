"""Test-time refinement of a pair's forward / inverse DDFs by symmetric, diffeomorphic corrections.

A trained network gives ``forward_ddf`` ``f`` (fixed grid -> moving image) and ``inverse_ddf`` ``g`` (moving grid
-> fixed image) in one pass. :func:`refine_fields` then optimises, for this one pair, two stationary velocity
fields on coarse copies of the two grids, ``v_f`` (fixed side) and ``v_m`` (moving side), and returns::

    forward' = exp(v_m) o f o exp(v_f)          inverse' = exp(-v_f) o g o exp(-v_m)

(``exp``: scaling and squaring, MONAI's ``DVF2DDF``; ``a o b``: :func:`monai_ext.spatial.sampling.compose`).
Each ``exp`` is a diffeomorphism whose inverse is ``exp(-v)``, so the refined pair stays as inverse consistent
and fold-free as the network's own. The loss is symmetric in the two images::

    sim(moving o forward', fixed) + sim(fixed o inverse', moving) + w (|grad v_f|^2 + |grad v_m|^2)

(``sim``: local NCC by default; gradients by forward differences on the coarse grids, mean of squares), so
swapping ``moving`` / ``fixed`` (and ``f`` / ``g``) gives the swapped result: the solution for the swapped pair
is ``(-v_m, -v_f)``, which Adam, elementwise and sign-equivariant, reaches step for step. For speed the loss uses
the network's fields averaged onto the coarse grids (:func:`~monai_ext.spatial.sampling.downsample_ddf`) and
composes there (the velocity grids are coarse
anyway); the images are warped at full resolution, and the returned DDFs compose the corrections with the
full-resolution ``f`` / ``g``.

Why not weights: :class:`monai_ext.engines.instance_optimization.InstanceOptimization` tunes the network's weights
(one network pass per step); correcting the fields directly costs no network pass, so a step is several times
cheaper, and the correction can follow this pair's anatomy more closely than the network's shared weights do.
The idea is that of instance optimisation after a learned registration (e.g. Siebert, Hansen & Heinrich,
"Fast 3D registration with accurate optimisation and little learning for Learn2Reg 2021", MICCAI 2021
workshops); MONAI has no such layer.

:class:`FieldRefinement` plugs it into a ``SupervisedEvaluator``'s ``iteration_update`` chain::

    "iteration_update": {"_target_": "monai_ext.engines.field_refinement.FieldRefinement",
                         "iteration": {"_target_": "monai_ext.engines.registration.RegistrationEvalIteration"},
                         "steps": 4}
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from monai.data import MetaTensor
from monai.networks.blocks import DVF2DDF

from monai_ext.engines.registration import forward_and_inverse
from monai_ext.errors import InputError
from monai_ext.losses.similarity import LocalNormalizedCrossCorrelation
from monai_ext.spatial.sampling import check_ddf, compose, downsample_ddf, sample, upsample_ddf

__all__ = ["refine_fields", "check_refinement_options", "FieldRefinement"]

logger = logging.getLogger(__name__)

# Adam's eps for the loss summed over coarse voxels: gradients of real image differences are ~0.1-1 there, float
# noise between identical images ~1e-5
_ADAM_EPS = 1e-2


def _check_inputs(
    moving: torch.Tensor, fixed: torch.Tensor, forward_ddf: torch.Tensor, inverse_ddf: torch.Tensor
) -> None:
    for name, image in (("moving", moving), ("fixed", fixed)):
        if not isinstance(image, torch.Tensor) or image.ndim not in (4, 5) or not image.is_floating_point():
            raise ValueError(
                f"{name} must be a floating-point (B, C, *spatial) tensor with 2 or 3 spatial dims, got "
                f"{type(image).__name__} {tuple(getattr(image, 'shape', ()))}"
            )
    check_ddf(forward_ddf, "forward_ddf")
    check_ddf(inverse_ddf, "inverse_ddf")
    expected = {
        "forward_ddf": (fixed.shape[0], fixed.ndim - 2, *fixed.shape[2:]),
        "inverse_ddf": (moving.shape[0], moving.ndim - 2, *moving.shape[2:]),
    }
    for name, ddf in (("forward_ddf", forward_ddf), ("inverse_ddf", inverse_ddf)):
        if tuple(ddf.shape) != expected[name]:
            grid = "fixed" if name == "forward_ddf" else "moving"
            raise ValueError(f"{name} must be {expected[name]} (on the {grid} grid), got {tuple(ddf.shape)}")
    if moving.shape[:2] != fixed.shape[:2]:
        raise ValueError(f"moving {tuple(moving.shape)} and fixed {tuple(fixed.shape)} differ in batch or channels")


def check_refinement_options(
    steps: int, learning_rate: float, regularization_weight: float, grid_factor: int, integration_steps: int
) -> None:
    """Raise :class:`~monai_ext.errors.InputError` (a ``ValueError``) for invalid field refinement settings (the
    arguments of :func:`refine_fields`)."""
    for name, value in (("steps", steps), ("grid_factor", grid_factor), ("integration_steps", integration_steps)):
        if isinstance(value, bool) or int(value) != value or value < (0 if name == "steps" else 1):
            bound = "non-negative" if name == "steps" else "positive"
            raise InputError(f"field refinement {name} must be a {bound} integer, got {value!r}")
    if not learning_rate > 0 or not regularization_weight >= 0:
        raise InputError(
            f"field refinement learning_rate must be positive and regularization_weight non-negative, got "
            f"{learning_rate!r} and {regularization_weight!r}"
        )


def refine_fields(
    moving: torch.Tensor,
    fixed: torch.Tensor,
    forward_ddf: torch.Tensor,
    inverse_ddf: torch.Tensor,
    steps: int = 4,
    learning_rate: float = 0.15,
    regularization_weight: float = 2.0,
    similarity: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    grid_factor: int = 2,
    integration_steps: int = 3,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Refine a forward / inverse DDF pair on one image pair (see the module docstring for the model).

    Args:
        moving: moving image ``(B, C, *spatial_moving)`` (``n = len(spatial)`` 2 or 3).
        fixed: fixed image ``(B, C, *spatial_fixed)``.
        forward_ddf: ``(B, n, *spatial_fixed)`` voxel DDF from fixed-grid voxels into the moving image.
        inverse_ddf: ``(B, n, *spatial_moving)`` voxel DDF from moving-grid voxels into the fixed image.
        steps: Adam steps; 0 returns the inputs.
        learning_rate: Adam's initial step size, in coarse-grid voxels, decayed linearly to ``learning_rate / steps``
            at the last step (the corrections settle instead of oscillating by a step size around the optimum).
        regularization_weight: weight ``w`` of the velocity fields' squared forward differences.
        similarity: ``(warped, target) -> scalar`` loss (lower is better); default local NCC with window 5.
        grid_factor: the velocity grids are ``ceil(spatial / grid_factor)``.
        integration_steps: scaling-and-squaring steps of each ``exp``.

    Returns:
        ``(forward_ddf, inverse_ddf)`` refined, same shapes and grids as the inputs, without gradients.
    """
    check_refinement_options(steps, learning_rate, regularization_weight, grid_factor, integration_steps)
    moving, fixed, forward_ddf, inverse_ddf = (
        t.as_tensor() if isinstance(t, MetaTensor) else t for t in (moving, fixed, forward_ddf, inverse_ddf)
    )
    _check_inputs(moving, fixed, forward_ddf, inverse_ddf)
    forward_ddf, inverse_ddf = forward_ddf.detach(), inverse_ddf.detach()
    if steps == 0:
        return forward_ddf, inverse_ddf
    similarity = LocalNormalizedCrossCorrelation(kernel_size=5) if similarity is None else similarity
    exp = DVF2DDF(num_steps=int(integration_steps), padding_mode="border")
    fixed_shape, moving_shape = fixed.shape[2:], moving.shape[2:]
    forward_coarse, inverse_coarse = downsample_ddf(forward_ddf, grid_factor), downsample_ddf(inverse_ddf, grid_factor)
    velocity_fixed = torch.zeros_like(forward_coarse, requires_grad=True)
    velocity_moving = torch.zeros_like(inverse_coarse, requires_grad=True)
    # the loss is a mean over voxels: scaled to a sum over the coarse voxels, its gradient per velocity voxel does not
    # shrink with the image size, and Adam's eps then damps the steps of gradients far below the images' own
    # (float noise: identical images stay put, instead of Adam normalising noise up to full-size steps)
    scale = (velocity_fixed[0, 0].numel() + velocity_moving[0, 0].numel()) / 2  # symmetric in the two grids
    optimizer = torch.optim.Adam([velocity_fixed, velocity_moving], lr=learning_rate, eps=_ADAM_EPS)
    moving, fixed = moving.detach(), fixed.detach()

    def roughness(velocity: torch.Tensor) -> torch.Tensor:
        return sum(velocity.diff(dim=d).pow(2).mean() for d in range(2, velocity.ndim))

    def exp_both(velocity: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``exp(v)``, ``exp(-v)`` in one batch (3-D ``grid_sample`` on CPU parallelises over the batch only)."""
        return exp(torch.cat([velocity, -velocity])).chunk(2)

    with torch.enable_grad():
        for step in range(1, int(steps) + 1):
            optimizer.param_groups[0]["lr"] = learning_rate * (steps + 1 - step) / steps  # linear decay
            optimizer.zero_grad(set_to_none=True)
            exp_fixed, exp_fixed_inverse = exp_both(velocity_fixed)
            exp_moving, exp_moving_inverse = exp_both(velocity_moving)
            forward_refined = compose(exp_moving, compose(forward_coarse, exp_fixed))
            inverse_refined = compose(exp_fixed_inverse, compose(inverse_coarse, exp_moving_inverse))
            forward_full = upsample_ddf(forward_refined, grid_factor, fixed_shape)
            inverse_full = upsample_ddf(inverse_refined, grid_factor, moving_shape)
            warped_moving = sample(moving, None, displacement=forward_full)
            warped_fixed = sample(fixed, None, displacement=inverse_full)
            loss = similarity(warped_moving, fixed) + similarity(warped_fixed, moving)
            loss = loss + regularization_weight * (roughness(velocity_fixed) + roughness(velocity_moving))
            value = float(loss.detach())
            loss = loss * scale
            if not math.isfinite(value):
                raise ValueError(f"field refinement loss became {value} at step {step}")
            loss.backward()
            optimizer.step()
            logger.debug(f"field refinement step {step}/{steps}: loss {value:.6f}")
    with torch.no_grad():
        exp_fixed = [upsample_ddf(e, grid_factor, fixed_shape) for e in exp_both(velocity_fixed)]
        exp_moving = [upsample_ddf(e, grid_factor, moving_shape) for e in exp_both(velocity_moving)]
        forward_out = compose(exp_moving[0], compose(forward_ddf, exp_fixed[0]))
        inverse_out = compose(exp_fixed[1], compose(inverse_ddf, exp_moving[1]))
    return forward_out, inverse_out


class _RefinedNetwork(torch.nn.Module):
    """``forward_and_inverse`` of ``network`` followed by :func:`refine_fields` (wraps, does not copy)."""

    def __init__(self, network: torch.nn.Module, options: Mapping[str, Any]) -> None:
        super().__init__()
        self.network = network
        self.options = dict(options)

    def forward_and_inverse(self, moving: torch.Tensor, fixed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            forward_ddf, inverse_ddf = forward_and_inverse(self.network, moving, fixed)
        return refine_fields(moving, fixed, forward_ddf, inverse_ddf, **self.options)


class FieldRefinement:
    """``iteration_update`` wrapper for ``SupervisedEvaluator``: the wrapped iteration sees ``engine.network``
    followed by :func:`refine_fields` on each pair (the network itself is not modified).

    Args:
        iteration: the wrapped ``iteration_update(engine, batchdata)`` (e.g.
            :class:`monai_ext.engines.registration.RegistrationEvalIteration`); it must obtain the DDFs through
            :func:`monai_ext.engines.registration.forward_and_inverse` of ``engine.network``.
        steps: refinement steps per pair; 0 runs ``iteration`` unchanged.
        learning_rate, regularization_weight, similarity, grid_factor, integration_steps: see :func:`refine_fields`.

    Inside :class:`monai_ext.engines.instance_optimization.InstanceOptimization` (which tunes the weights first),
    the refinement starts from the tuned copy's fields.
    """

    def __init__(
        self,
        iteration: Callable[[Any, Mapping[str, Any]], Any],
        steps: int = 4,
        learning_rate: float = 0.15,
        regularization_weight: float = 2.0,
        similarity: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        grid_factor: int = 2,
        integration_steps: int = 3,
    ) -> None:
        if not callable(iteration):
            raise ValueError(f"iteration must be callable (an iteration_update), got {type(iteration).__name__}")
        check_refinement_options(steps, learning_rate, regularization_weight, grid_factor, integration_steps)
        self.iteration = iteration
        self.options = {
            "steps": int(steps),
            "learning_rate": learning_rate,
            "regularization_weight": regularization_weight,
            "similarity": similarity,
            "grid_factor": grid_factor,
            "integration_steps": integration_steps,
        }

    def __call__(self, engine: Any, batchdata: Mapping[str, Any]) -> Any:
        if self.options["steps"] == 0:
            return self.iteration(engine, batchdata)
        original = engine.network
        engine.network = _RefinedNetwork(original, self.options)
        try:
            return self.iteration(engine, batchdata)
        finally:
            engine.network = original
