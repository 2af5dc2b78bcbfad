"""Cubic B-spline control points -> DDF and the SITReg control-point bound (monai_ext.spatial.bspline)."""

from __future__ import annotations

import itertools
import re

import numpy as np
import pytest
import torch
from conftest import load_npz

from monai_ext.spatial.bspline import bspline_upsample, control_point_bound, cubic_bspline


def corner_jacobian_determinants(ddf: torch.Tensor) -> torch.Tensor:
    """det(I + J) of the multilinearly interpolated map x + ddf(x) at every cell corner, one-sided limits.

    ``ddf`` is ``(B, n, *spatial)`` in voxel units; returns ``(2**n, B, *cells)``, one entry per corner variant
    (inside a cell, column ``a`` of J is the difference along ``a`` on the cell edge through that corner).
    """
    n = ddf.ndim - 2
    spatial = ddf.shape[2:]
    dets = []
    for corner in itertools.product((0, 1), repeat=n):
        columns = []
        for a in range(n):
            column = ddf.diff(dim=2 + a)
            for b in range(n):
                if b != a:
                    column = column.narrow(2 + b, corner[b], spatial[b] - 1)
            columns.append(column)
        jacobian = torch.stack(columns, dim=2).movedim((1, 2), (-2, -1))
        dets.append(torch.linalg.det(jacobian + torch.eye(n, dtype=ddf.dtype)))
    return torch.stack(dets)


def sign_pattern_fields(factors: tuple[int, ...]) -> torch.Tensor:
    """Upsampled DDFs of all 2**16 sign patterns of a 4x4 grid of +-1 control points (both channels equal)."""
    basis = torch.eye(16, dtype=torch.float64).view(16, 1, 4, 4).expand(16, 2, 4, 4)
    fields = bspline_upsample(basis, factors, [4 * f for f in factors])
    signs = torch.tensor(list(itertools.product((-1.0, 1.0), repeat=16)), dtype=torch.float64)
    return torch.einsum("pj,jc...->pc...", signs, fields)  # exact: the upsampling is linear


# ---------------------------------------------------------------------------------------------- bound


def test_bound_matches_reference_fixture():
    data = load_npz("sitreg", "components", "bspline_bounds.npz")
    assert len(data) == 14
    for key, value in data.items():
        n, factor = map(int, re.fullmatch(r"(?:bound|lookup_table)_(\d)d_factor(\d+)", key).groups())
        assert abs(control_point_bound([factor] * n) - float(value)) <= 1e-12, key
        if key.startswith("bound_"):  # the model's lookup table equals the algorithm
            assert float(value) == float(data[key.replace("bound_", "lookup_table_")])


@pytest.mark.parametrize(
    "n, factor, expected",
    [
        (3, 16, 0.40175329749498856),
        (3, 32, 0.40253633025170044),
        (2, 16, 0.48612715818186963),
        (2, 32, 0.48728730908780815),
    ],
)
def test_bound_matches_spec_table(n, factor, expected):
    # the table of control-point bounds hard-coded in the SITReg authors' reference model
    assert control_point_bound([factor] * n) == pytest.approx(expected, rel=1e-12, abs=0)


def test_bound_1d_by_hand():
    # f = 1: fine voxels sit on the control points, weights (1/6, 2/3, 1/6); the forward difference between two
    # neighbours has weights (1/6, 1/2, -1/2, -1/6), worst |sum| = 4/3 -> bound 3/4.
    assert control_point_bound([1]) == pytest.approx(0.75, abs=1e-15)
    # f = 2: fine voxels at offsets +-1/4, +-3/4, kernel B(-1.75 .. 1.75) = (1, 27, 121, 235, 235, 121, 27, 1) / 384,
    # zero-padded forward differences (1, 26, 94, 114, 0, -114, -94, -26, -1) / 384; the two phases (every second
    # entry) sum to 190/384 and 280/384 in absolute value; times f = 2 the worst is 35/24 -> bound 24/35.
    assert control_point_bound([2]) == pytest.approx(24 / 35, abs=1e-15)


@pytest.mark.parametrize("factors", [(1, 1), (2, 2), (2, 3)])
def test_bound_is_tight_2d_brute_force(factors):
    """1 / max over all +-1 patterns of the corner Jacobian max row sum equals the bound (reference test)."""
    ddf = sign_pattern_fields(factors)
    f = torch.tensor(factors, dtype=torch.float64).view(1, 2, 1, 1)
    # the bound is stated in coarse voxel units: J_ia = (f_a / f_i) * d ddf_i / dx_a
    d0 = (ddf.diff(dim=2) * f[:, :1] / f).abs()  # (P, 2, H-1, W)
    d1 = (ddf.diff(dim=3) * f[:, 1:] / f).abs()  # (P, 2, H, W-1)
    worst = max(
        (d0[..., c1 : d0.shape[3] - 1 + c1] + d1[..., c0 : d1.shape[2] - 1 + c0, :]).max().item()
        for c0, c1 in itertools.product((0, 1), repeat=2)
    )
    assert 1 / worst == pytest.approx(control_point_bound(factors), rel=1e-10, abs=0)


@pytest.mark.parametrize("factors", [(1, 1), (2, 2), (3, 2), (1, 1, 1), (2, 2, 2), (4, 2, 1)])
@pytest.mark.parametrize("extreme", [True, False])
def test_bounded_control_points_give_positive_jacobians(factors, extreme):
    n = len(factors)
    limit = 0.99 * control_point_bound(factors)
    coarse = (5,) * n
    if extreme:  # vertices of the admissible box: the hardest random cases
        cp = limit * torch.randint(0, 2, (4, n, *coarse), dtype=torch.float64).mul(2).sub(1)
    else:
        cp = limit * (2 * torch.rand(4, n, *coarse, dtype=torch.float64) - 1)
    ddf = bspline_upsample(cp, factors, [s * f for s, f in zip(coarse, factors)])
    assert corner_jacobian_determinants(ddf).min() > 0


@pytest.mark.parametrize("factors", [(2, 3), (2, 2, 2), (1, 2, 2)])
def test_bound_is_tight_for_folding(factors):
    """The worst control-point pattern folds just above the bound and not below it.

    With all channels equal, J = f g^T (f = factors, g = gradient of the coarse-unit spline), so
    det(I + J) = 1 + div(ddf): the most negative forward-difference divergence at one voxel is -|c| / bound.
    """
    n = len(factors)
    coarse = (6,) * n
    shape = [s * f for s, f in zip(coarse, factors)]
    m = int(np.prod(coarse))
    basis = torch.eye(m, dtype=torch.float64).view(m, 1, *coarse).expand(m, n, *coarse)
    fields = bspline_upsample(basis, factors, shape)
    cells = (slice(None),) + tuple(slice(0, s - 1) for s in shape)  # forward differences at every cell corner 0
    div = sum(fields[:, a].diff(dim=1 + a)[cells] for a in range(n))
    weights = div.reshape(m, -1)  # per fine voxel, the divergence weight of every control point
    worst_voxel = weights.abs().sum(0).argmax()
    bound = control_point_bound(factors)
    assert weights[:, worst_voxel].abs().sum().item() == pytest.approx(1 / bound, rel=1e-10)
    pattern = -torch.sign(weights[:, worst_voxel]).view(1, 1, *coarse).expand(1, n, *coarse)
    for scale, folds in ((0.99, False), (1.02, True)):
        dets = corner_jacobian_determinants(bspline_upsample(scale * bound * pattern, factors, shape))
        assert (dets.min() <= 0) == folds, scale


# ------------------------------------------------------------------------------------------ upsampling


@pytest.mark.parametrize("case", ["factor2_even", "factor2_odd", "factor4_even", "factor4_odd"])
def test_upsample_matches_reference_fixture(case):
    data = load_npz("sitreg", "components", "bspline_upsampling.npz")
    factor = int(re.match(r"factor(\d+)_", case).group(1))
    out = bspline_upsample(torch.from_numpy(data["control_points"]), factor, data[f"{case}_full_shape"].tolist())
    assert out.dtype == torch.float32
    np.testing.assert_allclose(out.numpy(), data[f"{case}_upsampled_ddf"], rtol=0, atol=1e-5)


def direct_upsample(cp: np.ndarray, factors, output_shape) -> np.ndarray:
    """Non-separable evaluation: sum over a generous range of virtual control points, clamped onto the grid."""
    n = cp.ndim - 2
    coarse = cp.shape[2:]
    p = [(np.arange(s) + 0.5) / f - 0.5 for s, f in zip(output_shape, factors)]
    out = np.zeros(cp.shape[:2] + tuple(output_shape))
    for k in itertools.product(*(range(-4, s + 4) for s in coarse)):
        weight = np.ones(output_shape)
        for d in range(n):
            weight = weight * cubic_bspline(p[d] - k[d]).reshape([-1 if e == d else 1 for e in range(n)])
        j = tuple(int(np.clip(k[d], 0, coarse[d] - 1)) for d in range(n))
        out += cp[(slice(None), slice(None)) + j][(...,) + (None,) * n] * weight
    return out * np.array(factors).reshape((1, n) + (1,) * n)


@pytest.mark.parametrize(
    "coarse, factors, output_shape",
    [((4, 3), (3, 2), (12, 6)), ((3, 5), (5, 1), (9, 7)), ((2, 3, 2), (2, 3, 4), (5, 9, 6)), ((1, 2, 3), 1, (2, 2, 3))],
)
def test_upsample_matches_direct_evaluation(coarse, factors, output_shape):
    """Odd/anisotropic factors, output shapes smaller or larger than ``coarse * factors``, single-voxel axes."""
    n = len(coarse)
    cp = torch.randn(2, n, *coarse, dtype=torch.float64)
    out = bspline_upsample(cp, factors, output_shape)
    factors = (factors,) * n if isinstance(factors, int) else factors
    np.testing.assert_allclose(out.numpy(), direct_upsample(cp.numpy(), factors, output_shape), rtol=0, atol=1e-12)


def test_upsample_constant_control_points():
    # the B-spline weights sum to one (partition of unity) and border replication keeps a constant constant,
    # so a constant c becomes the constant displacement f_i * c_i in full-resolution voxels
    cp = torch.tensor([0.3, -0.2, 0.1], dtype=torch.float64).view(1, 3, 1, 1, 1).expand(2, 3, 3, 4, 2)
    out = bspline_upsample(cp, (2, 3, 5), (6, 11, 9))
    expected = torch.tensor([0.6, -0.6, 0.5], dtype=torch.float64).view(1, 3, 1, 1, 1).expand_as(out)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-14)


def test_upsample_factor_one_is_smoothing():
    # f = 1: u(i) = c(i-1)/6 + 2 c(i)/3 + c(i+1)/6 per axis, with replicated borders (derivable by hand)
    cp = torch.tensor([[0.0, 6.0, 0.0, 12.0]], dtype=torch.float64).view(1, 1, 4, 1).expand(1, 2, 4, 1).contiguous()
    out = bspline_upsample(cp, 1, (4, 1))
    expected = torch.tensor([1.0, 4.0, 3.0, 10.0], dtype=torch.float64)
    torch.testing.assert_close(out[0, 0, :, 0], expected, rtol=0, atol=1e-14)
    torch.testing.assert_close(out[0, 1, :, 0], expected, rtol=0, atol=1e-14)


@pytest.mark.parametrize(
    "shape, factors, output_shape", [((1, 2, 3, 4), (2, 3), (5, 7)), ((1, 3, 2, 3, 2), 2, (3, 5, 4))]
)
def test_upsample_gradcheck(shape, factors, output_shape):
    cp = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda c: bspline_upsample(c, factors, output_shape), (cp,))


@pytest.mark.parametrize(
    "cp, factors, output_shape, match",
    [
        (torch.zeros(1, 3, 4, 4), 2, (8, 8), "control_points"),  # channels != spatial dims
        (torch.zeros(1, 1, 4), 2, (8,), "control_points"),  # 1-D
        (torch.zeros(1, 2, 4, 4, dtype=torch.int64), 2, (8, 8), "floating point"),
        (torch.full((1, 2, 4, 4), float("nan")), 2, (8, 8), "non-finite"),
        (torch.zeros(1, 2, 4, 4), 0, (8, 8), "factors"),
        (torch.zeros(1, 2, 4, 4), (2, 2, 2), (8, 8), "factors"),
        (torch.zeros(1, 2, 4, 4), (2, 1.5), (8, 8), "factors"),
        (torch.zeros(1, 2, 4, 4), 2, (8, 8, 8), "output_shape"),
        (torch.zeros(1, 2, 4, 4), 2, (8, 0), "output_shape"),
        (torch.zeros(1, 2, 4, 4), 2, 8, "output_shape"),
    ],
)
def test_upsample_bad_input(cp, factors, output_shape, match):
    with pytest.raises(ValueError, match=match):
        bspline_upsample(cp, factors, output_shape)


@pytest.mark.parametrize("factors", [[], [0, 2], [2, -1], [1.5], "ab"])
def test_bound_bad_input(factors):
    with pytest.raises(ValueError, match="factors"):
        control_point_bound(factors)
