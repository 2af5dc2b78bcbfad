"""InstanceOptimization: per-pair fine-tuning of a copy of the network inside a SupervisedEvaluator."""

from __future__ import annotations

import pytest
import torch
from monai.engines import SupervisedEvaluator

from monai_ext.data.synthesis import make_synthetic_pair
from monai_ext.engines.instance_optimization import InstanceOptimization, KeyMorphPairLoss, SymmetricPairLoss
from monai_ext.engines.registration import RegistrationEvalIteration, forward_and_inverse
from monai_ext.networks.sitreg import SITReg

SHAPE = (16, 16)


def _network() -> SITReg:
    torch.manual_seed(0)
    return SITReg(2, features=[4, 8, 8], feature_convolutions=[1, 1, 1], deformation_features=[4, 8, 8],
                  deformation_convolutions=[1, 1, 1])  # fmt: skip


def _batch() -> dict:
    pair = make_synthetic_pair(SHAPE, seed=3, max_displacement=2.0)
    return {k: pair[k][None] for k in ("moving_image", "fixed_image", "moving_label", "fixed_label")}


def _evaluate(network, iteration, batch) -> tuple[SupervisedEvaluator, dict]:
    evaluator = SupervisedEvaluator(
        device=torch.device("cpu"),
        val_data_loader=[batch],
        network=network,
        iteration_update=iteration,
        decollate=False,
    )
    evaluator.run()
    return evaluator, evaluator.state.output


def test_steps_zero_is_the_plain_iteration():
    network, batch = _network(), _batch()
    _, plain = _evaluate(network, RegistrationEvalIteration(), batch)
    _, wrapped = _evaluate(network, InstanceOptimization(RegistrationEvalIteration(), steps=0), batch)
    assert plain.keys() == wrapped.keys()
    for key, value in plain.items():
        assert torch.equal(value, wrapped[key]), key


def test_loss_decreases_original_untouched_and_output_from_the_optimised_copy():
    network, batch = _network(), _batch()
    before = {k: v.clone() for k, v in network.state_dict().items()}
    optimisation = InstanceOptimization(RegistrationEvalIteration(), steps=20, learning_rate=1e-3, log_every=5)
    evaluator, output = _evaluate(network, optimisation, batch)
    losses = optimisation.losses
    assert len(losses) == 20
    # the loss of the pair before each of the 20 Adam steps: the last ones are clearly below the first ones
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 1e-4, losses
    assert evaluator.network is network
    assert all(torch.equal(before[k], v) for k, v in network.state_dict().items())
    _, plain = _evaluate(network, RegistrationEvalIteration(), batch)
    assert not torch.allclose(output["forward_ddf"], plain["forward_ddf"])  # the copy's (optimised) result
    # the wrapped iteration ran with the optimised copy: the pair loss of its output DDFs is below the initial loss
    terms = SymmetricPairLoss().loss_function(
        batch["moving_image"], batch["fixed_image"], output["forward_ddf"], output["inverse_ddf"]
    )
    assert float(terms["loss"]) < losses[0]


def test_callback_sees_every_step_with_the_copy_being_optimised():
    network, batch = _network(), _batch()
    optimisation = InstanceOptimization(RegistrationEvalIteration(), steps=4, learning_rate=1e-3)
    seen = []

    def callback(step, tuned):
        assert tuned is not network
        seen.append((step, next(tuned.parameters()).detach().clone()))

    tuned = optimisation.optimize(network, batch["moving_image"], batch["fixed_image"], callback=callback)
    assert [step for step, _ in seen] == [1, 2, 3, 4]
    assert not torch.equal(seen[0][1], seen[-1][1])  # each call sees the weights after its step
    assert torch.equal(seen[-1][1], next(tuned.parameters()))


def test_optimised_sitreg_copy_keeps_exact_symmetry():
    network, batch = _network(), _batch()
    optimisation = InstanceOptimization(RegistrationEvalIteration(), steps=5, learning_rate=1e-3)
    tuned = optimisation.optimize(network, batch["moving_image"], batch["fixed_image"])
    assert any(not torch.equal(a, b) for a, b in zip(tuned.state_dict().values(), network.state_dict().values()))
    with torch.no_grad():
        forward_ddf, inverse_ddf = tuned.forward_and_inverse(batch["moving_image"], batch["fixed_image"])
        swapped_forward, swapped_inverse = tuned.forward_and_inverse(batch["fixed_image"], batch["moving_image"])
    assert torch.equal(forward_ddf, swapped_inverse) and torch.equal(inverse_ddf, swapped_forward)


def test_pluggable_pair_loss_and_bad_arguments():
    network, batch = _network(), _batch()
    calls = []

    def smallest_displacement(net, moving, fixed, moving_mask, fixed_mask):
        forward_ddf, _ = forward_and_inverse(net, moving, fixed)
        calls.append(moving.shape)
        return {"loss": forward_ddf.square().mean()}

    optimisation = InstanceOptimization(RegistrationEvalIteration(), smallest_displacement, steps=3, learning_rate=1e-3)
    _evaluate(network, optimisation, batch)
    assert len(calls) == 3 and optimisation.losses[-1] < optimisation.losses[0]
    with pytest.raises(ValueError, match="steps"):
        InstanceOptimization(RegistrationEvalIteration(), steps=-1)
    with pytest.raises(ValueError, match="learning_rate"):
        InstanceOptimization(RegistrationEvalIteration(), steps=1, learning_rate=0)
    with pytest.raises(ValueError, match="'loss'"):
        InstanceOptimization(RegistrationEvalIteration(), lambda *a: {"total": torch.zeros(())}, steps=1).optimize(
            network, batch["moving_image"], batch["fixed_image"]
        )


def test_keymorph_pair_loss_decreases_and_leaves_the_network_untouched():
    """KeyMorph: tuning the keypoint detector on a translated blob pair lowers the unsupervised MSE."""
    from monai_ext.networks.keymorph import KeyMorph
    from monai_ext.networks.keypoints import TruncatedUNetKeypointNet

    torch.manual_seed(0)
    network = KeyMorph(TruncatedUNetKeypointNet(num_keypoints=8, f_maps=8, num_levels=3)).eval()
    grid = torch.stack(torch.meshgrid(*[torch.arange(20.0)] * 3, indexing="ij"))
    blob = lambda c: torch.exp(-((grid - torch.tensor(c).view(3, 1, 1, 1)) ** 2).sum(0) / 18)[None, None]  # noqa: E731
    moving, fixed = blob([9.0, 10.0, 9.0]), blob([11.0, 9.0, 10.0])
    before = {k: v.clone() for k, v in network.state_dict().items()}
    optimization = InstanceOptimization(lambda e, b: None, KeyMorphPairLoss("affine"), steps=15, learning_rate=1e-3)
    tuned = optimization.optimize(network, moving, fixed)
    first, last = optimization.losses[0], optimization.losses[-1]
    assert last < 0.8 * first, optimization.losses
    assert all(torch.equal(before[k], v) for k, v in network.state_dict().items())
    assert any(not torch.equal(before[k], v) for k, v in tuned.state_dict().items())
