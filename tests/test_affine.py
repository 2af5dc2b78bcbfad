"""Affine tools: SITReg's matrix generator, closed-form affine / rigid fits (KeyMorph aligners).

Parity with the KeyMorph reference (``fixtures/keymorph``, float32): matrices atol 1e-6 (normalized units) or
1e-5 (mm), points 2e-6, sampling grids 2e-6, warped images 1e-5 (README section 5 noise floors: 6.6e-8 /
3.2e-7 for matrices / grids). Property tests run in float64 with atol 1e-10 unless stated.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg
import torch
from conftest import load_npz
from keymorph_reference import (
    as_tensors,
    norm_to_voxel,
    normalized_grid,
    reference_warp,
    to_sampling_grid,
    voxel_to_norm,
)

from monai_ext.spatial.affine import affine_matrix_from_parameters, fit_affine, fit_rigid, transform_points

ALIGNERS = "keymorph", "aligners.npz"
F64 = torch.float64


def random_affine(n: int, batch: int, generator: torch.Generator) -> torch.Tensor:
    linear = torch.eye(n, dtype=F64) + 0.3 * torch.randn(batch, n, n, dtype=F64, generator=generator)
    matrix = torch.zeros(batch, n + 1, n + 1, dtype=F64)
    matrix[:, :n, :n] = linear
    matrix[:, :n, n] = torch.randn(batch, n, dtype=F64, generator=generator)
    matrix[:, n, n] = 1
    return matrix


def random_rigid(n: int, batch: int, generator: torch.Generator) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(batch, n, n, dtype=F64, generator=generator))
    q[:, :, 0] *= torch.linalg.det(q)[:, None]  # proper rotation
    matrix = torch.zeros(batch, n + 1, n + 1, dtype=F64)
    matrix[:, :n, :n] = q
    matrix[:, :n, n] = torch.randn(batch, n, dtype=F64, generator=generator)
    matrix[:, n, n] = 1
    return matrix


def weighted_residual(matrix: torch.Tensor, source: torch.Tensor, target: torch.Tensor, weights=None) -> torch.Tensor:
    sq = (transform_points(matrix, source) - target).square().sum(-1)
    return (sq if weights is None else sq * weights).sum(-1)


def horn_rotation(source: np.ndarray, target: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Optimal proper rotation by Horn's unit-quaternion method (3-D; independent of any SVD sign fix)."""
    w = weights / weights.sum()
    p = source - w @ source
    q = target - w @ target
    m = (w[:, None] * p).T @ q  # sum_k w_k p_k q_k^T
    (sxx, sxy, sxz), (syx, syy, syz), (szx, szy, szz) = m
    n_mat = np.array(
        [
            [sxx + syy + szz, syz - szy, szx - sxz, sxy - syx],
            [syz - szy, sxx - syy - szz, sxy + syx, szx + sxz],
            [szx - sxz, sxy + syx, -sxx + syy - szz, syz + szy],
            [sxy - syx, szx + sxz, syz + szy, -sxx - syy + szz],
        ]
    )
    a, x, y, z = np.linalg.eigh(n_mat)[1][:, -1]
    return np.array(
        [
            [a * a + x * x - y * y - z * z, 2 * (x * y - a * z), 2 * (x * z + a * y)],
            [2 * (x * y + a * z), a * a - x * x + y * y - z * z, 2 * (y * z - a * x)],
            [2 * (x * z - a * y), 2 * (y * z + a * x), a * a - x * x - y * y + z * z],
        ]
    )


# --------------------------------------------------------------------------------------------- SITReg generator


def test_generator_zero_parameters_give_identity():
    for size, n in ((6, 2), (12, 3)):
        torch.testing.assert_close(
            affine_matrix_from_parameters(torch.zeros(2, size)), torch.eye(n + 1).expand(2, -1, -1)
        )


def test_generator_2d_rotation_by_hand():
    # Skew = [[0, pi/2], [-pi/2, 0]]; expm = [[cos, sin], [-sin, cos]] at pi/2 = [[0, 1], [-1, 0]] (SITReg's test).
    params = torch.tensor([[0.0, 0.0, 0.0, math.pi / 2, 0.0, 0.0]], dtype=F64)
    expected = torch.tensor([[[0.0, 1.0, 0.0], [-1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]], dtype=F64)
    torch.testing.assert_close(affine_matrix_from_parameters(params), expected)


def test_generator_scale_shear_translation_by_hand():
    # log-scales alone: diag(exp(s)); 2-D shear s alone: expm([[0, s], [s, 0]]) = [[cosh s, sinh s], [sinh s, cosh s]]
    # (the matrix has eigenvalues +-s on eigenvectors (1, +-1));
    # translations are applied first: x -> L (x + t), so the matrix's last column is L t.
    s = torch.tensor([0.3, -0.2, 0.1], dtype=F64)
    params = torch.cat([s, torch.zeros(6, dtype=F64), torch.tensor([1.0, 2.0, 3.0], dtype=F64)])[None]
    matrix = affine_matrix_from_parameters(params)[0]
    torch.testing.assert_close(matrix[:3, :3], torch.diag(s.exp()))
    torch.testing.assert_close(matrix[:3, 3], s.exp() * torch.tensor([1.0, 2.0, 3.0], dtype=F64))
    shear = affine_matrix_from_parameters(torch.tensor([[0.0, 0.0, 0.4, 0.0, 0.0, 0.0]], dtype=F64))[0, :2, :2]
    c, h = math.cosh(0.4), math.sinh(0.4)
    torch.testing.assert_close(shear, torch.tensor([[c, h], [h, c]], dtype=F64))


@pytest.mark.parametrize("n", [2, 3])
def test_generator_matches_scipy_expm(n):
    generator = torch.Generator().manual_seed(1)
    n_off = n * (n - 1) // 2
    params = 0.5 * torch.randn(4, 2 * n + 2 * n_off, dtype=F64, generator=generator)
    result = affine_matrix_from_parameters(params).numpy()
    rows, cols = np.triu_indices(n, 1)
    for b, p in enumerate(params.numpy()):
        sym, skew = np.diag(p[:n]), np.zeros((n, n))
        sym[rows, cols] = sym[cols, rows] = p[n : n + n_off]
        skew[rows, cols] = p[n + n_off : n + 2 * n_off]
        skew -= skew.T
        translation = np.eye(n + 1)
        translation[:n, n] = p[-n:]
        expected = np.eye(n + 1)
        expected[:n, :n] = scipy.linalg.expm(sym) @ scipy.linalg.expm(skew)
        np.testing.assert_allclose(result[b], expected @ translation, atol=1e-12)
        rotation = scipy.linalg.expm(skew)
        np.testing.assert_allclose(rotation @ rotation.T, np.eye(n), atol=1e-12)


def test_generator_is_differentiable():
    params = (0.3 * torch.randn(2, 12, dtype=F64)).requires_grad_(True)
    assert torch.autograd.gradcheck(affine_matrix_from_parameters, (params,))


def test_generator_bad_input():
    with pytest.raises(ValueError, match="params"):
        affine_matrix_from_parameters(torch.zeros(1, 7))
    with pytest.raises(ValueError, match="non-finite"):
        affine_matrix_from_parameters(torch.full((1, 12), float("nan")))


# --------------------------------------------------------------------------------------------- KeyMorph parity

AFFINE_CASES = {  # case -> (fit, moving points key, weights key); the fit always goes fixed -> moving
    "identity": (fit_affine, "points_f", None),
    "affine": (fit_affine, "points_m", None),
    "affine_weighted": (fit_affine, "points_m", "weights"),
    "rigid": (fit_rigid, "points_m", None),
}


@pytest.mark.parametrize("case", sorted(AFFINE_CASES))
def test_aligner_parity(case):
    ref = as_tensors(load_npz(*ALIGNERS))
    fit, moving_key, weights_key = AFFINE_CASES[case]
    moving, weights = ref[moving_key], None if weights_key is None else ref[weights_key]
    inverse = fit(ref["points_f"], moving, weights)
    torch.testing.assert_close(inverse, ref[f"{case}/inverse_transform_matrix"], rtol=0, atol=1e-6)
    torch.testing.assert_close(inverse[:, :3], ref[f"{case}/fit"], rtol=0, atol=1e-6)
    forward = torch.linalg.inv(inverse)
    torch.testing.assert_close(forward, ref[f"{case}/transform_matrix"], rtol=0, atol=1e-6)
    torch.testing.assert_close(transform_points(forward, moving), ref[f"{case}/points_a"], rtol=0, atol=2e-6)
    shape = ref["grid_shape"][2:].tolist()
    grid = to_sampling_grid(transform_points(inverse, normalized_grid(shape)), shape)
    torch.testing.assert_close(grid, ref[f"{case}/grid"], rtol=0, atol=2e-6)
    torch.testing.assert_close(reference_warp(ref["img_m"], grid), ref[f"{case}/warped"], rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "case,moving_key,weights_key",
    [("rigid_weighted", "points_m", "weights"), ("rigid_reflect", "points_m_reflect", None)],
)
def test_rigid_cases_where_the_reference_is_not_optimal(case, moving_key, weights_key):
    """Our rigid fit is the weighted least-squares optimum (Horn's quaternion method, computed independently);
    the reference is a proper rotation with a larger residual: it weights the covariance by w^2
    (``rigid_weighted``) and flips a row of V instead of the last singular vector (``rigid_reflect``)."""
    ref = as_tensors(load_npz(*ALIGNERS))
    fixed, moving = ref["points_f"], ref[moving_key]
    weights = torch.ones(1, fixed.shape[1]) / fixed.shape[1] if weights_key is None else ref[weights_key]
    ours = fit_rigid(fixed, moving, None if weights_key is None else weights)
    theirs = ref[f"{case}/inverse_transform_matrix"]
    torch.testing.assert_close(theirs[:, :3], ref[f"{case}/fit"], rtol=0, atol=0)

    horn = horn_rotation(fixed[0].double().numpy(), moving[0].double().numpy(), weights[0].double().numpy())
    np.testing.assert_allclose(ours[0, :3, :3].numpy(), horn, atol=1e-5)
    for matrix in (ours, theirs):
        np.testing.assert_allclose(np.linalg.det(matrix[0, :3, :3].double().numpy()), 1.0, atol=1e-5)
    f64 = fixed.double(), moving.double(), weights.double()
    ours_res, theirs_res = weighted_residual(ours.double(), *f64), weighted_residual(theirs.double(), *f64)
    assert ours_res < theirs_res * (0.995 if case == "rigid_weighted" else 0.25), (ours_res, theirs_res)
    if case == "rigid_reflect":  # README 4.4: root-sum-square residual 1.85 (standard Kabsch) vs 3.80 (reference)
        rss = [
            weighted_residual(matrix.double(), fixed.double(), moving.double()).sqrt().item()
            for matrix in (ours, theirs)
        ]
        np.testing.assert_allclose(rss, [1.85, 3.80], atol=0.01)
    assert (ours - theirs).abs().max() > 1e-2  # the documented deviation is visible

    # The remaining reference arrays are consistent with the reference's own matrix.
    forward = torch.linalg.inv(theirs)
    torch.testing.assert_close(forward, ref[f"{case}/transform_matrix"], rtol=0, atol=1e-6)
    torch.testing.assert_close(transform_points(forward, moving), ref[f"{case}/points_a"], rtol=0, atol=2e-6)
    shape = ref["grid_shape"][2:].tolist()
    grid = to_sampling_grid(transform_points(theirs, normalized_grid(shape)), shape)
    torch.testing.assert_close(grid, ref[f"{case}/grid"], rtol=0, atol=2e-6)
    torch.testing.assert_close(reference_warp(ref["img_m"], grid), ref[f"{case}/warped"], rtol=0, atol=1e-5)


def test_rigid_weighted_reference_is_w_squared_kabsch():
    """Documents the reference quirk: its ``rigid_weighted`` rotation is the Kabsch rotation of the w^2-weighted
    covariance around the w-weighted centroids (computed here independently with numpy SVD in float64)."""
    ref = load_npz(*ALIGNERS)
    p, q, w = (
        ref["points_f"][0].astype(np.float64),
        ref["points_m"][0].astype(np.float64),
        ref["weights"][0].astype(np.float64),
    )
    cp, cq = w @ p, w @ q
    u, _, vt = np.linalg.svd(((p - cp) * w[:, None] ** 2).T @ (q - cq))
    rotation = vt.T @ u.T
    np.testing.assert_allclose(np.linalg.det(rotation), 1.0, atol=1e-9)  # no reflection branch
    np.testing.assert_allclose(ref["rigid_weighted/fit"][0, :, :3], rotation, atol=1e-6)
    np.testing.assert_allclose(ref["rigid_weighted/fit"][0, :, 3], cq - rotation @ cp, atol=1e-6)


def test_aligner_checks_exact_recovery():
    ref = as_tensors(load_npz("keymorph", "aligner_checks.npz"))
    moving, fixed, true = (
        ref["affine_recovery/points_m"],
        ref["affine_recovery/points_f"],
        ref["affine_recovery/true_matrix"],
    )
    forward = fit_affine(moving, fixed)
    torch.testing.assert_close(forward, true, rtol=0, atol=1e-6)
    torch.testing.assert_close(forward, ref["affine_recovery/transform_matrix"], rtol=0, atol=1e-6)
    torch.testing.assert_close(
        torch.linalg.inv(fit_affine(fixed, moving)), ref["affine_recovery/transform_matrix"], rtol=0, atol=1e-6
    )
    weights = torch.rand(1, moving.shape[1]) + 0.1
    torch.testing.assert_close(fit_affine(moving, fixed, weights), true, rtol=0, atol=1e-6)

    rigid_fixed, rigid_true = ref["rigid_recovery/points_f"], ref["rigid_recovery/true_matrix"]
    rigid = fit_rigid(moving, rigid_fixed)
    torch.testing.assert_close(rigid, rigid_true, rtol=0, atol=1e-6)
    torch.testing.assert_close(rigid, ref["rigid_recovery/transform_matrix"], rtol=0, atol=1e-6)
    torch.testing.assert_close(fit_rigid(moving, rigid_fixed, weights), rigid_true, rtol=0, atol=1e-6)


@pytest.mark.parametrize("case,fit", [("affine", fit_affine), ("rigid", fit_rigid)])
def test_realworld_parity(case, fit):
    """Fit in millimetres (``realworld.npz``, README 4.10): matrices, grid, points_a, warped."""
    ref = as_tensors(load_npz("keymorph", "realworld.npz"))
    shape_f, shape_m = ref["shape_f"].float(), ref["shape_m"].float()
    world_f = transform_points(ref["aff_f"], norm_to_voxel(ref["points_f"], shape_f))
    world_m = transform_points(ref["aff_m"], norm_to_voxel(ref["points_m"], shape_m))
    inverse = fit(world_f, world_m)
    torch.testing.assert_close(inverse, ref[f"{case}/inverse_transform_matrix"], rtol=0, atol=1e-5)
    forward = torch.linalg.inv(inverse)
    torch.testing.assert_close(forward, ref[f"{case}/transform_matrix"], rtol=0, atol=1e-5)
    points_a = voxel_to_norm(
        transform_points(torch.linalg.inv(ref["aff_f"]), transform_points(forward, world_m)), shape_f
    )
    torch.testing.assert_close(points_a, ref[f"{case}/points_a"], rtol=0, atol=2e-6)
    world_grid = transform_points(ref["aff_f"], norm_to_voxel(normalized_grid(ref["shape_f"].tolist()), shape_f))
    moving_voxels = transform_points(torch.linalg.inv(ref["aff_m"]), transform_points(inverse, world_grid))
    grid = to_sampling_grid(voxel_to_norm(moving_voxels, shape_m), ref["shape_f"].tolist())
    torch.testing.assert_close(grid, ref[f"{case}/grid"], rtol=0, atol=2e-6)
    torch.testing.assert_close(reference_warp(ref["img_m"], grid), ref[f"{case}/warped"], rtol=0, atol=1e-5)


# --------------------------------------------------------------------------------------------- properties


@pytest.mark.parametrize("n", [2, 3])
@pytest.mark.parametrize("weighted", [False, True])
def test_fit_affine_recovers_known_affine(n, weighted):
    generator = torch.Generator().manual_seed(n + 10 * weighted)
    true = random_affine(n, 3, generator)
    source = torch.rand(3, 9, n, dtype=F64, generator=generator) * 2 - 1
    weights = torch.rand(3, 9, dtype=F64, generator=generator) + 0.1 if weighted else None
    fitted = fit_affine(source, transform_points(true, source), weights)
    torch.testing.assert_close(fitted, true, rtol=0, atol=1e-10)
    torch.testing.assert_close(
        fit_affine(transform_points(true, source), source, weights), torch.linalg.inv(true), rtol=0, atol=1e-10
    )


@pytest.mark.parametrize("n", [2, 3])
@pytest.mark.parametrize("weighted", [False, True])
def test_fit_rigid_recovers_known_rigid(n, weighted):
    generator = torch.Generator().manual_seed(n + 10 * weighted)
    true = random_rigid(n, 3, generator)
    source = torch.rand(3, 7, n, dtype=F64, generator=generator) * 2 - 1
    weights = torch.rand(3, 7, dtype=F64, generator=generator) + 0.1 if weighted else None
    fitted = fit_rigid(source, transform_points(true, source), weights)
    torch.testing.assert_close(fitted, true, rtol=0, atol=1e-10)
    torch.testing.assert_close(
        fit_rigid(transform_points(true, source), source, weights), torch.linalg.inv(true), rtol=0, atol=1e-10
    )


def test_weighted_fits_equal_subset_fits_and_are_scale_free():
    generator = torch.Generator().manual_seed(3)
    source, target = torch.randn(2, 12, 3, dtype=F64, generator=generator), torch.randn(
        2, 12, 3, dtype=F64, generator=generator
    )
    weights = torch.rand(2, 12, dtype=F64, generator=generator) + 0.1
    weights[:, 8:] = 0  # zero-weight points are ignored
    for fit in (fit_affine, fit_rigid):
        torch.testing.assert_close(fit(source, target, weights), fit(source, target, 7.5 * weights), rtol=0, atol=1e-12)
        subset = fit(source[:, :8], target[:, :8], weights[:, :8])
        torch.testing.assert_close(fit(source, target, weights), subset, rtol=0, atol=1e-12)
        ones = fit(source[:, :8], target[:, :8])
        torch.testing.assert_close(
            fit(source[:, :8], target[:, :8], torch.ones(2, 8, dtype=F64)), ones, rtol=0, atol=1e-12
        )


def test_fit_affine_is_the_least_squares_optimum():
    """Gradient of the weighted residual w.r.t. the matrix vanishes at the fit (noisy, non-affine data)."""
    generator = torch.Generator().manual_seed(4)
    source, target = torch.randn(2, 10, 3, dtype=F64, generator=generator), torch.randn(
        2, 10, 3, dtype=F64, generator=generator
    )
    weights = torch.rand(2, 10, dtype=F64, generator=generator)
    matrix = fit_affine(source, target, weights).requires_grad_(True)
    weighted_residual(matrix, source, target, weights).sum().backward()
    torch.testing.assert_close(matrix.grad[:, :3], torch.zeros(2, 3, 4, dtype=F64), rtol=0, atol=1e-12)


def test_fit_rigid_of_mirrored_points_is_the_optimal_rotation_3d():
    generator = torch.Generator().manual_seed(5)
    source = torch.randn(4, 10, 3, dtype=F64, generator=generator)
    mirror = torch.diag(torch.tensor([1.0, 1.0, -1.0, 1.0], dtype=F64))
    target = transform_points(random_rigid(3, 4, generator) @ mirror, source) + 0.05 * torch.randn(
        4, 10, 3, dtype=F64, generator=generator
    )
    weights = torch.rand(4, 10, dtype=F64, generator=generator) + 0.1
    fitted = fit_rigid(source, target, weights)
    torch.testing.assert_close(torch.linalg.det(fitted[:, :3, :3]), torch.ones(4, dtype=F64), rtol=0, atol=1e-12)
    for b in range(4):
        horn = horn_rotation(source[b].numpy(), target[b].numpy(), weights[b].numpy())
        np.testing.assert_allclose(fitted[b, :3, :3].numpy(), horn, atol=1e-9)


def test_fit_rigid_of_mirrored_points_is_the_optimal_rotation_2d():
    """Brute force over the angle: no rotation (with its optimal translation) has a lower weighted residual."""
    generator = torch.Generator().manual_seed(6)
    source = torch.randn(1, 8, 2, dtype=F64, generator=generator)
    target = source * torch.tensor([1.0, -1.0], dtype=F64) + 0.1 * torch.randn(1, 8, 2, dtype=F64, generator=generator)
    weights = torch.rand(1, 8, dtype=F64, generator=generator) + 0.1
    fitted = fit_rigid(source, target, weights)
    torch.testing.assert_close(torch.linalg.det(fitted[:, :2, :2]), torch.ones(1, dtype=F64), rtol=0, atol=1e-12)
    angles = torch.linspace(-math.pi, math.pi, 20001, dtype=F64)
    rotations = torch.stack(
        [torch.stack([angles.cos(), -angles.sin()], -1), torch.stack([angles.sin(), angles.cos()], -1)], -2
    )
    w = weights / weights.sum()
    src_mean, tgt_mean = (w[..., None] * source).sum(1), (w[..., None] * target).sum(1)
    candidates = torch.zeros(len(angles), 3, 3, dtype=F64)
    candidates[:, :2, :2] = rotations
    candidates[:, :2, 2] = tgt_mean - (rotations @ src_mean[0])
    candidates[:, 2, 2] = 1
    brute = weighted_residual(
        candidates, source.expand(len(angles), -1, -1), target.expand(len(angles), -1, -1), weights
    )
    ours = weighted_residual(fitted, source, target, weights)
    assert ours <= brute.min() + 1e-12
    assert ours >= brute.min() - 1e-6  # the grid step bounds how much better we can be


def test_fits_are_differentiable():
    generator = torch.Generator().manual_seed(7)
    source = torch.randn(1, 6, 3, dtype=F64, generator=generator).requires_grad_(True)
    target = torch.randn(1, 6, 3, dtype=F64, generator=generator).requires_grad_(True)
    weights = (torch.rand(1, 6, dtype=F64, generator=generator) + 0.5).requires_grad_(True)
    assert torch.autograd.gradcheck(fit_affine, (source, target, weights))
    assert torch.autograd.gradcheck(fit_rigid, (source, target, weights))


def test_transform_points_broadcasts_and_matches_homogeneous_product():
    generator = torch.Generator().manual_seed(8)
    matrix, points = random_affine(3, 2, generator), torch.randn(1, 5, 3, dtype=F64, generator=generator)
    homogeneous = torch.cat([points, torch.ones(1, 5, 1, dtype=F64)], -1)
    expected = (homogeneous @ matrix.transpose(1, 2))[..., :3]
    torch.testing.assert_close(transform_points(matrix, points), expected)


# --------------------------------------------------------------------------------------------- bad input


def test_bad_input_errors():
    points = torch.randn(1, 6, 3)
    with pytest.raises(ValueError, match="at least 4"):
        fit_affine(points[:, :3], points[:, :3])
    with pytest.raises(ValueError, match="at least 3"):
        fit_rigid(points[:, :2], points[:, :2])
    coplanar = points.clone()
    coplanar[..., 2] = 0.5
    with pytest.raises(ValueError, match="source points are degenerate"):
        fit_affine(coplanar, points)
    collinear_2d = torch.linspace(0, 1, 5)[None, :, None] * torch.tensor([1.0, 2.0])
    with pytest.raises(ValueError, match="collinear"):
        fit_affine(collinear_2d, torch.randn(1, 5, 2))
    collinear_3d = torch.linspace(0, 1, 5)[None, :, None] * torch.tensor([1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="collinear"):
        fit_rigid(collinear_3d, collinear_3d + 0.1)
    fit_rigid(coplanar, coplanar + 0.1)  # coplanar is enough for a rotation in 3-D
    nan = points.clone()
    nan[0, 1, 1] = float("nan")
    with pytest.raises(ValueError, match="target contains non-finite"):
        fit_affine(points, nan)
    with pytest.raises(ValueError, match="same shape"):
        fit_rigid(points, points[:, :5])
    with pytest.raises(ValueError, match=r"\(B, K, n\)"):
        fit_affine(points[0], points[0])
    with pytest.raises(ValueError, match="weights"):
        fit_affine(points, points, -torch.ones(1, 6))
    with pytest.raises(ValueError, match="positive sum"):
        fit_rigid(points, points, torch.zeros(1, 6))
    with pytest.raises(ValueError, match="weights must be"):
        fit_affine(points, points, torch.ones(6))
    with pytest.raises(ValueError, match="matrix"):
        transform_points(torch.eye(3)[None], points)
