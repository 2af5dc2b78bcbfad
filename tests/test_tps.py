"""Thin-plate splines: parity with KeyMorph's ``TPS`` and properties.

Parity (``fixtures/keymorph``, float32, README section 5 noise floors in brackets): thetas atol 5e-5
[7.6e-6], ``points_a`` 2e-6 [6.5e-7], normalized grids 2e-5 [2.3e-6], warped images 1e-4. Property
tests run in float64 (atol 1e-9 unless stated).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import load_npz
from keymorph_reference import as_tensors, norm_to_voxel, reference_warp, voxel_to_linspace, voxel_to_norm
from torch.utils._python_dispatch import TorchDispatchMode

from monai_ext.spatial.affine import fit_affine, transform_points
from monai_ext.spatial.tps import fit_tps, tps_dense, tps_transform_points

F64 = torch.float64
KERNELS = ["thin_plate", "biharmonic"]


def keymorph_grid(theta, control, shape, to_points) -> torch.Tensor:
    """KeyMorph's sampling grid: the TPS evaluated at every fixed voxel, (x, y, z) order for grid_sample."""
    return tps_dense(theta, control, shape, to_points=to_points, chunk_size=2000).flip(-1)


def numpy_tps(control: np.ndarray, target: np.ndarray, regulariser: np.ndarray) -> np.ndarray:
    """Independent float64 TPS solve with KeyMorph's kernel: [[U + regulariser, P], [P^T, 0]] theta = [target; 0]."""
    k, n = control.shape
    sq = ((control[:, None] - control[None]) ** 2).sum(-1) + 1e-6
    kernel = sq * np.log(np.sqrt(sq) + 1e-6)
    basis = np.concatenate([np.ones((k, 1)), control], 1)
    system = np.block([[kernel + regulariser, basis], [basis.T, np.zeros((n + 1, n + 1))]])
    return np.linalg.solve(system, np.concatenate([target, np.zeros((n + 1, n))]))


TPS_CASES = ["tps_0", "tps_0.1", "tps_10", "tps_0_weighted"]


@pytest.mark.parametrize("case", TPS_CASES)
def test_tps_parity(case):
    """inverse_theta (fixed -> moving), theta (separate moving -> fixed fit), points_a, grid and warped."""
    ref = as_tensors(load_npz("keymorph", "aligners.npz"))
    fixed, moving, lmbda = ref["points_f"], ref["points_m"], ref[f"{case}/lmbda"]
    weights = ref["weights"] if case.endswith("weighted") else None
    inverse_theta = fit_tps(fixed, moving, lmbda, weights)
    torch.testing.assert_close(inverse_theta, ref[f"{case}/inverse_theta"], rtol=0, atol=5e-5)
    theta = fit_tps(moving, fixed, lmbda, weights)
    torch.testing.assert_close(theta, ref[f"{case}/theta"], rtol=0, atol=5e-5)
    torch.testing.assert_close(tps_transform_points(theta, moving, moving), ref[f"{case}/points_a"], rtol=0, atol=2e-6)
    shape = ref["grid_shape"][2:].tolist()
    grid = keymorph_grid(inverse_theta, fixed, shape, voxel_to_linspace(shape))
    torch.testing.assert_close(grid, ref[f"{case}/grid"], rtol=0, atol=2e-5)
    torch.testing.assert_close(reference_warp(ref["img_m"], grid), ref[f"{case}/warped"], rtol=0, atol=1e-4)


def test_tps_weighted_lambda0_equals_unweighted():
    """With lambda = 0 the weights cannot matter (reference and ours agree: README 4.4)."""
    ref = load_npz("keymorph", "aligners.npz")
    for key in ("inverse_theta", "theta", "grid", "points_a", "warped"):
        np.testing.assert_array_equal(ref[f"tps_0_weighted/{key}"], ref[f"tps_0/{key}"])


def test_tps_weighted_positive_lambda_follows_the_intended_formula():
    """``tps_0.1_weighted``: ours solves U + lambda diag(1/w) (checked against an independent float64 solve); the
    reference adds the elementwise reciprocal of diag(w) + 1e-6 (1e6 lambda off the diagonal, checked the same
    way), which collapses to the unweighted affine least-squares fit, so its grid equals ``affine/grid``."""
    ref = load_npz("keymorph", "aligners.npz")
    case = "tps_0.1_weighted"
    f, m, w = (ref[key][0].astype(np.float64) for key in ("points_f", "points_m", "weights"))
    lmbda = float(ref[f"{case}/lmbda"][0])
    shape = ref["grid_shape"][2:].tolist()
    base = torch.stack(
        torch.meshgrid(*[torch.linspace(-1, 1, s, dtype=F64) for s in shape], indexing="ij"), -1
    ).reshape(1, -1, 3)

    def grid_of(theta: np.ndarray, control: np.ndarray) -> torch.Tensor:
        control_t = torch.from_numpy(control)[None]
        return tps_transform_points(torch.from_numpy(theta)[None], control_t, base).reshape(1, *shape, 3).flip(-1)

    # Ours == intended formula.
    ours_inverse = fit_tps(
        torch.from_numpy(f)[None].float(), torch.from_numpy(m)[None].float(), lmbda, torch.from_numpy(w)[None].float()
    )
    ours_forward = fit_tps(
        torch.from_numpy(m)[None].float(), torch.from_numpy(f)[None].float(), lmbda, torch.from_numpy(w)[None].float()
    )
    intended_inverse = numpy_tps(f, m, lmbda * np.diag(1 / w))
    intended_forward = numpy_tps(m, f, lmbda * np.diag(1 / w))
    np.testing.assert_allclose(ours_inverse[0].numpy(), intended_inverse, atol=5e-5)
    np.testing.assert_allclose(ours_forward[0].numpy(), intended_forward, atol=5e-5)

    # Reference == its buggy formula, evaluated in float64 (the system has cond 1.8e11: compare maps, not thetas).
    buggy = lmbda / (np.diag(w) + 1e-6)
    buggy_inverse, buggy_forward = numpy_tps(f, m, buggy), numpy_tps(m, f, buggy)
    torch.testing.assert_close(
        grid_of(buggy_inverse, f).float(), torch.from_numpy(ref[f"{case}/grid"]), rtol=0, atol=1e-5
    )
    ref_inverse = torch.from_numpy(ref[f"{case}/inverse_theta"]).double()
    torch.testing.assert_close(
        grid_of(ref_inverse[0].numpy(), f).float(), torch.from_numpy(ref[f"{case}/grid"]), rtol=0, atol=1e-5
    )
    torch.testing.assert_close(
        grid_of(ref[f"{case}/theta"][0].astype(np.float64), m), grid_of(buggy_forward, m), rtol=0, atol=1e-4
    )
    points_a = tps_transform_points(
        torch.from_numpy(buggy_forward)[None], torch.from_numpy(m)[None], torch.from_numpy(m)[None]
    )
    torch.testing.assert_close(points_a.float(), torch.from_numpy(ref[f"{case}/points_a"]), rtol=0, atol=2e-6)
    np.testing.assert_allclose(ref[f"{case}/grid"], ref["affine/grid"], atol=1e-5)  # README: within 1.8e-6
    unweighted_affine = fit_affine(torch.from_numpy(m)[None], torch.from_numpy(f)[None])
    torch.testing.assert_close(
        points_a, transform_points(unweighted_affine, torch.from_numpy(m)[None]), rtol=0, atol=1e-5
    )
    warped = reference_warp(torch.from_numpy(ref["img_m"]), torch.from_numpy(ref[f"{case}/grid"]))
    torch.testing.assert_close(warped, torch.from_numpy(ref[f"{case}/warped"]), rtol=0, atol=1e-6)

    # ... and the two visibly differ.
    assert (grid_of(intended_inverse, f) - grid_of(buggy_inverse, f)).abs().max() > 1e-2


@pytest.mark.parametrize("case", ["tps_0", "tps_1"])
def test_tps_realworld_parity(case):
    """TPS fitted in millimetres (``realworld.npz``, README 4.10): inverse_theta, grid, points_a, warped."""
    ref = as_tensors(load_npz("keymorph", "realworld.npz"))
    lmbda = float(case.split("_")[1])
    shape_f, shape_m = ref["shape_f"].float(), ref["shape_m"].float()
    world_f = transform_points(ref["aff_f"], norm_to_voxel(ref["points_f"], shape_f))
    world_m = transform_points(ref["aff_m"], norm_to_voxel(ref["points_m"], shape_m))
    inverse_theta = fit_tps(world_f, world_m, lmbda)
    scale = ref[f"{case}/inverse_theta"].abs().max()
    torch.testing.assert_close(inverse_theta, ref[f"{case}/inverse_theta"], rtol=0, atol=5e-5 * scale)

    to_world = lambda voxels: transform_points(
        ref["aff_f"], norm_to_voxel(voxel_to_linspace(ref["shape_f"].tolist())(voxels)[None], shape_f)
    )
    world_grid = tps_dense(inverse_theta, world_f, ref["shape_f"].tolist(), to_points=to_world, chunk_size=3000)
    moving_voxels = transform_points(torch.linalg.inv(ref["aff_m"]), world_grid.reshape(1, -1, 3))
    grid = voxel_to_norm(moving_voxels, shape_m).reshape(world_grid.shape).flip(-1)
    torch.testing.assert_close(grid, ref[f"{case}/grid"], rtol=0, atol=2e-5)
    torch.testing.assert_close(reference_warp(ref["img_m"], grid), ref[f"{case}/warped"], rtol=0, atol=1e-4)

    theta = fit_tps(world_m, world_f, lmbda)  # the separate moving -> fixed fit used for points
    fixed_voxels = transform_points(torch.linalg.inv(ref["aff_f"]), tps_transform_points(theta, world_m, world_m))
    torch.testing.assert_close(voxel_to_norm(fixed_voxels, shape_f), ref[f"{case}/points_a"], rtol=0, atol=2e-6)


# --------------------------------------------------------------------------------------------- properties


def random_points(batch: int, k: int, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    control = torch.rand(batch, k, n, dtype=F64, generator=generator) * 2 - 1
    target = control + 0.2 * torch.randn(batch, k, n, dtype=F64, generator=generator)
    weights = torch.rand(batch, k, dtype=F64, generator=generator) + 0.1
    return control, target, weights


@pytest.mark.parametrize("n", [2, 3])
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("weighted", [False, True])
def test_lambda0_interpolates(n, kernel, weighted):
    control, target, weights = random_points(2, 12, n, seed=n)
    theta = fit_tps(control, target, 0.0, weights if weighted else None, kernel=kernel)
    torch.testing.assert_close(tps_transform_points(theta, control, control, kernel=kernel), target, rtol=0, atol=1e-9)


@pytest.mark.parametrize("n", [2, 3])
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("lmbda", [0.0, 0.3, 100.0])
def test_affine_targets_are_reproduced_exactly(n, kernel, lmbda):
    control, _, weights = random_points(2, 10, n, seed=2)
    generator = torch.Generator().manual_seed(3)
    matrix = torch.eye(n + 1, dtype=F64).repeat(2, 1, 1)
    matrix[:, :n] += 0.3 * torch.randn(2, n, n + 1, dtype=F64, generator=generator)
    theta = fit_tps(control, transform_points(matrix, control), lmbda, weights, kernel=kernel)
    torch.testing.assert_close(theta[:, :10], torch.zeros(2, 10, n, dtype=F64), rtol=0, atol=1e-9)
    points = torch.rand(2, 50, n, dtype=F64, generator=generator) * 4 - 2
    torch.testing.assert_close(
        tps_transform_points(theta, control, points, kernel=kernel), transform_points(matrix, points), rtol=0, atol=1e-9
    )


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("weighted", [False, True])
def test_large_lambda_tends_to_the_affine_fit(kernel, weighted):
    """lmbda -> inf: zero bending, the affine part minimises sum_k w_k |residual_k|^2 (the weighted affine fit)."""
    control, target, weights = random_points(2, 15, 3, seed=4)
    weights = weights if weighted else None
    affine = fit_affine(control, target, weights)
    points = torch.rand(2, 40, 3, dtype=F64) * 2 - 1
    expected = transform_points(affine, points)
    errors = [
        (
            tps_transform_points(fit_tps(control, target, lmbda, weights, kernel), control, points, kernel=kernel)
            - expected
        )
        .abs()
        .max()
        for lmbda in (1e2, 1e4, 1e6)
    ]
    assert errors[2] < 1e-5 and errors[2] < errors[1] < errors[0]


def test_weight_scale_trades_off_against_lambda_and_batched_lambda():
    control, target, weights = random_points(2, 10, 3, seed=5)
    torch.testing.assert_close(
        fit_tps(control, target, 0.5, weights), fit_tps(control, target, 2.0, 4 * weights), rtol=0, atol=1e-9
    )
    lmbda = torch.tensor([0.1, 3.0], dtype=F64)
    batched = fit_tps(control, target, lmbda)
    for b in range(2):
        torch.testing.assert_close(
            batched[b : b + 1], fit_tps(control[b : b + 1], target[b : b + 1], lmbda[b].item()), rtol=0, atol=1e-12
        )


def test_permuting_keypoints_permutes_the_spline_weights_only():
    control, target, weights = random_points(1, 11, 3, seed=6)
    perm = torch.randperm(11)
    theta = fit_tps(control, target, 0.2, weights)
    permuted = fit_tps(control[:, perm], target[:, perm], 0.2, weights[:, perm])
    torch.testing.assert_close(permuted[:, :11], theta[:, perm], rtol=0, atol=1e-10)
    torch.testing.assert_close(permuted[:, 11:], theta[:, 11:], rtol=0, atol=1e-10)


def test_fit_and_evaluation_are_differentiable():
    control, target, _ = random_points(1, 6, 2, seed=7)
    points = torch.rand(1, 4, 2, dtype=F64)
    control.requires_grad_(True)
    target.requires_grad_(True)
    for kernel in KERNELS:
        func = lambda c, t: tps_transform_points(fit_tps(c, t, 0.1, kernel=kernel), c, points, kernel=kernel)
        assert torch.autograd.gradcheck(func, (control, target))


@pytest.mark.parametrize("n", [2, 3])
def test_dense_chunking_is_exact(n):
    control, target, _ = random_points(2, 9, n, seed=8)
    theta = fit_tps(control, target, 0.05)
    shape = (5, 6, 7)[:n]
    offset = torch.tensor([[0.5], [-0.25]], dtype=F64)[:, :, None]  # a per-batch coordinate map: (B, M, n)
    to_points = lambda voxels: voxels[None] / 4 - offset
    whole = tps_dense(theta, control, shape, to_points=to_points, chunk_size=10**6)
    chunked = tps_dense(theta, control, shape, to_points=to_points, chunk_size=7)
    torch.testing.assert_close(chunked, whole, rtol=0, atol=1e-13)
    voxels = torch.stack(torch.meshgrid(*[torch.arange(s, dtype=F64) for s in shape], indexing="ij"), -1).reshape(-1, n)
    explicit = tps_transform_points(theta, control, to_points(voxels).expand(2, -1, -1), chunk_size=5)
    torch.testing.assert_close(whole.reshape(2, -1, n), explicit, rtol=0, atol=1e-13)
    identity = tps_dense(theta, control, shape)  # default: voxel coordinates
    torch.testing.assert_close(
        identity.reshape(2, -1, n), tps_transform_points(theta, control, voxels[None]), rtol=0, atol=1e-13
    )


class _LargestTensor(TorchDispatchMode):
    """Records the largest tensor produced by any torch operation inside the context."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for value in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(value, torch.Tensor):
                self.largest = max(self.largest, value.numel())
        return out


def test_dense_memory_is_bounded_by_the_chunk():
    """32^3 grid, 512 keypoints: no temporary exceeds the (B, chunk, K) kernel block (or the output itself),
    whereas an unchunked evaluation would create an (N, K) = 1.7e7-element tensor. (A 64^3 run behaves the
    same and takes about 15 s on a shared CPU, so the test uses 32^3.)"""
    generator = torch.Generator().manual_seed(9)
    control = torch.rand(1, 512, 3, generator=generator) * 2 - 1
    theta = fit_tps(control, control + 0.05 * torch.randn(1, 512, 3, generator=generator), 0.1)
    shape, chunk = (32, 32, 32), 4096
    with _LargestTensor() as tracker:
        out = tps_dense(theta, control, shape, to_points=voxel_to_linspace(list(shape)), chunk_size=chunk)
    assert out.shape == (1, *shape, 3) and torch.isfinite(out).all()
    assert tracker.largest <= max(chunk * 512, out.numel())
    assert tracker.largest < math.prod(shape) * 512 / 4


# --------------------------------------------------------------------------------------------- bad input


def test_bad_input_errors():
    control, target, weights = random_points(1, 8, 3, seed=10)
    with pytest.raises(ValueError, match="at least 5"):
        fit_tps(control[:, :4], target[:, :4])
    coplanar = control.clone()
    coplanar[..., 0] = 0.3
    with pytest.raises(ValueError, match="control points are degenerate"):
        fit_tps(coplanar, target)
    nan = target.clone()
    nan[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="target contains non-finite"):
        fit_tps(control, nan)
    duplicated = control.clone()
    duplicated[0, 1] = duplicated[0, 0]
    with pytest.raises(ValueError, match="singular"):
        fit_tps(duplicated, target, kernel="biharmonic")
    with pytest.raises(ValueError, match="lmbda"):
        fit_tps(control, target, -1.0)
    with pytest.raises(ValueError, match="lmbda"):
        fit_tps(control, target, torch.ones(3))
    with pytest.raises(ValueError, match="weights must be > 0"):
        fit_tps(control, target, 0.1, torch.cat([weights[:, :1] * 0, weights[:, 1:]], dim=1))
    with pytest.raises(ValueError, match="kernel"):
        fit_tps(control, target, kernel="gaussian")
    theta = fit_tps(control, target)
    with pytest.raises(ValueError, match="theta"):
        tps_transform_points(theta[:, 1:], control, target)
    with pytest.raises(ValueError, match="points"):
        tps_transform_points(theta, control, target[..., :2])
    with pytest.raises(ValueError, match="spatial_shape"):
        tps_dense(theta, control, (4, 4))
    with pytest.raises(ValueError, match="to_points"):
        tps_dense(theta, control, (3, 3, 3), to_points=lambda v: v[:, :2])
    with pytest.raises(ValueError, match="chunk_size"):
        tps_dense(theta, control, (3, 3, 3), chunk_size=0)
