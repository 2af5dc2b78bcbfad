"""Group (cycle) consistency loss of SITReg's LUMIR fine-tune: single-process properties and a
3-process gloo run checking that the x3 gradient scaling plus DDP's averaging reproduce the gradient of a
single-process computation of the same triplet.
"""

from __future__ import annotations

import math
import socket
import time
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from monai.engines import SupervisedTrainer
from torch.nn.parallel import DistributedDataParallel

from monai_ext.data.pairs import TripletDataset
from monai_ext.engines.consistency import ConsistencyTrainIteration, triplet_group
from monai_ext.engines.registration import forward_and_inverse
from monai_ext.losses.consistency import (
    GroupConsistencyLoss,
    compose_cycle,
    consistency_weight,
    cycle_consistency,
    scale_gradient,
)
from monai_ext.losses.regularization import GradientDeformationLoss, NDVLoss
from monai_ext.losses.similarity import LocalNormalizedCrossCorrelation
from monai_ext.losses.symmetric import SymmetricRegistrationLoss
from monai_ext.networks.sitreg import SITReg
from monai_ext.spatial.inversion import AndersonSolver, MaxAbsResidual, RelativeL2Residual
from monai_ext.spatial.sampling import affine_to_ddf

SHAPE = (12, 12, 12)
DTYPE = torch.float64


def _constant(shift, shape=SHAPE) -> torch.Tensor:
    """Voxel DDF of a translation: constant ``shift`` everywhere, ``(1, n, *shape)``."""
    n = len(shape)
    return torch.tensor(shift, dtype=DTYPE).view(1, n, *([1] * n)).expand(1, n, *shape).clone()


# ---------------------------------------------------------------------------------------------------
# single process


def test_consistent_translations_give_zero():
    a, b = (0.7, -1.3, 0.25), (-0.4, 2.1, 0.9)
    c = tuple(-(x + y) for x, y in zip(a, b))
    forward = [_constant(s) for s in (a, b, c)]
    inverse = [-f for f in forward]
    masks = [(torch.rand(1, 1, *SHAPE, dtype=DTYPE) > 0.3).to(DTYPE) for _ in range(3)]
    assert cycle_consistency(forward, inverse, masks).item() == pytest.approx(0.0, abs=1e-28)
    # translations commute: the composition order is checked with affine maps below


def test_hand_derived_value_with_mask():
    """f3 = +1 voxel along axis 0, all other fields 0; M1 = 0 where axis-1 index < 6.

    Forward cycle on the 12^3 grid: x -> x + e0 (f3, mask M1 at x), then f2 and f1 are sampled at x + e0, which
    is inside the field of view for x0 <= 10 (11 of 12 slices). Valid fraction 11/12 * 1/2, displacement
    1 voxel = h = 2/12 world units, so c(C_f) = (2/12)^2 * 11/24 = 11/864; C_i = identity gives 0, and the
    loss is 11/1728 (masked voxels count as zeros in the mean over all 1728 voxels).
    """
    zero = _constant((0.0, 0.0, 0.0))
    mask_1 = torch.ones(1, 1, *SHAPE, dtype=DTYPE)
    mask_1[:, :, :, :6] = 0
    loss = cycle_consistency([zero, zero, _constant((1.0, 0.0, 0.0))], [zero] * 3, [mask_1, None, None])
    assert loss.item() == pytest.approx(11 / 1728, rel=1e-12)


def _shifted(mask: np.ndarray, shift) -> np.ndarray:
    """``mask[x + shift]`` for integer ``shift``, 0 outside the grid."""
    out = np.zeros_like(mask)
    src = tuple(slice(max(s, 0), n + min(s, 0)) for s, n in zip(shift, mask.shape))
    dst = tuple(slice(max(-s, 0), n + min(-s, 0)) for s, n in zip(shift, mask.shape))
    out[dst] = mask[src]
    return out


def _translation_cycle(shifts, masks, h) -> float:
    """Reference ``c(C)`` for integer translations ``shifts`` (outermost first) with masks on their domains."""
    total, point_shift, valid = np.zeros(3), np.zeros(3, dtype=int), np.ones(masks[0].shape)
    for shift, mask in zip(reversed(shifts), reversed(masks)):
        valid = valid * _shifted(mask, point_shift)
        point_shift = point_shift + np.asarray(shift)
        total = total + np.asarray(shift)
    return float((valid * np.sum((np.asarray(h) * total) ** 2)).mean())


def test_inconsistent_translations_analytic_with_masks_and_anisotropic_voxels():
    """Integer translations, random body masks, voxel size (2, 1, 1) on an (8, 10, 12) grid.

    Largest field of view: axis 0 (16 vs 10 and 12), so by hand h = (2/8, 2/8 * 1/2, 2/8 * 1/2).
    The reference checks the mask of every DDF at the point where it is evaluated: f3 with M1 at x,
    f2 with M3 at x + f3, f1 with M2 at x + f3 + f2; i1 with M1, i2 with M2, i3 with M3 likewise.
    """
    shape, h = (8, 10, 12), (0.25, 0.125, 0.125)
    generator = np.random.default_rng(3)
    forward_shifts = [(1, -2, 0), (0, 1, 3), (-2, 2, -1)]
    inverse_shifts = [(-1, 0, 2), (2, 1, 0), (0, -3, -1)]
    masks = [(generator.random(shape) > 0.25).astype(np.float64) for _ in range(3)]
    m1, m2, m3 = masks
    expected = 0.5 * (
        _translation_cycle(forward_shifts, [m2, m3, m1], h)
        + _translation_cycle(inverse_shifts[::-1], [m3, m2, m1], h)
    )
    loss = cycle_consistency(
        [_constant(s, shape) for s in forward_shifts],
        [_constant(s, shape) for s in inverse_shifts],
        [torch.from_numpy(m)[None, None] for m in masks],
        voxel_size=(2.0, 1.0, 1.0),
    )
    assert expected > 0
    assert loss.item() == pytest.approx(expected, rel=1e-12)


def _rotation_about_centre(angle: float, axes: tuple[int, int], shape) -> np.ndarray:
    matrix = np.eye(4)
    i, j = axes
    matrix[[i, i, j, j], [i, j, i, j]] = [math.cos(angle), -math.sin(angle), math.sin(angle), math.cos(angle)]
    centre = (np.asarray(shape) - 1) / 2
    matrix[:3, 3] = centre - matrix[:3, :3] @ centre
    return matrix


def _affine_reference(matrices, shape, h) -> float:
    """``c`` of ``A_1 o A_2 o A_3`` (voxel matrices, outermost first); valid = every sampled point inside the grid."""
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")).reshape(3, -1)
    points, valid = grid.astype(np.float64), np.ones(grid.shape[1], dtype=bool)
    for k, matrix in enumerate(reversed(matrices)):
        if k > 0:
            valid &= np.all((points > -1e-3) & (points < np.asarray(shape)[:, None] - 1 + 1e-3), axis=0)
        points = matrix[:3, :3] @ points + matrix[:3, 3:]
    return float((valid * np.sum((np.asarray(h)[:, None] * (points - grid)) ** 2, axis=0)).mean())


def test_composition_order_with_non_commuting_affines():
    """Affine DDFs are represented exactly by multilinear interpolation, so the cycle is exact where valid."""
    shape, h = (10, 11, 12), (2 / 12,) * 3
    forward = [_rotation_about_centre(0.15, (0, 1), shape), _rotation_about_centre(-0.2, (1, 2), shape),
               _rotation_about_centre(0.1, (0, 2), shape)]  # fmt: skip
    inverse = [_rotation_about_centre(-0.1, (0, 1), shape), _rotation_about_centre(0.12, (0, 2), shape),
               _rotation_about_centre(0.2, (1, 2), shape)]  # fmt: skip

    def ddf(matrix):
        return affine_to_ddf(torch.from_numpy(matrix)[None], shape)

    loss = cycle_consistency([ddf(m) for m in forward], [ddf(m) for m in inverse])
    expected = 0.5 * (_affine_reference(forward, shape, h) + _affine_reference(inverse[::-1], shape, h))
    wrong_order = 0.5 * (_affine_reference(forward[::-1], shape, h) + _affine_reference(inverse, shape, h))
    assert loss.item() == pytest.approx(expected, rel=1e-9)
    assert abs(wrong_order - expected) > 0.05 * expected  # the test distinguishes the composition order


def test_gradient_matches_finite_differences_2d():
    shape = (6, 7)
    ddfs = [0.6 * torch.randn(1, 2, *shape, dtype=DTYPE) for _ in range(6)]
    masks = [(torch.rand(1, 1, *shape, dtype=DTYPE) > 0.2).to(DTYPE) for _ in range(3)]
    probe = ddfs[1].clone().requires_grad_(True)

    def loss(field):
        return cycle_consistency([ddfs[0], field, ddfs[2]], ddfs[3:], masks, voxel_size=(1.0, 1.5))

    assert torch.autograd.gradcheck(loss, (probe,), eps=1e-7, atol=1e-8)


def test_compose_cycle_mask_is_zero_outside_field_of_view():
    ddf, mask = compose_cycle([_constant((0.0, 0.0, 0.0)), _constant((0.0, -3.5, 0.0))])
    assert torch.equal(ddf, _constant((0.0, -3.5, 0.0)))
    expected = torch.ones(1, 1, *SHAPE, dtype=DTYPE)
    expected[:, :, :, :4] = 0  # x1 - 3.5 < 0 for x1 <= 3
    assert torch.equal(mask, expected)


def test_scale_gradient():
    x = torch.tensor([1.5, -2.0], requires_grad=True)
    y = scale_gradient(x, 3.0)
    assert torch.equal(y, x)
    (y * torch.tensor([1.0, 2.0])).sum().backward()
    assert torch.equal(x.grad, torch.tensor([3.0, 6.0]))


def test_consistency_weight_schedule():
    # 31 zeros (epochs 0..30) then 40 at epoch 31, linear in between, constant beyond the ends
    assert consistency_weight(30.0) == 0.0
    assert consistency_weight(30.5) == 20.0
    assert consistency_weight(31.0) == 40.0
    assert consistency_weight(40.0) == 40.0
    assert consistency_weight(-1.0) == 0.0
    assert consistency_weight(1.25, (0.0, 4.0, 8.0)) == 5.0
    with pytest.raises(ValueError, match="schedule"):
        consistency_weight(1.0, ())


def test_invalid_inputs():
    zero = _constant((0.0, 0.0, 0.0))
    with pytest.raises(ValueError, match="3 DDFs"):
        cycle_consistency([zero] * 2, [zero] * 3)
    with pytest.raises(ValueError, match="masks must hold 3"):
        cycle_consistency([zero] * 3, [zero] * 3, [None] * 2)
    with pytest.raises(ValueError, match=r"masks\[1\]"):
        cycle_consistency([zero] * 3, [zero] * 3, [None, torch.ones(1, 1, 5, 5, 5), None])
    with pytest.raises(ValueError, match="non-finite"):
        cycle_consistency([zero * math.nan] + [zero] * 2, [zero] * 3)
    with pytest.raises(RuntimeError, match="initialised"):
        GroupConsistencyLoss().group_rank


def test_triplet_dataset_draws_distinct_uniform_shared_triplets():
    data = [{"image": f"case{i}"} for i in range(4)]
    first = TripletDataset(data, steps_per_epoch=2400, seed=7)
    triplets = [first.triplet_indices(i) for i in range(len(first))]
    assert all(len(set(t)) == 3 for t in triplets)
    counts = np.bincount([16 * a + 4 * b + c for a, b, c in triplets], minlength=64)
    used = counts[counts > 0]
    assert len(used) == 24 and used.min() > 60 and used.max() < 140  # 24 ordered triplets, 100 expected each
    again = TripletDataset(data, steps_per_epoch=2400, seed=7)  # another rank of the group
    assert [again.triplet_indices(i) for i in range(len(again))] == triplets
    assert again[0] == {f"image_{j}": f"case{k}" for j, k in enumerate(triplets[0], 1)}
    group_1 = TripletDataset(data, steps_per_epoch=1200, seed=7, num_groups=2, group_index=1)
    assert [group_1.triplet_indices(i) for i in range(1200)] == triplets[1::2]
    first.set_epoch(1)
    assert [first.triplet_indices(i) for i in range(len(first))] != triplets
    with pytest.raises(ValueError, match="at least 3"):
        TripletDataset(data[:2], steps_per_epoch=1)


def test_triplet_group_requires_multiple_of_three():
    port = _free_port()
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        with pytest.raises(ValueError, match="multiple of 3"):
            triplet_group()
        with pytest.raises(ValueError, match="3 ranks"):
            GroupConsistencyLoss()(_constant((0.0,) * 3), _constant((0.0,) * 3))
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------------
# three processes (gloo, CPU) against a single-process computation of the same triplet

SCHEDULE = (0.0, 3.0)  # first step of the first epoch: t = 0 + 1/1 = 1 -> weight 3


def _network() -> SITReg:
    """Tiny SITReg in float64 with tight fixed-point solvers (so that the implicit backward is exact enough
    for gradient comparisons whatever the scale of the incoming gradient)."""
    torch.manual_seed(1)
    network = SITReg(
        3, features=(4, 8), feature_convolutions=(1, 1), deformation_features=(4, 4), deformation_convolutions=(1, 1),
        forward_solver=AndersonSolver(MaxAbsResidual(threshold=1e-11, max_iterations=300)),
        backward_solver=AndersonSolver(RelativeL2Residual(threshold=1e-11, max_iterations=300)),
    )  # fmt: skip
    with torch.no_grad():  # voxel-sized random deformations
        for block in network.deformation_blocks.values():
            block.final_conv.conv.weight.mul_(4.0)
            block.final_conv.conv.bias.mul_(4.0)
    return network.to(DTYPE)


def _triplet() -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Three smooth random 12^3 images (float64) and their body masks (intensity > 0)."""
    generator = torch.Generator().manual_seed(2)
    images, masks = [], []
    for _ in range(3):
        coarse = torch.rand(1, 1, 4, 4, 4, generator=generator, dtype=DTYPE)
        image = F.interpolate(coarse, size=SHAPE, mode="trilinear", align_corners=True)
        image = (image - 0.3).clamp(min=0)
        images.append(image)
        masks.append((image > 0).to(DTYPE))
    return images, masks


def _pairwise_loss() -> SymmetricRegistrationLoss:
    return SymmetricRegistrationLoss(
        LocalNormalizedCrossCorrelation(kernel_size=5),
        {"grad": (GradientDeformationLoss(), 1.0), "ndv": (NDVLoss(), 1e-5)},
    )


def _worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=3, timeout=timedelta(seconds=120)
    )
    try:
        images, masks = _triplet()
        network = _network()
        ddp = DistributedDataParallel(network)
        consistency = GroupConsistencyLoss(triplet_group())
        r = consistency.group_rank
        # 1) the consistency term alone
        forward_ddf, inverse_ddf = forward_and_inverse(ddp, images[r], images[(r + 1) % 3])
        loss = consistency(forward_ddf, inverse_ddf, masks)
        loss.backward()
        consistency_grads = [p.grad.clone() for p in network.parameters()]
        # 2) a full fine-tuning step through MONAI's SupervisedTrainer (lr 0 keeps the gradients inspectable)
        batch = {f"image_{j}": image for j, image in enumerate(images, 1)}
        batch.update({f"mask_{j}": mask for j, mask in enumerate(masks, 1)})
        trainer = SupervisedTrainer(
            device=torch.device("cpu"),
            max_epochs=1,
            epoch_length=1,
            train_data_loader=[batch],
            network=ddp,
            optimizer=torch.optim.SGD(ddp.parameters(), lr=0.0),
            loss_function=_pairwise_loss(),
            iteration_update=ConsistencyTrainIteration(schedule=SCHEDULE),
            decollate=False,
        )
        trainer.run()
        output = trainer.state.output
        torch.save(
            {
                "rank": r,
                "consistency": loss.detach(),
                "consistency_grads": consistency_grads,
                "total_grads": [p.grad.clone() for p in network.parameters()],
                "total": output["loss"].detach(),
                "weight": output["consistency_weight"],
                "engine_consistency": output["consistency"],
            },
            Path(out_dir) / f"rank{rank}.pt",
        )
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _spawn(out_dir: Path, timeout: float = 300.0) -> None:
    context = mp.spawn(_worker, args=(_free_port(), str(out_dir)), nprocs=3, join=False)
    deadline = time.monotonic() + timeout
    try:
        while not context.join(timeout=1.0):
            if time.monotonic() > deadline:
                raise TimeoutError(f"the 3 gloo workers did not finish within {timeout} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.terminate()
                process.join(5)


def _assert_grads_close(actual, expected, name):
    scale = max(float(g.abs().max()) for g in expected)
    assert scale > 0
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, rtol=1e-6, atol=1e-8 * scale, msg=lambda m: f"{name}: {m}")


def test_three_process_gradients_match_single_process(tmp_path):
    _spawn(tmp_path)
    results = sorted((torch.load(tmp_path / f"rank{k}.pt") for k in range(3)), key=lambda res: res["rank"])
    assert [res["rank"] for res in results] == [0, 1, 2]

    images, masks = _triplet()
    network = _network()
    pairs = [network.forward_and_inverse(images[r], images[(r + 1) % 3]) for r in range(3)]
    forward_ddfs, inverse_ddfs = zip(*pairs)
    consistency = cycle_consistency(forward_ddfs, inverse_ddfs, masks)
    assert consistency.item() > 1e-6  # a non-trivial cycle (world units: 1 voxel = 1/6, so ~0.01 voxel rms)
    consistency_grads = torch.autograd.grad(consistency, list(network.parameters()), retain_graph=True)
    pairwise = _pairwise_loss()
    mean_pairwise = sum(
        pairwise(images[r], images[(r + 1) % 3], *pairs[r], moving_mask=masks[r], fixed_mask=masks[(r + 1) % 3])["loss"]
        for r in range(3)
    ) / 3
    total_grads = torch.autograd.grad(mean_pairwise + 3.0 * consistency, list(network.parameters()))
    assert max(float(g.abs().max()) for g in consistency_grads) > 1e-3 * max(float(g.abs().max()) for g in total_grads)

    for res in results:
        # every rank sees the full loss value, and after DDP's all-reduce every rank holds the full gradient
        assert res["consistency"].item() == pytest.approx(consistency.item(), rel=1e-10)
        assert res["engine_consistency"].item() == pytest.approx(consistency.item(), rel=1e-10)
        assert res["weight"] == 3.0
        _assert_grads_close(res["consistency_grads"], consistency_grads, f"rank {res['rank']} consistency")
        _assert_grads_close(res["total_grads"], total_grads, f"rank {res['rank']} total")
