"""Deformation metrics: parity with the SITReg fixture ``components/ndv_jacobian.npz`` and properties."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import load_npz

from monai_ext.metrics.deformation import (
    folding_fraction,
    inverse_consistency_error,
    jacobian_determinant,
    jacobian_schemes,
    non_diffeomorphic_volume,
    sampled_jacobian_determinant,
    sdlogj,
    target_registration_error,
)
from monai_ext.spatial.sampling import affine_to_ddf

ONE_SIDED = ["ppp", "ppm", "pmp", "pmm", "mpp", "mpm", "mmp", "mmm"]


@pytest.fixture(scope="module")
def ndv_fixture():
    return load_npz("sitreg", "components", "ndv_jacobian.npz")


# ----------------------------------------------------------------------------------------------- parity


@pytest.mark.parametrize("key", ONE_SIDED + ["000", "star1", "star2"])
def test_jacobian_maps_match_reference(ndv_fixture, key):
    ddf = torch.from_numpy(ndv_fixture["ddf"])
    det = jacobian_determinant(ddf, "central" if key == "000" else key)
    assert det.shape == (2, 1, 10, 12, 14)
    # float32 rounding of determinants of order 1-10 (measured max 9.5e-7)
    np.testing.assert_allclose(det[:, 0].numpy(), ndv_fixture[f"jacdet_{key}"], rtol=0, atol=5e-6)


def test_ndv_total_matches_reference(ndv_fixture):
    ddf = torch.from_numpy(ndv_fixture["ddf"])
    per_item = non_diffeomorphic_volume(ddf)
    assert per_item.shape == (2,)
    np.testing.assert_allclose(per_item.sum().item(), ndv_fixture["ndv_total_sum"], rtol=1e-6)
    np.testing.assert_allclose(non_diffeomorphic_volume(ddf, "sum").item(), ndv_fixture["ndv_total_sum"], rtol=1e-6)
    mean = non_diffeomorphic_volume(ddf, "mean").item()
    np.testing.assert_allclose(mean, ndv_fixture["ndv_total_sum"] / 2, rtol=1e-6)


@pytest.mark.parametrize("item", [0, 1])
@pytest.mark.parametrize("scheme", ["avg", "crop_last", "central"])
def test_evaluator_grid_determinant_matches_reference(ndv_fixture, scheme, item):
    ddf = torch.from_numpy(ndv_fixture["ddf"][item : item + 1])
    det = jacobian_determinant(ddf, scheme)
    expected = ndv_fixture[f"eval_det_{scheme}_item{item}"]
    assert det.shape == expected.shape
    np.testing.assert_allclose(det.numpy(), expected, rtol=0, atol=1e-5)  # measured max 2.6e-6 (avg)
    assert int((det < 0).sum()) == int(ndv_fixture[f"eval_n_negative_{scheme}_item{item}"])
    # the reference reports the Bessel-corrected standard deviation
    np.testing.assert_allclose(det.double().std().item(), ndv_fixture[f"eval_det_std_{scheme}_item{item}"], rtol=1e-5)


def test_forward_is_crop_last(ndv_fixture):
    ddf = torch.from_numpy(ndv_fixture["ddf"])
    assert torch.equal(jacobian_determinant(ddf, "forward"), jacobian_determinant(ddf, "crop_last"))


def test_sampled_determinant_matches_reference(ndv_fixture):
    ddf = torch.from_numpy(ndv_fixture["ddf"][:1]).double()
    points = torch.from_numpy(ndv_fixture["sampled_points_voxel"]).transpose(1, 2)  # (1, 4000, 3)
    det = sampled_jacobian_determinant(ddf, points)
    assert det.shape == (1, 4000)
    # the reference uses forward differences with step 1e-7 voxel in float64 (error ~1e-6); measured 1.4e-7
    np.testing.assert_allclose(det.numpy(), ndv_fixture["sampled_det"][:, 0], rtol=0, atol=1e-5)
    assert int((det < 0).sum()) == int(ndv_fixture["sampled_n_negative"])
    np.testing.assert_allclose(det.std().item(), ndv_fixture["sampled_det_std"], rtol=1e-6)
    # float32 input: same result at float32 rounding
    det32 = sampled_jacobian_determinant(ddf.float(), points.float())
    np.testing.assert_allclose(det32.numpy(), ndv_fixture["sampled_det"][:, 0], rtol=0, atol=1e-5)


def test_sampled_points_world_frame(ndv_fixture):
    """The fixture's world points are the voxel points in SITReg's centred-normalised frame.

    That frame: x_d = (i_d - (N_d - 1) / 2) * h with h = 2 / 16 for the isotropic 12 x 14 x 16 grid.
    """
    shape = np.array(ndv_fixture["ddf"].shape[2:], dtype=float)
    world = (ndv_fixture["sampled_points_voxel"] - ((shape - 1) / 2)[None, :, None]) * (2 / shape.max())
    np.testing.assert_allclose(world, ndv_fixture["sampled_points_world"], rtol=0, atol=1e-12)


# ----------------------------------------------------------------------------------------------- properties


@pytest.mark.parametrize("n", [2, 3])
def test_identity_field(n):
    ddf = torch.zeros(2, n, *([7] * n))
    for scheme in jacobian_schemes(n):
        expected = 2.0 if scheme.startswith("star") else 1.0  # star columns are 2x the identity's volume
        det = jacobian_determinant(ddf, scheme)
        torch.testing.assert_close(det, torch.full_like(det, expected))
    assert torch.equal(folding_fraction(ddf), torch.zeros(2))
    assert torch.equal(sdlogj(ddf), torch.zeros(2))
    points = torch.rand(2, 20, n) * 6
    torch.testing.assert_close(sampled_jacobian_determinant(ddf, points), torch.ones(2, 20))
    if n == 3:
        assert torch.equal(non_diffeomorphic_volume(ddf), torch.zeros(2))


def _random_affine(n: int, det_sign: float = 1.0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(3)
    matrix = torch.eye(n + 1, dtype=torch.float64)
    matrix[:n, :n] += 0.3 * torch.randn(n, n, generator=generator, dtype=torch.float64)
    matrix[:n, n] = torch.randn(n, generator=generator, dtype=torch.float64)
    if det_sign < 0:
        matrix[0, :n] = -matrix[0, :n]
    return matrix[None]


@pytest.mark.parametrize("n", [2, 3])
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_affine_field_determinant(n, sign):
    """Finite differences of an affine map are exact: det = det(A) (star schemes: 2 det(A))."""
    matrix = _random_affine(n, sign)
    expected = torch.linalg.det(matrix[0, :n, :n])
    assert expected * sign > 0
    ddf = affine_to_ddf(matrix, [6, 7, 8][:n])
    for scheme in jacobian_schemes(n):
        det = jacobian_determinant(ddf, scheme)
        factor = 2.0 if scheme.startswith("star") else 1.0
        torch.testing.assert_close(det, torch.full_like(det, factor * expected.item()))
    points = torch.rand(1, 50, n, dtype=torch.float64) * 5  # inside [0, N - 1) on every axis
    sampled = sampled_jacobian_determinant(ddf, points)
    torch.testing.assert_close(sampled, torch.full((1, 50), expected.item(), dtype=torch.float64))
    if sign > 0:  # constant determinant -> zero spread of its log
        torch.testing.assert_close(sdlogj(ddf), torch.zeros(1, dtype=torch.float64), atol=1e-9, rtol=0)
    assert folding_fraction(ddf).item() == (0.0 if sign > 0 else 1.0)


def test_known_fold_detected():
    """One displaced slab along axis 0: T_0(i) = i except T_0(5) = 3 (u_0 = -2 at i = 5).

    Hand derivation on a 10 x 8 x 8 grid: forward differences along axis 0 are -1 at i = 4 only, so the
    "forward" folding fraction is 1/9 (one slab of 9); central differences give 0 at i = 4 (one interior
    slab of 8 counted by det <= 0). NDV per interior (j, k): the four "p.." schemes give -1 at i = 4, the
    four "m.." schemes -1 at i = 5, star2 -2 at i = 4, star1 -2 at i = 5 -> (4 + 4 + 2 + 2) / 12 = 1, times
    6 x 6 interior (j, k) positions = 36.
    """
    ddf = torch.zeros(1, 3, 10, 8, 8)
    ddf[:, 0, 5] = -2.0
    torch.testing.assert_close(folding_fraction(ddf, "forward"), torch.tensor([1 / 9]))
    torch.testing.assert_close(folding_fraction(ddf, "central"), torch.tensor([1 / 8]))
    torch.testing.assert_close(non_diffeomorphic_volume(ddf), torch.tensor([36.0]))
    torch.testing.assert_close(non_diffeomorphic_volume(ddf, percentage=True), torch.tensor([100 * 36 / 640]))
    det = jacobian_determinant(ddf, "ppp")
    assert torch.equal(det[0, 0, 3], torch.full((6, 6), -1.0))  # interior index 3 = voxel 4
    # sampled (continuous) determinant: negative exactly inside the cell [4, 5) along axis 0
    points = torch.tensor([[[4.5, 3.2, 3.7], [5.5, 3.2, 3.7], [3.5, 1.0, 1.0]]])
    torch.testing.assert_close(sampled_jacobian_determinant(ddf, points), torch.tensor([[-1.0, 3.0, 1.0]]))
    assert sdlogj(ddf).item() > 1.0  # clipped log of det <= 0 dominates


def test_inverse_consistency_translation():
    shift = torch.tensor([1.5, -0.5, 2.0]).view(1, 3, 1, 1, 1)
    forward = shift.expand(2, 3, 6, 7, 8).clone()
    errors = inverse_consistency_error(forward, -forward)
    assert set(errors) == {"mse", "mae", "max", "reverse_mse", "reverse_mae", "reverse_max"}
    for value in errors.values():  # exact up to grid_sample's float32 weight rounding
        torch.testing.assert_close(value, torch.zeros(2), atol=1e-6, rtol=0)
    # forward = shift, inverse = identity: the residual is the shift everywhere (hand-computed moments)
    errors = inverse_consistency_error(forward, torch.zeros_like(forward))
    torch.testing.assert_close(errors["mse"], torch.full((2,), (1.5**2 + 0.5**2 + 2.0**2) / 3))
    torch.testing.assert_close(errors["mae"], torch.full((2,), (1.5 + 0.5 + 2.0) / 3))
    torch.testing.assert_close(errors["reverse_max"], torch.full((2,), 2.0))


def test_tre_of_translation_in_mm():
    shift = torch.tensor([1.0, 1.5, -2.0])
    ddf = shift.view(1, 3, 1, 1, 1).expand(1, 3, 6, 7, 8).clone()
    fixed = torch.rand(1, 5, 3) * 5
    tre = target_registration_error(ddf, fixed, fixed, spacing=(1.0, 2.0, 0.5))
    # |(1 * 1.0, 1.5 * 2.0, -2 * 0.5)| = sqrt(1 + 9 + 1)
    torch.testing.assert_close(tre, torch.full((1, 5), math.sqrt(11.0)))
    torch.testing.assert_close(target_registration_error(ddf, fixed, fixed), torch.full((1, 5), math.sqrt(7.25)))
    tre = target_registration_error(ddf, fixed, fixed + shift)
    torch.testing.assert_close(tre, torch.zeros(1, 5), atol=1e-6, rtol=0)


def test_bad_inputs():
    ddf = torch.zeros(1, 3, 6, 6, 6)
    with pytest.raises(ValueError, match="ddf"):
        jacobian_determinant(torch.zeros(1, 2, 6, 6, 6))
    with pytest.raises(ValueError, match="non-finite"):
        jacobian_determinant(torch.full((1, 3, 6, 6, 6), float("nan")))
    with pytest.raises(ValueError, match="scheme"):
        jacobian_determinant(ddf, "sideways")
    with pytest.raises(ValueError, match="scheme"):
        jacobian_determinant(torch.zeros(1, 2, 6, 6), "star1")
    with pytest.raises(ValueError, match="at least 3 voxels"):
        jacobian_determinant(torch.zeros(1, 3, 2, 6, 6))
    with pytest.raises(ValueError, match="3-D"):
        non_diffeomorphic_volume(torch.zeros(1, 2, 6, 6))
    with pytest.raises(ValueError, match="reduction"):
        non_diffeomorphic_volume(ddf, reduction="max")
    with pytest.raises(ValueError, match="points_voxel"):
        sampled_jacobian_determinant(ddf, torch.zeros(1, 3, 10))
    with pytest.raises(ValueError, match="inverse_ddf"):
        inverse_consistency_error(ddf, torch.zeros(1, 3, 5, 6, 6))
    with pytest.raises(ValueError, match="moving_points_voxel"):
        target_registration_error(ddf, torch.zeros(1, 4, 3), torch.zeros(1, 5, 3))
    with pytest.raises(ValueError, match="fixed_points_voxel"):
        target_registration_error(ddf, torch.zeros(1, 0, 3), torch.zeros(1, 0, 3))
    with pytest.raises(ValueError, match="spacing"):
        target_registration_error(ddf, torch.zeros(1, 4, 3), torch.zeros(1, 4, 3), spacing=(1.0, 1.0))


@pytest.mark.parametrize("n", [2, 3])
def test_determinant_slabs_and_cofactors_equal_the_whole_field_lu(n, monkeypatch):
    """The determinants computed slab by slab (many slabs, the last partial) by cofactor expansion equal
    torch.linalg.det of the whole field's finite-difference Jacobians, for every scheme and a batch of 2."""
    import monai_ext.metrics.deformation as deformation

    generator = torch.Generator().manual_seed(n)
    shape = (9, 8, 7)[:n]
    ddf = 0.4 * torch.randn(2, n, *shape, generator=generator, dtype=torch.float64)
    for scheme in jacobian_schemes(n):
        low, high, columns = deformation._stencil(scheme, n)
        mapping = ddf + deformation.voxel_grid(shape, ddf.dtype)
        cols = [sum(c * deformation._window(mapping, o, low, high) for c, o in column) for column in columns]
        expected = torch.linalg.det(torch.stack(cols, dim=2).movedim((1, 2), (-2, -1))).unsqueeze(1)
        whole = jacobian_determinant(ddf, scheme)
        monkeypatch.setattr(deformation, "_DETERMINANT_BLOCK", 2 * int(np.prod(shape[1:])))  # 1 row per slab
        slabs = jacobian_determinant(ddf, scheme)
        monkeypatch.undo()
        torch.testing.assert_close(whole, expected, rtol=0, atol=1e-12, msg=scheme)
        assert torch.equal(slabs, whole), scheme
