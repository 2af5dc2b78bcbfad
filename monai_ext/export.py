"""Export networks as traced TorchScript or ONNX, checked against the eager network.

What exports (see ``docs`` of each bundle):

* KeyMorph keypoint detectors (:class:`~monai_ext.networks.keypoints.KeypointDetector`): convolutions and a
  centre of mass, no data-dependent control flow; traced TorchScript and ONNX reproduce the eager output.
* The KeyMorph aligner (:class:`~monai_ext.networks.keymorph.KeyMorph`, detector + closed-form affine / TPS
  fit by linear solves): traces; valid for the traced image shape (the dense evaluation is chunked by shape).
* SITReg: every deformation is inverted by an Anderson fixed-point iteration that stops when a residual
  meets its threshold, a data-dependent iteration count. Tracing records the loop unrolled with the counts
  of the example input, so the traced module is the network *with those iteration counts frozen*; on an
  input that needs more iterations its inverses are less accurate than the eager network's. ONNX export
  (``torch.export``) refuses the data-dependent stopping test. Moreover the inversion is an autograd Function
  (implicit gradients), which a trace keeps as a Python call that ``torch.jit.save`` (and so
  ``monai.bundle ckpt_export``) cannot serialise. :func:`traceable_inversions` replaces it by the plain
  forward solve and can make the count explicit (every solve runs exactly ``n`` iterations) so that a trace
  is valid for every input of the traced shape; it then computes that fixed-iteration network, not the
  adaptive one.

``monai.networks.utils.convert_to_torchscript`` (behind ``monai.bundle ckpt_export``) checks a trace only on
the example it traced with; these functions also compare on further inputs, which is what reveals a frozen
data-dependent path.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from monai_ext.spatial.inversion import AndersonSolver, DDFInversion
from monai_ext.spatial.sampling import sample, voxel_grid

__all__ = [
    "ExportMismatchError",
    "compare_outputs",
    "trace_network",
    "export_onnx",
    "TraceableDDFInversion",
    "traceable_inversions",
]


class ExportMismatchError(RuntimeError):
    """An exported model does not reproduce the eager network within the tolerances."""


def _as_tuple(output: torch.Tensor | Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    return (output,) if isinstance(output, torch.Tensor) else tuple(output)


def compare_outputs(
    expected: torch.Tensor | Sequence[torch.Tensor],
    actual: torch.Tensor | Sequence[torch.Tensor],
    rtol: float = 1e-4,
    atol: float = 1e-5,
    name: str = "exported model",
) -> None:
    """Raise :class:`ExportMismatchError` naming the output and its largest deviation if any output differs."""
    expected, actual = _as_tuple(expected), _as_tuple(actual)
    if len(expected) != len(actual):
        raise ExportMismatchError(f"{name} returns {len(actual)} outputs, the eager network {len(expected)}")
    for index, (e, a) in enumerate(zip(expected, actual)):
        a = torch.as_tensor(a, dtype=e.dtype, device=e.device)
        if a.shape != e.shape or not torch.allclose(a, e, rtol=rtol, atol=atol):
            error = (a - e).abs().max().item() if a.shape == e.shape else f"shape {tuple(a.shape)} vs {tuple(e.shape)}"
            raise ExportMismatchError(
                f"{name} output {index} differs from the eager network "
                f"(max abs error {error}, rtol={rtol}, atol={atol})"
            )


def _check_example(example: torch.Tensor, name: str) -> None:
    if not isinstance(example, torch.Tensor) or example.ndim < 3:
        got = tuple(example.shape) if isinstance(example, torch.Tensor) else type(example).__name__
        raise ValueError(f"{name} must be a tensor (B, C, *spatial), got {got}")


def trace_network(
    network: nn.Module,
    example: torch.Tensor,
    check_inputs: Sequence[torch.Tensor] = (),
    filepath: str | os.PathLike | None = None,
    rtol: float = 1e-4,
    atol: float = 1e-5,
) -> torch.jit.ScriptModule:
    """Trace ``network`` (eval mode, no grad) on ``example`` and check it on ``example`` and ``check_inputs``.

    Args:
        network: tensor-in network ``(B, C, *spatial)`` -> tensor(s).
        example: the tracing input.
        check_inputs: further inputs of the same shape on which traced and eager outputs must agree; a
            data-dependent branch or loop count frozen by the trace shows up here.
        filepath: if given, the traced module is saved there (``torch.jit.save``).
        rtol, atol: tolerances of the comparison.

    Raises:
        ExportMismatchError: the traced module differs from the eager network on some input.
    """
    _check_example(example, "example")
    network = network.eval()
    with torch.no_grad():
        traced = torch.jit.trace(network, example, check_trace=False)
        for index, inputs in enumerate((example, *check_inputs)):
            _check_example(inputs, f"check_inputs[{index - 1}]" if index else "example")
            compare_outputs(network(inputs), traced(inputs), rtol, atol, f"traced model (input {index})")
    if filepath is not None:
        Path(filepath).parent.mkdir(parents=True, exist_ok=True)
        torch.jit.save(traced, str(filepath))
    return traced


def export_onnx(
    network: nn.Module,
    example: torch.Tensor,
    filepath: str | os.PathLike,
    check_inputs: Sequence[torch.Tensor] = (),
    opset_version: int = 18,
    rtol: float = 1e-4,
    atol: float = 1e-5,
) -> Path:
    """Export ``network`` to ONNX (``torch.onnx.export``, TorchScript-trace exporter) and check the saved model.

    ``torch.export`` (the default exporter of torch >= 2.9) rejects data-dependent branches such as the
    detectors' non-finite input check; the trace-based exporter records them for the example (finite) input.
    The ONNX file is run with ``onnx.reference.ReferenceEvaluator`` (pure Python, no onnxruntime needed) on
    ``example`` and ``check_inputs`` and compared with the eager network. Requires ``onnx``.

    Raises:
        ExportMismatchError: the ONNX model differs from the eager network on some input.
    """
    import onnx
    from onnx.reference import ReferenceEvaluator

    _check_example(example, "example")
    filepath = Path(filepath)
    filepath.parent.mkdir(parents=True, exist_ok=True)
    network = network.eval()
    with torch.no_grad():
        torch.onnx.export(network, (example,), str(filepath), opset_version=opset_version, dynamo=False)
    model = onnx.load(str(filepath))
    onnx.checker.check_model(model)
    session = ReferenceEvaluator(model)
    input_name = model.graph.input[0].name
    with torch.no_grad():
        for index, inputs in enumerate((example, *check_inputs)):
            _check_example(inputs, f"check_inputs[{index - 1}]" if index else "example")
            outputs = session.run(None, {input_name: inputs.cpu().numpy()})
            actual = [torch.from_numpy(o) for o in outputs]
            compare_outputs(network(inputs), actual, rtol, atol, f"ONNX model (input {index})")
    return filepath


class TraceableDDFInversion(DDFInversion):
    """Inference-only :class:`DDFInversion`: the forward solve without the implicit-gradient autograd Function.

    ``torch.jit.trace`` records an autograd Function as a Python call, which ``torch.jit.save`` cannot
    serialise; this module runs the same Anderson solve as plain tensor operations, so a trace unrolls it
    (with the iteration count of the tracing input). No gradients flow through the solve.
    """

    def forward(self, ddf: torch.Tensor) -> torch.Tensor:
        grid = voxel_grid(ddf.shape[2:], ddf.dtype, ddf.device)[None]
        return self.forward_solver.solve(lambda v: sample(ddf, grid + v).neg(), -ddf.detach())


def traceable_inversions(network: nn.Module, iterations: int | None = None) -> nn.Module:
    """Copy of ``network`` (eval mode) with every :class:`DDFInversion` replaced by :class:`TraceableDDFInversion`.

    Args:
        network: e.g. :class:`~monai_ext.networks.sitreg.SITReg`.
        iterations: ``None`` keeps the adaptive stop criteria (a trace then freezes the iteration counts of
            its example input); an integer makes every solve run exactly that many iterations (the solvers
            keep memory, damping and regularisation), so that a trace is valid for every input of its shape.

    Raises:
        ValueError: ``iterations < 1`` or ``network`` contains no ``DDFInversion``.
    """
    if iterations is not None and iterations < 1:
        raise ValueError(f"iterations must be >= 1 or None, got {iterations}")
    network = copy.deepcopy(network).eval()
    parents = [
        (parent, name, child)
        for parent in network.modules()
        for name, child in parent.named_children()
        if isinstance(child, DDFInversion)
    ]
    if not parents:
        raise ValueError(f"network has no DDFInversion module ({type(network).__name__})")

    def solver(old: AndersonSolver) -> AndersonSolver:
        if iterations is None:
            return old
        stop = dataclasses.replace(old.stop, min_iterations=iterations, max_iterations=iterations)
        return AndersonSolver(stop, old.memory, old.beta, old.matrix_epsilon)

    for parent, name, child in parents:
        setattr(parent, name, TraceableDDFInversion(solver(child.forward_solver), solver(child.backward_solver)))
    return network
