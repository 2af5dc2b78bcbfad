"""KeyMorph losses, pretraining and training iterations with MONAI's SupervisedTrainer."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import load_npz
from ignite.engine import Events
from monai.engines import SupervisedTrainer
from monai.engines.utils import IterationEvents

from monai_ext.data.keymorph_augmentation import apply_keymorph_affine
from monai_ext.engines.keymorph import (
    KeyMorphPretrainIteration,
    KeyMorphTrainIteration,
    ReferenceKeypoints,
    label_centroids,
    one_hot_label_pair,
    sample_reference_points,
)
from monai_ext.losses.keymorph import KeyMorphLoss, KeypointConsistencyLoss, keymorph_dice_loss
from monai_ext.losses.similarity import LocalNormalizedCrossCorrelation
from monai_ext.networks.keymorph import KeyMorph
from monai_ext.networks.keypoints import KeypointDetector, TruncatedUNetKeypointNet

# ------------------------------------------------------------------------------------------------- losses


def _reference_soft_dice(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """KeyMorph's soft Dice: per (item, channel) 1 - (2 sum t p + 1) / (sum p^2 + sum t^2 + 1), mean incl.
    background."""
    p, t = pred.flatten(2), target.flatten(2)
    return (1 - (2 * (p * t).sum(-1) + 1) / ((p * p).sum(-1) + (t * t).sum(-1) + 1)).mean()


@pytest.mark.parametrize("alignment", ["affine", "tps_0", "rigid"])
def test_soft_dice_matches_reference(alignment):
    """MONAI's DiceLoss(squared_pred, smooth 1, background) reproduces the reference's ``softdiceloss``."""
    forward, metrics = load_npz("keymorph", "full_forward.npz"), load_npz("keymorph", "metrics.npz")
    seg_a, seg_f = torch.from_numpy(forward[f"{alignment}/seg_a"]), torch.from_numpy(forward["seg_f_onehot"])
    terms = KeyMorphLoss(image_loss=None, label_loss="dice")(seg_a, seg_a, seg_a, seg_f)
    # float32 sums over 32^3 voxels vs the reference's float32 sums: measured 6e-8
    np.testing.assert_allclose(terms["dice"].item(), metrics[f"{alignment}/softdiceloss"], rtol=1e-6, atol=0)
    assert terms["loss"].item() == terms["dice"].item()


def test_soft_dice_formula_and_gradients():
    pred = torch.rand(2, 4, 5, 6, 7, dtype=torch.float64, requires_grad=True)
    target = F.one_hot(torch.randint(0, 4, (2, 5, 6, 7)), 4).permute(0, 4, 1, 2, 3).double()
    ours, reference = keymorph_dice_loss()(pred, target), _reference_soft_dice(pred, target)
    torch.testing.assert_close(ours, reference, atol=1e-12, rtol=0)
    grads = torch.autograd.grad(ours, pred)[0], torch.autograd.grad(reference, pred)[0]
    torch.testing.assert_close(*grads, atol=1e-12, rtol=0)
    # identical one-hot maps give exactly 0 (num = den for every channel, absent channels included)
    assert keymorph_dice_loss()(target, target).item() == 0.0


def test_image_losses_and_weights():
    moving, fixed = torch.rand(2, 1, 9, 10, 11), torch.rand(2, 1, 9, 10, 11)
    labels_m = F.one_hot(torch.randint(0, 3, (2, 9, 10, 11)), 3).permute(0, 4, 1, 2, 3).float()
    labels_f = F.one_hot(torch.randint(0, 3, (2, 9, 10, 11)), 3).permute(0, 4, 1, 2, 3).float()
    mse = KeyMorphLoss("mse")(moving, fixed)
    torch.testing.assert_close(mse["mse"], F.mse_loss(moving, fixed))
    lncc = KeyMorphLoss("lncc", lncc_kernel_size=5)(moving, fixed)
    torch.testing.assert_close(lncc["lncc"], LocalNormalizedCrossCorrelation(5)(moving, fixed))
    both = KeyMorphLoss("mse", "dice", image_weight=2.0, label_weight=0.5)(moving, fixed, labels_m, labels_f)
    torch.testing.assert_close(both["loss"], 2.0 * both["mse"] + 0.5 * both["dice"])
    torch.testing.assert_close(both["dice"], _reference_soft_dice(labels_m, labels_f))
    assert not KeyMorphLoss("mse").needs_labels and KeyMorphLoss(None, "dice").needs_labels


def test_keypoint_consistency_loss():
    a = torch.rand(2, 8, 3)
    assert KeypointConsistencyLoss()(a, a).item() == 0.0
    b = a + torch.tensor([0.1, -0.2, 0.3])
    # mean over coordinates of the squared offsets: (0.01 + 0.04 + 0.09) / 3
    torch.testing.assert_close(KeypointConsistencyLoss()(a, b), torch.tensor(0.14 / 3), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="points_1"):
        KeypointConsistencyLoss()(torch.rand(2, 8), b)
    with pytest.raises(ValueError, match="must match"):
        KeypointConsistencyLoss()(a, b[:, :4])


def test_loss_bad_inputs():
    with pytest.raises(ValueError, match="image_loss"):
        KeyMorphLoss("ncc")
    with pytest.raises(ValueError, match="at least one"):
        KeyMorphLoss(None, None)
    with pytest.raises(ValueError, match="moving_label_warped"):
        KeyMorphLoss(None, "dice")(torch.rand(1, 1, 4, 4, 4), torch.rand(1, 1, 4, 4, 4))
    with pytest.raises(ValueError, match="equal shapes"):
        KeyMorphLoss("mse")(torch.rand(1, 1, 4, 4, 4), torch.rand(1, 1, 4, 4, 5))


# ----------------------------------------------------------------------------------- reference points, labels


def test_reference_points_lie_on_bright_voxels():
    image = torch.zeros(2, 1, 10, 11, 12)
    image[0, 0, 2:5, 3:9, 4:6] = 1.0
    image[1, 0, 7, 1, 9] = 0.5
    points = sample_reference_points(image, 50, threshold=0.1, generator=torch.Generator().manual_seed(0))
    assert points.shape == (2, 50, 3)
    # back to voxel indices with our convention i = (p + 1) (N - 1) / 2: integers on bright voxels
    voxels = (points + 1) * (torch.tensor([10.0, 11.0, 12.0]) - 1) / 2
    torch.testing.assert_close(voxels, voxels.round(), atol=1e-5, rtol=0)
    idx = voxels.round().long()
    for b in range(2):
        assert (image[b, 0, idx[b, :, 0], idx[b, :, 1], idx[b, :, 2]] > 0.1).all()
    # the single bright voxel of item 1 at (7, 1, 9): -1 + 2 i / (N - 1) = (5/9, -4/5, 7/11)
    torch.testing.assert_close(points[1], torch.tensor([5 / 9, -0.8, 7 / 11]).expand(50, 3), atol=1e-6, rtol=0)
    assert len({tuple(p) for p in idx[0].tolist()}) > 10  # many distinct voxels of the 36 in the box
    again = sample_reference_points(image, 50, threshold=0.1, generator=torch.Generator().manual_seed(0))
    assert torch.equal(points, again)
    with pytest.raises(ValueError, match="no voxel above"):
        sample_reference_points(image, 5, threshold=2.0)


def test_reference_keypoints_are_saved_with_the_checkpoint():
    holder = ReferenceKeypoints(6)
    with pytest.raises(ValueError, match="not sampled"):
        holder()
    holder.sample_(torch.rand(1, 1, 8, 8, 8), generator=torch.Generator().manual_seed(0))
    restored = ReferenceKeypoints(6)
    restored.load_state_dict(holder.state_dict())
    assert bool(restored.initialized) and torch.equal(restored(), holder())


def test_one_hot_label_pair():
    fixed = torch.tensor([0, 1, 2, 5, 7]).view(1, 1, 5, 1, 1).expand(1, 1, 5, 2, 2)
    moving = torch.tensor([0, 2, 3, 5, 5]).view(1, 1, 5, 1, 1).expand(1, 1, 5, 2, 2)
    f, m, labels = one_hot_label_pair(fixed, moving)
    assert labels.tolist() == [0, 1, 2, 3, 5, 7] and f.shape == (1, 6, 5, 2, 2)
    assert torch.equal(f.argmax(1), torch.tensor([0, 1, 2, 4, 5]).view(1, 5, 1, 1).expand(1, 5, 2, 2))
    _, _, labels = one_hot_label_pair(fixed, moving, num_labels=8)
    assert labels.tolist() == list(range(8))
    # subset: only labels present in both ({0, 2, 5}), at most 2 of them, same channel order for both maps
    f, m, labels = one_hot_label_pair(fixed, moving, max_channels=2, generator=torch.Generator().manual_seed(0))
    assert len(labels) == 2 and set(labels.tolist()) <= {0, 2, 5}
    for c, value in enumerate(labels.tolist()):
        assert torch.equal(f[:, c].bool(), fixed[:, 0] == value) and torch.equal(m[:, c].bool(), moving[:, 0] == value)
    _, _, labels = one_hot_label_pair(fixed, moving, max_channels=10)
    assert sorted(labels.tolist()) == [0, 2, 5]
    with pytest.raises(ValueError, match="num_labels"):
        one_hot_label_pair(fixed, moving, num_labels=4)
    with pytest.raises(ValueError, match="fixed_label"):
        one_hot_label_pair(fixed[:, 0], moving)


# ------------------------------------------------------------------------------------------ training runs

SIZE = 24  # 24^3 blobs: heatmaps 12^3; a step takes ~0.1-0.3 s on one thread


def _blob_case(generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Three Gaussian blobs (sigma 0.15) with jittered centres and their label map (balls of radius 0.2)."""
    grid = torch.stack(torch.meshgrid(*[torch.linspace(-1, 1, SIZE)] * 3, indexing="ij"))
    image, label = torch.zeros(SIZE, SIZE, SIZE), torch.zeros(SIZE, SIZE, SIZE, dtype=torch.long)
    for value, center in enumerate([(-0.3, -0.2, 0.1), (0.3, 0.1, -0.2), (0.0, 0.35, 0.3)], start=1):
        center = torch.tensor(center) + 0.05 * torch.randn(3, generator=generator)
        d2 = ((grid - center.view(3, 1, 1, 1)) ** 2).sum(0)
        image += torch.exp(-d2 / (2 * 0.15**2))
        label[d2 < 0.2**2] = value
    return image[None].clamp(0, 1), label[None]


@pytest.fixture
def one_thread():
    """The test machine's cores are shared: one thread is several times faster than two under contention."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _detector() -> KeypointDetector:
    return KeypointDetector(TruncatedUNetKeypointNet(1, 8, 3, f_maps=8, num_levels=3, num_groups=4))


def _detector3() -> KeypointDetector:
    return KeypointDetector(TruncatedUNetKeypointNet(1, 3, 3, f_maps=8, num_levels=3, num_groups=4))


def _run(network, data, iteration, loss, epochs, lr=1e-3, decollate=False):
    loader = torch.utils.data.DataLoader(data, batch_size=1, shuffle=True, generator=torch.Generator().manual_seed(2))
    trainer = SupervisedTrainer(
        device=torch.device("cpu"),
        max_epochs=epochs,
        train_data_loader=loader,
        network=network,
        optimizer=torch.optim.Adam(network.parameters(), lr),
        loss_function=loss,
        iteration_update=iteration,
        decollate=decollate,
    )
    outputs = []  # the first item if decollated (every item holds the scalar loss terms)
    trainer.add_event_handler(
        Events.ITERATION_COMPLETED, lambda e: outputs.append(e.state.output[0] if decollate else e.state.output)
    )
    events = []
    for event in (IterationEvents.FORWARD_COMPLETED, IterationEvents.LOSS_COMPLETED, IterationEvents.MODEL_COMPLETED):
        trainer.add_event_handler(event, lambda e, name=event.name: events.append(name))
    trainer.run()
    losses = np.array([torch.as_tensor(o["loss"]).item() for o in outputs])  # decollated: a float
    return outputs, losses, events


def _decreases(losses: np.ndarray) -> tuple[float, float]:
    third = len(losses) // 3
    return float(losses[:third].mean()), float(losses[-third:].mean())


def test_pretraining_loss_decreases(one_thread):
    generator = torch.Generator().manual_seed(1)
    data = [{"image": _blob_case(generator)[0]} for _ in range(4)]
    torch.manual_seed(0)
    detector, reference = _detector(), ReferenceKeypoints(8)
    iteration = KeyMorphPretrainIteration(reference, (0.1, 0.1, 0.3, 0.05), affine_slope=2, seed=3)
    outputs, losses, events = _run(detector, data, iteration, torch.nn.MSELoss(), epochs=10)
    first, last = _decreases(losses)
    assert last < 0.5 * first, (first, last)  # measured 0.028 -> 0.007
    assert bool(reference.initialized) and events[:3] == ["FORWARD_COMPLETED", "LOSS_COMPLETED", "MODEL_COMPLETED"]
    # the targets are the reference points moved by the iteration's augmentation matrix
    out = outputs[-1]
    moved = apply_keymorph_affine(out["matrix"], points=reference()[None])["points"]
    torch.testing.assert_close(out["points_target"], moved)
    # the ramp: epoch 1 of slope 2 halves every maximum, so the offsets are within 0.05 (then 0.1)
    assert outputs[0]["matrix"][0, :3, 3].abs().max() <= 0.05 * 1.05 * 1.1 + 1e-6
    assert out["image_augmented"].shape == out["image"].shape


def test_label_centroids_are_normalised_keypoints_of_each_label():
    label = torch.zeros(2, 1, 5, 7, 9, dtype=torch.long)
    label[0, 0, 1:3, 2, 4] = 1
    label[0, 0, 4, 6, 8] = 2
    label[1, 0, 2, 3, 4] = 7  # beyond K: ignored
    points, present = label_centroids(label, 3)
    torch.testing.assert_close(points[0, 0], torch.tensor([-0.25, -1 / 3, 0.0]))  # voxel (1.5, 2, 4) of (5, 7, 9)
    torch.testing.assert_close(points[0, 1], torch.ones(3))
    assert present.tolist() == [[True, True, False], [False, False, False]]
    with pytest.raises(ValueError, match="label map"):
        label_centroids(label[:, 0], 3)


def test_label_centroid_pretraining_targets_follow_the_augmentation(one_thread):
    """Targets are the centroids of the *augmented* label map: the label centroids moved by the matrix."""
    generator = torch.Generator().manual_seed(1)
    data = [dict(zip(("image", "label"), _blob_case(generator))) for _ in range(4)]
    torch.manual_seed(0)
    iteration = KeyMorphPretrainIteration(max_params=(0.0, 0.1, 0.5, 0.0), seed=3, label_key="label")
    outputs, losses, _ = _run(_detector3(), data, iteration, torch.nn.MSELoss(), epochs=8)
    first, last = _decreases(losses)
    assert last < 0.5 * first, (first, last)
    out = outputs[-1]
    original, _ = label_centroids(out["label"], 3)
    moved = apply_keymorph_affine(out["matrix"], points=original)["points"]
    torch.testing.assert_close(out["points_target"], moved, atol=0.03, rtol=0)  # nearest resampling of the balls
    with pytest.raises(ValueError, match="exactly one"):
        KeyMorphPretrainIteration(ReferenceKeypoints(3), label_key="label")


def _pairs(num_cases: int = 4) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    cases = [_blob_case(generator) for _ in range(num_cases)]
    return [
        {
            "moving_image": cases[i][0],
            "fixed_image": cases[j][0],
            "moving_label": cases[i][1],
            "fixed_label": cases[j][1],
        }
        for i in range(num_cases)
        for j in range(num_cases)
        if i != j
    ]


def test_unsupervised_training_loss_decreases(one_thread):
    torch.manual_seed(0)
    network = KeyMorph(_detector(), "affine")
    iteration = KeyMorphTrainIteration(max_params=(0.0, 0.15, 0.3, 0.0), seed=3)
    outputs, losses, events = _run(network, _pairs(), iteration, KeyMorphLoss("mse"), epochs=3)
    first, last = _decreases(losses)
    assert last < 0.6 * first, (first, last)  # measured 0.0062 -> 0.0021
    out = outputs[-1]
    assert {"mse", "forward_ddf", "pred", "moving_image_warped", "points_aligned", "matrix"} <= set(out)
    assert out["forward_ddf"].shape == (1, 3, SIZE, SIZE, SIZE)
    assert events[:3] == ["FORWARD_COMPLETED", "LOSS_COMPLETED", "MODEL_COMPLETED"]


def test_supervised_tps_training_loss_decreases(one_thread):
    torch.manual_seed(0)
    network = KeyMorph(_detector(), "tps_uniform", max_train_keypoints=6)
    iteration = KeyMorphTrainIteration(
        moving_label_key="moving_label",
        fixed_label_key="fixed_label",
        max_params=(0.0, 0.15, 0.3, 0.0),
        max_train_seg_channels=3,
        seed=3,
    )
    # MONAI's default decollation of the output (as in a bundle)
    outputs, losses, _ = _run(network, _pairs(), iteration, KeyMorphLoss(None, "dice"), epochs=3, decollate=True)
    first, last = _decreases(losses)
    assert last < 0.75 * first, (first, last)  # measured 0.44 -> 0.27
    out = outputs[-1]
    assert out["labels"].shape == (3,) and set(out["labels"].tolist()) <= {0, 1, 2, 3}
    assert out["points_fixed"].shape == (6, 3)  # the TPS keypoint subset in training


def test_keypoint_consistency_step(one_thread):
    """Two co-registered 'modalities' (image and its inverse contrast inside the head): a separate step is taken."""
    torch.manual_seed(0)
    pairs = _pairs(2)
    for pair in pairs:
        pair["t1"], pair["t2"] = pair["moving_image"], (1 - pair["moving_image"]) * (pair["moving_image"] > 0.05)
    network = KeyMorph(_detector(), "affine")
    iteration = KeyMorphTrainIteration(
        max_params=(0.0, 0.1, 0.2, 0.0), consistency_keys=("t1", "t2"), consistency_weight=10.0, seed=3
    )
    outputs, losses, _ = _run(network, pairs, iteration, KeyMorphLoss("mse"), epochs=1)
    assert all(torch.isfinite(o["kpconsistency"]) and o["kpconsistency"] > 0 for o in outputs)
    assert np.isfinite(losses).all()


def test_iteration_bad_inputs():
    with pytest.raises(ValueError, match="label_key"):
        KeyMorphTrainIteration(moving_label_key="moving_label")
    with pytest.raises(ValueError, match="consistency_keys"):
        KeyMorphTrainIteration(consistency_weight=1.0)
    with pytest.raises(ValueError, match="max_params"):
        KeyMorphTrainIteration(max_params=(0.1, 0.1))
    with pytest.raises(TypeError, match="ReferenceKeypoints"):
        KeyMorphPretrainIteration(torch.zeros(8, 3))
    trainer = SupervisedTrainer(
        device=torch.device("cpu"),
        max_epochs=1,
        train_data_loader=[{"image": torch.rand(1, 1, 16, 16, 16)}],
        network=_detector(),
        optimizer=torch.optim.SGD(_detector().parameters(), 0.1),
        loss_function=torch.nn.MSELoss(),
        iteration_update=KeyMorphTrainIteration(),
    )
    with pytest.raises(ValueError, match="moving_image"):
        trainer.run()
