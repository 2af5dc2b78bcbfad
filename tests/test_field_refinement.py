"""Field refinement: recovery of a known deformation, exact symmetry, inverse consistency, the evaluator wrapper."""

from __future__ import annotations

import pytest
import torch
from monai.networks.blocks import DVF2DDF
from monai.networks.layers import GaussianFilter

from monai_ext.engines.field_refinement import FieldRefinement, refine_fields
from monai_ext.engines.registration import forward_and_inverse
from monai_ext.metrics.deformation import folding_fraction
from monai_ext.spatial.sampling import compose, warp

SHAPE = (32, 36, 28)


def _smooth(generator: torch.Generator, channels: int, sigma: float, scale: float) -> torch.Tensor:
    noise = torch.randn(1, channels, *SHAPE, generator=generator, dtype=torch.float64)
    field = GaussianFilter(3, sigma)(noise)
    return field * (scale / field.abs().max())


def _pair(seed: int = 0, magnitude: float = 2.5):
    """A textured fixed image, a smooth diffeomorphism ``T = exp(w)`` (fixed grid -> moving) of up to ``magnitude``
    voxels, and the moving image ``fixed o T^-1`` (so that ``moving o T = fixed`` up to interpolation)."""
    generator = torch.Generator().manual_seed(seed)
    fixed = _smooth(generator, 1, 2.0, 1.0).abs().float()
    velocity = _smooth(generator, 3, 5.0, magnitude)
    exp = DVF2DDF(num_steps=7, padding_mode="border")
    truth, truth_inverse = exp(velocity).float(), exp(-velocity).float()
    moving = warp(fixed, truth_inverse)
    return moving, fixed, truth, truth_inverse


def _interior(ddf: torch.Tensor, margin: int = 4) -> torch.Tensor:
    return ddf[..., margin:-margin, margin:-margin, margin:-margin]


def test_recovers_a_known_deformation_from_identity_fields():
    moving, fixed, truth, truth_inverse = _pair()
    zero = torch.zeros_like(truth)
    forward, inverse = refine_fields(moving, fixed, zero, zero, steps=60, learning_rate=0.1, regularization_weight=0.1)
    before = _interior(truth).abs().mean()
    assert _interior(forward - truth).abs().mean() < 0.35 * before, (_interior(forward - truth).abs().mean(), before)
    assert _interior(inverse - truth_inverse).abs().mean() < 0.35 * before
    # the refined pair stays inverse consistent and fold-free (diffeomorphic corrections)
    assert _interior(compose(forward, inverse)).abs().mean() < 0.05
    assert float(folding_fraction(forward.double())[0]) == 0 and float(folding_fraction(inverse.double())[0]) == 0


def test_improves_the_similarity_starting_from_a_partial_registration():
    moving, fixed, truth, truth_inverse = _pair(seed=1)
    forward, inverse = 0.5 * truth, 0.5 * truth_inverse  # a network that got half way
    refined, _ = refine_fields(moving, fixed, forward, inverse, steps=20)
    assert (warp(moving, refined) - fixed).abs().mean() < 0.7 * (warp(moving, forward) - fixed).abs().mean()


def test_swapping_the_images_swaps_the_refined_fields():
    moving, fixed, truth, truth_inverse = _pair(seed=2)
    forward, inverse = 0.3 * truth, 0.3 * truth_inverse
    a_forward, a_inverse = refine_fields(moving, fixed, forward, inverse, steps=6)
    b_forward, b_inverse = refine_fields(fixed, moving, inverse, forward, steps=6)
    assert (a_forward - forward).abs().max() > 0.1  # it moved
    torch.testing.assert_close(a_forward, b_inverse, atol=2e-4, rtol=0)
    torch.testing.assert_close(a_inverse, b_forward, atol=2e-4, rtol=0)


def test_grids_of_different_sizes_and_zero_steps():
    generator = torch.Generator().manual_seed(3)
    moving, fixed = torch.rand(1, 1, 20, 24, 18, generator=generator), torch.rand(1, 1, 17, 22, 25, generator=generator)
    forward, inverse = torch.zeros(1, 3, 17, 22, 25), torch.zeros(1, 3, 20, 24, 18)
    same = refine_fields(moving, fixed, forward, inverse, steps=0)
    assert same[0] is forward or torch.equal(same[0], forward)
    refined = refine_fields(moving, fixed, forward, inverse, steps=2)
    assert refined[0].shape == forward.shape and refined[1].shape == inverse.shape
    assert torch.isfinite(refined[0]).all() and not refined[0].requires_grad


@pytest.mark.parametrize(
    "change, message",
    [
        ({"forward_ddf": torch.zeros(1, 3, 8, 8, 9)}, "forward_ddf must be"),
        ({"inverse_ddf": torch.zeros(1, 2, 8, 8, 8)}, "inverse_ddf must have shape"),
        ({"moving": torch.zeros(1, 2, 8, 8, 8)}, "differ in batch or channels"),
        ({"fixed": torch.zeros(1, 1, 8, 8, 8, dtype=torch.int64)}, "fixed must be a floating-point"),
        ({"steps": -1}, "steps must be a non-negative integer"),
        ({"steps": 2.5}, "steps must be a non-negative integer"),
        ({"learning_rate": 0.0}, "learning_rate must be positive"),
        ({"grid_factor": 0}, "grid_factor must be a positive integer"),
        ({"integration_steps": 0}, "integration_steps must be a positive integer"),
    ],
)
def test_bad_inputs_are_refused_clearly(change, message):
    arguments = {
        "moving": torch.rand(1, 1, 8, 8, 8),
        "fixed": torch.rand(1, 1, 8, 8, 8),
        "forward_ddf": torch.zeros(1, 3, 8, 8, 8),
        "inverse_ddf": torch.zeros(1, 3, 8, 8, 8),
    }
    with pytest.raises(ValueError, match=message):
        refine_fields(**{**arguments, **change})


class _Fixed(torch.nn.Module):
    """A 'network' returning given fields (and counting its calls)."""

    def __init__(self, forward: torch.Tensor, inverse: torch.Tensor) -> None:
        super().__init__()
        self.fields, self.calls = (forward, inverse), 0

    def forward_and_inverse(self, moving, fixed):
        self.calls += 1
        return self.fields


class _Engine:
    def __init__(self, network):
        self.network = network


def test_evaluator_wrapper_refines_the_network_fields_and_restores_the_network():
    moving, fixed, truth, truth_inverse = _pair(seed=4)
    network = _Fixed(0.5 * truth, 0.5 * truth_inverse)
    engine = _Engine(network)
    seen = {}

    def iteration(engine, batch):
        with torch.no_grad():  # as the evaluator's iteration does
            seen["fields"] = forward_and_inverse(engine.network, batch["moving_image"], batch["fixed_image"])
        return "done"

    wrapper = FieldRefinement(iteration, steps=5)
    assert wrapper(engine, {"moving_image": moving, "fixed_image": fixed}) == "done"
    assert engine.network is network and network.calls == 1
    expected = refine_fields(moving, fixed, *network.fields, steps=5)
    for got, want in zip(seen["fields"], expected):
        torch.testing.assert_close(got, want)
    FieldRefinement(iteration, steps=0)(engine, {"moving_image": moving, "fixed_image": fixed})
    assert seen["fields"][0] is network.fields[0]  # 0 steps: the network's fields untouched
    with pytest.raises(ValueError, match="iteration must be callable"):
        FieldRefinement(None)
