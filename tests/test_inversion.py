"""Deformation inversion layer: reference parity, fixed-point properties, implicit gradients, memory."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import fixture_path, load_npz
from monai_ext.spatial.inversion import (
    AndersonSolver,
    ConvergenceWarning,
    DDFInversion,
    MaxAbsResidual,
    RelativeL2Residual,
    invert_ddf,
)
from monai_ext.spatial.sampling import compose


def tight_solvers(forward: float = 1e-6, backward: float = 1e-7, max_iterations: int = 500):
    """The fixture's solvers: Anderson (memory 4), max-abs forward and relative-L2 backward stop."""
    return (
        AndersonSolver(MaxAbsResidual(forward, 2, max_iterations), memory=4),
        AndersonSolver(RelativeL2Residual(backward, 2, max_iterations), memory=4),
    )


def random_contraction(shape, lipschitz, batch=1, dtype=torch.float64, seed=0, coarse=3):
    """Smooth random voxel DDF whose multilinear interpolant has inf-norm Lipschitz constant <= ``lipschitz``.

    A random coarse grid is upsampled (multilinear). For the multilinear interpolant of grid values,
    ``|d D_c / d x_d|`` is a convex combination of grid differences along ``d``, so
    ``|D_c(p) - D_c(q)| <= (sum_d max |diff_d D_c|) * |p - q|_inf``; each batch element is scaled so that
    the largest such sum over channels equals ``lipschitz``. Then ``g(v) = -D(x + v)`` is a contraction
    in the max norm with that constant.
    """
    n = len(shape)
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(batch, n, *([coarse] * n), generator=gen, dtype=torch.float64)
    field = F.interpolate(noise, size=tuple(shape), mode="bilinear" if n == 2 else "trilinear", align_corners=True)
    lip = sum(field.diff(dim=2 + d).abs().amax(dim=tuple(range(2, 2 + n))) for d in range(n))  # (B, n)
    field = field * (lipschitz / lip.amax(dim=1)).view(batch, *([1] * (n + 1)))
    return field.to(dtype)


# ------------------------------------------------------------------------------------------------
# Parity with the reference (fixtures/sitreg/components/inversion.npz, README section 4 (iii))
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tag", ["3d", "2d"])
def test_reference_parity(tag):
    """Inverse, objective sum(v * W) and its implicit gradient match the reference (float32, tight solvers).

    Tolerances: the reference's own solver residual is ~5e-7 voxel, so 1e-5 voxel on v; objective
    relative 1e-5; gradient relative L2 1e-4 and max-abs 1e-4 of its scale (observed ~5e-7 / 2e-6).
    """
    data = load_npz("sitreg", "components", "inversion.npz")
    log = json.loads(fixture_path("sitreg", "components", "meta.json").read_text())["inversion"][tag]["solver_log"]
    ddf = torch.from_numpy(data[f"{tag}_ddf"]).requires_grad_(True)
    weights = torch.from_numpy(data[f"{tag}_weights_W"])
    forward_solver, backward_solver = tight_solvers()
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        inverse = invert_ddf(ddf, forward_solver, backward_solver)
        objective = (inverse * weights).sum()
        objective.backward()

    torch.testing.assert_close(inverse, torch.from_numpy(data[f"{tag}_inverse_ddf"]), rtol=0, atol=1e-5)
    expected_objective = float(data[f"{tag}_objective_sum_inverse_times_W"])
    assert abs(objective.item() - expected_objective) <= 1e-5 * abs(expected_objective)
    expected_grad = torch.from_numpy(data[f"{tag}_grad_wrt_ddf"])
    assert ((ddf.grad - expected_grad).norm() / expected_grad.norm()).item() < 1e-4
    assert (ddf.grad - expected_grad).abs().max().item() < 1e-4 * expected_grad.abs().max().item()
    # same Anderson scheme => (nearly) the same number of evaluations as the reference's forward solve
    assert abs(forward_solver.last_iterations - log[0]["n_function_evaluations"]) <= 2
    assert forward_solver.last_residual < 1e-6 and backward_solver.last_residual < 1e-7


# ------------------------------------------------------------------------------------------------
# Properties of the forward solve
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(12, 10), (8, 9, 10)])
def test_inverse_composes_to_identity(shape):
    """A(x + v(x)) = x, i.e. compose(ddf, v) = v + ddf(x + v) = 0, below the solver tolerance.

    The returned v = g(x_last) with max |g(x_last) - x_last| < tol, and g has Lipschitz constant
    L = 0.8 in the max norm, so max |g(v) - v| = max |compose(ddf, v)| <= L * tol < tol.
    """
    ddf = random_contraction(shape, 0.8, batch=2, dtype=torch.float32, seed=len(shape))
    assert ddf.abs().max() > 0.75  # displacements of most of a voxel: a non-trivial inversion
    solver = AndersonSolver(MaxAbsResidual(1e-2, 2, 50))
    default = invert_ddf(ddf, forward_solver=solver)
    assert solver.last_residual < 1e-2
    assert compose(ddf, default).abs().max() < 1e-2
    # tight settings in float64
    ddf64 = ddf.double()
    tight, _ = tight_solvers(forward=1e-10)
    exact = invert_ddf(ddf64, tight)
    assert compose(ddf64, exact).abs().max() < 1e-10
    assert invert_ddf(ddf).dtype == torch.float32  # defaults, dtype follows the input
    assert (default.double() - exact).abs().max() < 1e-2 / (1 - 0.8)  # error of a contraction's iterate


def test_exact_cases():
    """Derivable by hand: ddf = 0 -> v = 0; a constant shift c (border extrapolation keeps it constant
    everywhere) -> v = -c, reached after the minimum of 2 evaluations (g is constant)."""
    zero = torch.zeros(1, 3, 4, 5, 6)
    assert torch.equal(invert_ddf(zero), zero)
    shift = torch.tensor([0.3, -1.7]).view(1, 2, 1, 1).expand(2, 2, 6, 7).contiguous()
    solver = AndersonSolver(MaxAbsResidual())
    torch.testing.assert_close(invert_ddf(shift, solver), -shift)
    assert solver.last_iterations == 2


def test_batch_elements_are_independent():
    """Anderson mixing is per batch element: a batched solve equals the individual solves."""
    ddf = random_contraction((10, 11), 0.7, batch=2, seed=3)
    forward_solver, _ = tight_solvers(forward=1e-11)
    batched = invert_ddf(ddf, forward_solver)
    single = torch.cat([invert_ddf(ddf[i : i + 1], forward_solver) for i in range(2)])
    torch.testing.assert_close(batched, single, rtol=0, atol=1e-10)


def test_module_wrapper_and_logs():
    ddf = random_contraction((6, 7, 8), 0.6, dtype=torch.float32, seed=4)
    layer = DDFInversion()
    assert layer.forward_solver.stop == MaxAbsResidual(1e-2, 2, 50)
    assert layer.backward_solver.stop == RelativeL2Residual(1e-2, 2, 50, 1e-5)
    assert layer.forward_solver.memory == layer.backward_solver.memory == 4
    out = layer(ddf)
    assert out.shape == ddf.shape
    assert 2 <= layer.forward_solver.last_iterations <= 50
    assert layer.forward_solver.last_residual < 1e-2
    forward_solver, _ = tight_solvers()
    assert torch.equal(DDFInversion(forward_solver)(ddf), invert_ddf(ddf, forward_solver))


# ------------------------------------------------------------------------------------------------
# Anderson solver and stop criteria (of SITReg's deformation inversion layer)
# ------------------------------------------------------------------------------------------------


def test_anderson_converges_to_sqrt7():
    """The reference's solver test: g(x) = (7 / x + x) / 2 (Newton for x^2 = 7) from U[4, 5]."""
    x0 = 4 + torch.rand(3, 2, 5)
    solver = AndersonSolver(MaxAbsResidual(1e-6, 2, 50))
    x = solver.solve(lambda x: (7 / x + x) / 2, x0)
    torch.testing.assert_close(x, torch.full_like(x0, math.sqrt(7)))
    assert solver.last_iterations < 50


@pytest.mark.parametrize("memory", [1, 3, 4])
def test_anderson_writes_into_history_slots(memory):
    """g(x, out) writing into the history slot it is handed (no copies), or returning a tensor of its own, gives the
    iterates of the plain g(x) bit for bit, per batch element (batch 3, more evaluations than slots); x0 is
    overwritten and the returned tensor owns its memory (not a view of the history)."""
    generator = torch.Generator().manual_seed(1)
    x0 = 4 + torch.rand(3, 2, 5, generator=generator, dtype=torch.float64)

    def newton(x: torch.Tensor) -> torch.Tensor:
        return (7 / x + x) / 2

    def into(x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        assert out.shape == x.shape and out.is_contiguous() and out.data_ptr() != x.data_ptr()
        return torch.div(7 / x + x, 2, out=out)

    results, counts = [], []
    for g, writes in ((newton, False), (into, True), (lambda x, out: newton(x), True)):
        solver = AndersonSolver(MaxAbsResidual(1e-12, 6, 50), memory=memory)
        start = x0.clone()
        results.append(solver.solve(g, start, writes_into=writes))
        counts.append(solver.last_iterations)
        assert results[-1].untyped_storage().nbytes() == start.numel() * start.element_size()
    assert counts[0] == counts[1] == counts[2] >= 6
    assert torch.equal(results[0], results[1]) and torch.equal(results[0], results[2])
    torch.testing.assert_close(results[0], torch.full_like(x0, math.sqrt(7)))


@pytest.mark.parametrize(
    "stop, expected",
    [
        (MaxAbsResidual(1e-2, 2, 50), 2),  # g constant: residual 0 after the 2nd evaluation
        (MaxAbsResidual(1e-2, 5, 50), 5),  # never stop below min_iterations
        (RelativeL2Residual(1e-2, 0, 50), 2),  # 1st residual |c - x0| is large; 2nd is 0
        (MaxAbsResidual(1e-2, 1, 1), 1),  # max_iterations 1: one evaluation (warns, residual > threshold)
    ],
)
def test_stop_criterion_counts(stop, expected):
    solver = AndersonSolver(stop)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        out = solver.solve(lambda x: torch.ones_like(x), torch.zeros(2, 3))
    assert solver.last_iterations == expected
    assert torch.equal(out, torch.ones(2, 3))


def test_residual_definitions():
    """max |g(x) - x| and ||g(x) - x|| / (eps + ||g(x)||) over the whole batch tensor (by hand)."""
    x, gx = torch.zeros(2, 2), torch.tensor([[3.0, 0.0], [0.0, -4.0]])
    assert MaxAbsResidual().residual(x, gx) == 4.0
    assert RelativeL2Residual(epsilon=0.0).residual(x, gx) == 1.0
    assert RelativeL2Residual(epsilon=5.0).residual(x, gx) == 0.5


def test_non_convergence_warns():
    ddf = random_contraction((10, 10), 0.97, dtype=torch.float32, seed=5)
    solver = AndersonSolver(MaxAbsResidual(1e-6, 2, 3))
    with pytest.warns(ConvergenceWarning, match="residual") as record:
        invert_ddf(ddf, solver)
    assert solver.last_iterations == 3
    assert f"{solver.last_residual:.3e}" in str(record[0].message) and "1.000e-06" in str(record[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        invert_ddf(ddf, AndersonSolver(MaxAbsResidual(1e-2, 2, 50)))  # converges: silent


# ------------------------------------------------------------------------------------------------
# Implicit backward
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape, batch, fast_mode", [((5, 6), 2, True), ((4, 4, 5), 1, False)])
def test_gradcheck(shape, batch, fast_mode):
    """Implicit-function gradient equals central finite differences of the (tightly solved) forward.

    float64, forward/backward residuals 1e-12, eps 1e-6 (so the solver error contributes ~1e-6 to the
    difference quotients), atol 1e-5. The full Jacobian is checked in 3-D; the batched 2-D case uses
    gradcheck's fast mode (random projections of the Jacobian) to keep the test quick.
    """
    ddf = random_contraction(shape, 0.5, batch=batch, seed=6).requires_grad_(True)
    forward_solver, backward_solver = tight_solvers(forward=1e-12, backward=1e-12)
    assert torch.autograd.gradcheck(
        lambda d: invert_ddf(d, forward_solver, backward_solver),
        (ddf,),
        eps=1e-6,
        atol=1e-5,
        rtol=1e-4,
        fast_mode=fast_mode,
    )


def test_saved_memory_independent_of_iterations():
    """Only ddf and v are saved for backward, whatever the number of forward/backward iterations."""
    ddf = random_contraction((8, 8, 8), 0.9, dtype=torch.float32, seed=7)

    def saved(max_iterations):
        records = []

        def pack(t):
            records.append((tuple(t.shape), t.dtype, t.numel() * t.element_size()))
            return t

        solvers = tight_solvers(forward=1e-12, backward=1e-12, max_iterations=max_iterations)
        source = ddf.clone().requires_grad_(True)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), pytest.warns(ConvergenceWarning):
            inverse = invert_ddf(source * 1.0, *solvers)
            n_forward = len(records)
            (inverse * inverse).sum().backward()
        assert solvers[0].last_iterations == solvers[1].last_iterations == max_iterations
        return records, n_forward

    (few, n_few), (many, n_many) = saved(5), saved(50)
    assert few == many and n_few == n_many
    # forward: the product `source * 1.0` saves nothing; the inversion saves exactly ddf and v
    inversion_saved = few[:n_few]
    assert len(inversion_saved) == 2 and sum(r[2] for r in inversion_saved) == 2 * ddf.numel() * 4


# ------------------------------------------------------------------------------------------------
# Input validation
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "ddf, match",
    [
        (torch.zeros(1, 3, 6, 6), "shape"),
        (torch.zeros(1, 1, 6), "shape"),
        (torch.zeros(1, 4, 3, 3, 3, 3), "shape"),
        (torch.full((1, 2, 4, 4), float("nan")), "non-finite"),
        (torch.full((1, 2, 4, 4), float("inf")), "non-finite"),
        (torch.zeros(1, 2, 4, 4, dtype=torch.int64), "floating point"),
    ],
)
def test_bad_input(ddf, match):
    with pytest.raises(ValueError, match=match):
        invert_ddf(ddf)


def test_bad_solver_arguments():
    with pytest.raises(ValueError, match="threshold"):
        MaxAbsResidual(threshold=0.0)
    with pytest.raises(ValueError, match="max_iterations"):
        RelativeL2Residual(max_iterations=0)
    with pytest.raises(ValueError, match="min_iterations"):
        MaxAbsResidual(min_iterations=10, max_iterations=5)
    with pytest.raises(ValueError, match="memory"):
        AndersonSolver(MaxAbsResidual(), memory=0)
    with pytest.raises(TypeError, match="stop"):
        AndersonSolver(1e-2)
    with pytest.raises(TypeError, match="forward_solver"):
        invert_ddf(torch.zeros(1, 2, 4, 4), forward_solver=MaxAbsResidual())
    with pytest.raises(ValueError, match="shape"):
        AndersonSolver(MaxAbsResidual()).solve(lambda x: x.sum(), torch.zeros(2, 3))
