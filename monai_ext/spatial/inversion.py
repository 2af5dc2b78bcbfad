"""Deformation inversion layer (DIL): invert a dense displacement field by a fixed-point iteration.

For a voxel DDF ``ddf`` of the map ``A(x) = x + ddf(x)`` (multilinear interpolation, border
extrapolation) the inverse DDF ``v`` on the same grid satisfies ``A(x + v(x)) = x``, i.e. ``v`` is the
fixed point of ``g(v) = -ddf(x + v)``. When ``ddf`` is a contraction (Lipschitz constant < 1, as the
bounded B-spline fields of SITReg are) the fixed point exists, is unique, and is found by Anderson
accelerated iteration. The backward pass uses the implicit function theorem, so no autograd graph is
kept through the iterations and memory does not depend on the iteration count.

Reference: Honkamaa & Marttinen, "SITReg: Multi-resolution architecture for symmetric, inverse
consistent, and topology preserving image registration" (MELBA 2024), where the layer was introduced.
MONAI has no fixed-point solver or implicit layer, hence the hand-written Anderson solver (Walker &
Ni, SIAM J. Numer. Anal. 2011).
"""

from __future__ import annotations

import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from monai_ext.spatial.sampling import check_ddf, sample

__all__ = [
    "ConvergenceWarning",
    "StopCriterion",
    "MaxAbsResidual",
    "RelativeL2Residual",
    "AndersonSolver",
    "invert_ddf",
    "DDFInversion",
]


class ConvergenceWarning(UserWarning):
    """A fixed-point solve stopped at ``max_iterations`` without meeting its threshold."""


@dataclass
class StopCriterion(ABC):
    """Base stop criterion on the fixed-point residual ``g(x) - x`` over the whole (batch) tensor.

    With ``n`` the number of evaluations of ``g`` so far: never stop while ``n < min_iterations``,
    always stop once ``n >= max_iterations``, otherwise stop when :meth:`residual` ``< threshold``.
    """

    threshold: float = 1e-2
    min_iterations: int = 2
    max_iterations: int = 50

    def __post_init__(self) -> None:
        if not self.threshold > 0:
            raise ValueError(f"threshold must be positive, got {self.threshold}")
        if self.max_iterations < 1:
            raise ValueError(f"max_iterations must be >= 1, got {self.max_iterations}")
        if not 0 <= self.min_iterations <= self.max_iterations:
            raise ValueError(
                f"min_iterations must be in [0, max_iterations={self.max_iterations}], got {self.min_iterations}"
            )

    def residual(self, x: torch.Tensor, gx: torch.Tensor) -> float:
        """Size of the residual ``gx - x`` (``gx = g(x)``) compared with ``threshold``."""
        return self.residual_of(gx - x, gx)

    @abstractmethod
    def residual_of(self, difference: torch.Tensor, gx: torch.Tensor) -> float:
        """:meth:`residual` from the difference ``gx - x`` already formed (the solver keeps it anyway)."""

    def should_stop(self, n_evaluations: int, residual: float) -> bool:
        """Whether to stop after ``n_evaluations`` evaluations whose last residual is ``residual``."""
        if n_evaluations < self.min_iterations:
            return False
        return n_evaluations >= self.max_iterations or self.converged(residual)

    def converged(self, residual: float) -> bool:
        """Whether ``residual`` meets the threshold (``False`` for NaN)."""
        return residual < self.threshold


@dataclass
class MaxAbsResidual(StopCriterion):
    """Stop when ``max |g(x) - x| < threshold`` (units of ``x``, e.g. voxels)."""

    def residual_of(self, difference: torch.Tensor, gx: torch.Tensor) -> float:
        low, high = torch.aminmax(difference)  # max |d| without a temporary (NaN propagates)
        return float(torch.maximum(-low, high))


@dataclass
class RelativeL2Residual(StopCriterion):
    """Stop when ``||g(x) - x||_2 / (epsilon + ||g(x)||_2) < threshold``."""

    epsilon: float = 1e-5

    def residual_of(self, difference: torch.Tensor, gx: torch.Tensor) -> float:
        return float(torch.linalg.vector_norm(difference) / (self.epsilon + torch.linalg.vector_norm(gx)))


class AndersonSolver:
    """Anderson-accelerated fixed-point solver for ``x = g(x)``, mixing coefficients per batch element.

    Iterates ``x_0`` (given), ``x_1 = g(x_0)`` and then ``x_n = beta * sum_i a_i g(x_i) +
    (1 - beta) * sum_i a_i x_i`` over the last ``memory`` pairs, where ``a`` (summing to one)
    minimises ``||sum_i a_i (g(x_i) - x_i)||^2 + matrix_epsilon * ||a||^2`` for each batch element.

    Args:
        stop: stop criterion (evaluated on the whole batch tensor).
        memory: number of past iterates used in the mixing.
        beta: damping (1 = undamped).
        matrix_epsilon: Tikhonov regularisation of the least-squares system.

    After :meth:`solve`, ``last_iterations`` (evaluations of ``g``) and ``last_residual`` hold the log
    of the last solve.
    """

    def __init__(self, stop: StopCriterion, memory: int = 4, beta: float = 1.0, matrix_epsilon: float = 1e-4) -> None:
        if not isinstance(stop, StopCriterion):
            raise TypeError(f"stop must be a StopCriterion, got {type(stop).__name__}")
        if memory < 1:
            raise ValueError(f"memory must be >= 1, got {memory}")
        if matrix_epsilon < 0:
            raise ValueError(f"matrix_epsilon must be >= 0, got {matrix_epsilon}")
        self.stop = stop
        self.memory = int(memory)
        self.beta = float(beta)
        self.matrix_epsilon = float(matrix_epsilon)
        self.last_iterations = 0
        self.last_residual = float("nan")

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(stop={self.stop!r}, memory={self.memory}, beta={self.beta}, "
            f"matrix_epsilon={self.matrix_epsilon})"
        )

    def _mix(self, gs: torch.Tensor, fs: torch.Tensor, gram: torch.Tensor, out: torch.Tensor) -> None:
        """Write the next iterate ``(B, N)`` into ``out`` from the stored images ``gs`` and residuals ``fs``
        ``(k, B, N)``, ``gram = fs fs^T`` ``(B, k, k)``."""
        k, batch = gs.shape[:2]
        system = gs.new_zeros((batch, k + 1, k + 1))
        system[:, 0, 1:] = 1
        system[:, 1:, 0] = 1
        system[:, 1:, 1:] = gram + self.matrix_epsilon * torch.eye(k, dtype=gs.dtype, device=gs.device)
        target = gs.new_zeros((batch, k + 1, 1))
        target[:, 0] = 1
        alpha = torch.linalg.solve(system, target)[:, 1:, 0]  # (B, k)
        for b in range(batch):  # (k, N) matrices with a leading dimension of B * N: no copies
            mixed = torch.mm(alpha[b : b + 1], gs[:, b], out=out[b : b + 1])  # sum_i a_i g(x_i)
            if self.beta != 1.0:  # beta * sum a_i g_i + (1 - beta) * sum a_i x_i, with x_i = g_i - f_i
                mixed.sub_(alpha[b : b + 1] @ fs[:, b], alpha=1.0 - self.beta)

    def solve(
        self, g: Callable[..., torch.Tensor], x0: torch.Tensor, *, writes_into: bool = False
    ) -> torch.Tensor:
        """Solve ``x = g(x)`` from ``x0`` (``(B, ...)``, detached); returns the last output of ``g``.

        The iterates are written into the memory of ``x0`` (when contiguous), which is therefore overwritten:
        pass a tensor that is not needed afterwards (such as ``-ddf``).

        ``g`` must map a ``(B, ...)`` tensor to one of the same shape that does not share memory with its input.
        With ``writes_into`` it is called as ``g(x, out)`` with a contiguous tensor ``out`` of that shape (a slot
        of the history) and should return ``out`` holding ``g(x)``, which saves a copy per evaluation; a result
        elsewhere is copied. Emits :class:`ConvergenceWarning` when ``max_iterations`` is reached with the
        residual above the threshold.

        The history is kept in ring buffers of the last ``memory`` images ``g(x_i)`` and residuals
        ``g(x_i) - x_i`` (``2 * memory + 1`` tensors of ``x0``'s size in all, allocated lazily by the OS: slots
        never reached cost no memory), and the residual Gram matrix is updated by one row and column per
        evaluation.
        """
        batch, shape, m = x0.shape[0], x0.shape, self.memory
        x = x0.detach().contiguous()
        flat_x = x.view(batch, -1)
        gs = x.new_empty((m, batch, flat_x.shape[1]))  # slot-major: each slot is one contiguous (B, N) tensor
        fs = torch.empty_like(gs)
        gram = x.new_zeros((batch, m, m))
        n = 0
        while True:
            slot = n % m
            gx = (g(x, gs[slot].view(shape)) if writes_into else g(x)).detach()
            if gx.shape != shape:
                raise ValueError(f"g must preserve the shape {tuple(shape)}, returned {tuple(gx.shape)}")
            n += 1
            flat_g = gx.reshape(batch, -1)
            f = torch.sub(flat_g, flat_x, out=fs[slot])  # g(x) - x (the previous iterate is not needed again)
            residual = self.stop.residual_of(f, gx)
            if self.stop.should_stop(n, residual):
                break
            if flat_g.data_ptr() != gs[slot].data_ptr():
                gs[slot].copy_(flat_g)
            del gx, flat_g
            k = min(n, m)
            for b in range(batch):
                row = torch.mv(fs[:k, b], f[b])  # f_i . f_slot
                gram[b, slot, :k] = row
                gram[b, :k, slot] = row
            if k == 1:
                flat_x.copy_(gs[slot])
            else:
                self._mix(gs[:k], fs[:k], gram[:, :k, :k], out=flat_x)
        self.last_iterations, self.last_residual = n, residual
        if not self.stop.converged(residual):
            warnings.warn(
                f"{type(self).__name__} stopped after {n} evaluations (max_iterations={self.stop.max_iterations}) "
                f"with {type(self.stop).__name__} residual {residual:.3e} >= threshold {self.stop.threshold:.3e}",
                ConvergenceWarning,
                stacklevel=2,
            )
        if flat_g.data_ptr() == gs[slot].data_ptr():  # out of the history, into the iterate's memory
            return x.copy_(gx)
        return gx


def _default_forward_solver() -> AndersonSolver:
    return AndersonSolver(MaxAbsResidual(threshold=1e-2, min_iterations=2, max_iterations=50), memory=4)


def _default_backward_solver() -> AndersonSolver:
    return AndersonSolver(RelativeL2Residual(threshold=1e-2, min_iterations=2, max_iterations=50), memory=4)


def _inversion_step(ddf: torch.Tensor, v: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """One fixed-point map ``g(v) = -ddf(x + v)`` (multilinear, border) on the grid points ``x`` of ``ddf``,
    optionally written into ``out`` (no autograd)."""
    return sample(ddf, None, displacement=v, out=out).neg_()


class _InvertDDF(torch.autograd.Function):
    """``v = fixed point of -ddf(x + v)`` with an implicit (fixed-point) backward pass."""

    @staticmethod
    def forward(ctx, ddf: torch.Tensor, forward_solver: AndersonSolver, backward_solver: AndersonSolver):
        # every g(v) is written straight into the solver's history
        v = forward_solver.solve(lambda v, out: _inversion_step(ddf.detach(), v, out), -ddf.detach(), writes_into=True)
        ctx.backward_solver = backward_solver
        if ctx.needs_input_grad[0]:
            ctx.save_for_backward(ddf, v)
        return v

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output: torch.Tensor):
        ddf, v = ctx.saved_tensors
        with torch.enable_grad():
            ddf = ddf.detach().requires_grad_(True)
            v = v.detach().requires_grad_(True)
            w = _inversion_step(ddf, v)  # the one-step graph: w = g(v*, ddf)

            def adjoint_step(lam: torch.Tensor) -> torch.Tensor:
                # lambda = (dg/dv)^T lambda + grad_output
                return torch.autograd.grad(w, v, lam, retain_graph=True)[0] + grad_output

            lam = ctx.backward_solver.solve(adjoint_step, torch.zeros_like(grad_output))
            (grad_ddf,) = torch.autograd.grad(w, ddf, lam)
        return grad_ddf, None, None


def invert_ddf(
    ddf: torch.Tensor,
    forward_solver: AndersonSolver | None = None,
    backward_solver: AndersonSolver | None = None,
) -> torch.Tensor:
    """Invert a voxel DDF by fixed-point iteration (differentiable, implicit backward).

    Args:
        ddf: ``(B, n, *spatial)``, ``n`` in (2, 3), voxel DDF of ``A(x) = x + ddf(x)`` (maps grid
            points ``x``, e.g. of the fixed image, into the moving image); interpolated multilinearly
            with border extrapolation. ``A`` must be a contraction-perturbed identity (Lipschitz
            constant of ``ddf`` < 1) for the iteration to converge.
        forward_solver: solver of ``v = -ddf(x + v)`` from ``v0 = -ddf(x)``; default Anderson
            (memory 4) with ``MaxAbsResidual(1e-2, 2, 50)`` (residual in voxels).
        backward_solver: solver of the adjoint equation ``lambda = (dg/dv)^T lambda + grad_output``
            from ``lambda0 = 0``; default Anderson (memory 4) with ``RelativeL2Residual(1e-2, 2, 50)``.

    Returns:
        ``v``, ``(B, n, *spatial)`` voxel DDF on the same grid with ``A(x + v(x)) = x``: it maps
        moving-grid points back (the inverse direction of ``ddf``). Same dtype/device as ``ddf``.

    Only ``ddf`` and ``v`` are saved for backward (memory independent of the iteration count);
    double backward is not supported.
    """
    check_ddf(ddf)
    if not ddf.is_floating_point():
        raise ValueError(f"ddf must be a floating point tensor, got {ddf.dtype}")
    forward_solver = _default_forward_solver() if forward_solver is None else forward_solver
    backward_solver = _default_backward_solver() if backward_solver is None else backward_solver
    for name, solver in (("forward_solver", forward_solver), ("backward_solver", backward_solver)):
        if not isinstance(solver, AndersonSolver):
            raise TypeError(f"{name} must be an AndersonSolver or None, got {type(solver).__name__}")
    return _InvertDDF.apply(ddf, forward_solver, backward_solver)


class DDFInversion(nn.Module):
    """Module wrapper of :func:`invert_ddf`: ``(B, n, *spatial)`` voxel DDF -> its inverse DDF.

    The solvers are kept as attributes so that their ``last_iterations`` / ``last_residual`` can be
    logged; ``None`` selects the SITReg defaults (see :func:`invert_ddf`).
    """

    def __init__(
        self, forward_solver: AndersonSolver | None = None, backward_solver: AndersonSolver | None = None
    ) -> None:
        super().__init__()
        self.forward_solver = _default_forward_solver() if forward_solver is None else forward_solver
        self.backward_solver = _default_backward_solver() if backward_solver is None else backward_solver

    def forward(self, ddf: torch.Tensor) -> torch.Tensor:
        return invert_ddf(ddf, self.forward_solver, self.backward_solver)
