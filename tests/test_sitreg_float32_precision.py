"""Float32 precision of SITReg on the LUMIR architecture, against the same network in float64.

The float32 error of the whole network is bounded by that of its float32 convolutions: the sampling,
composition, inversion and B-spline steps each contribute about 1e-5 voxel at 10-voxel displacements.
Before :class:`~monai_ext.networks.sitreg._CentredGroupNorm`, PyTorch's channels-last CPU GroupNorm (naive
``E[x^2] - E[x]^2`` statistics in float32) added errors of ~2e-3 voxel on the configuration below.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import monai_ext.networks.sitreg as sitreg_module
from monai_ext.networks.sitreg import SITReg, _CentredGroupNorm
from monai_ext.spatial.inversion import AndersonSolver, ConvergenceWarning, MaxAbsResidual, RelativeL2Residual

LUMIR_TRAIN_CONFIG = Path(__file__).resolve().parents[1] / "bundles" / "sitreg_lumir" / "configs" / "train.json"


@pytest.fixture(autouse=True)
def _single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _lumir_network(seed: int, amplification: float) -> SITReg:
    """The LUMIR bundle's ``network_def`` with random weights (float64), tight forward inversions, and the
    control-point heads scaled so that the displacements reach ~10 voxels on a 40 x 56 x 48 pair."""
    config = {k: v for k, v in json.loads(LUMIR_TRAIN_CONFIG.read_text())["network_def"].items() if k != "_target_"}
    torch.manual_seed(seed)
    network = SITReg(
        forward_solver=AndersonSolver(MaxAbsResidual(1e-5, 2, 200)),
        backward_solver=AndersonSolver(RelativeL2Residual(1e-7, 2, 200)),
        **config,
    )
    network = network.double().eval()
    with torch.no_grad():
        for block in network.deformation_blocks.values():
            block.final_conv.conv.weight.mul_(amplification)
            block.final_conv.conv.bias.mul_(amplification)
    return network


def _forward_and_inverse(network: SITReg, moving: torch.Tensor, fixed: torch.Tensor, dtype: torch.dtype):
    network = network.to(dtype)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        forward_ddf, inverse_ddf = network.forward_and_inverse(moving.to(dtype), fixed.to(dtype))
    return forward_ddf.double(), inverse_ddf.double(), network.inversion.forward_solver.last_iterations


@pytest.mark.parametrize("onednn", [False, True], ids=["aten_convolutions", "onednn_convolutions"])
def test_lumir_float32_matches_float64(onednn):
    """Float32 within 5e-4 voxel of float64 on displacements of 10-12 voxels, with the inversion step counts within
    one, when the convolutions are PyTorch's own (im2col + BLAS: 2.1e-4 forward / 2.5e-4 inverse measured): the bound
    on this package's arithmetic (1.9e-3 / 1.6e-3 with PyTorch's GroupNorm). With oneDNN's convolutions, PyTorch's
    default on the CPU, the error is that of the CPU's oneDNN kernels: 1.5e-4 / 2.9e-4 on the machine of 2026-12-06,
    7.0e-4 / 8.0e-4 on an AVX2-only AMD EPYC (oneDNN's AVX2 kernels sum a 64-channel 3^3 convolution's 1728 products
    with ~6x the error of a BLAS product), bounded by 1.2e-3 here."""
    generator = torch.Generator().manual_seed(1)
    images = F.avg_pool3d(torch.rand(2, 1, 40, 56, 48, generator=generator, dtype=torch.float64), 3, 1, 1,
                          count_include_pad=False)  # fmt: skip
    network = _lumir_network(seed=1, amplification=15.0)
    forward_64, inverse_64, steps_64 = _forward_and_inverse(network, images[:1], images[1:], torch.float64)
    with torch.backends.mkldnn.flags(enabled=onednn):
        forward_32, inverse_32, steps_32 = _forward_and_inverse(network, images[:1], images[1:], torch.float32)
    assert forward_64.abs().max() > 9.0 and inverse_64.abs().max() > 9.0  # the ~10-voxel scale
    # the solves stop at residuals within ~10 % of their threshold, where float32 rounding may move one step
    assert abs(steps_32 - steps_64) <= 1
    bound = 1.2e-3 if onednn else 5e-4
    assert (forward_32 - forward_64).abs().max() <= bound
    assert (inverse_32 - inverse_64).abs().max() <= bound


@pytest.mark.parametrize("shape", [(2, 12, 9, 10, 11), (2, 8, 13, 14)])
def test_centred_group_norm_is_group_norm(shape, monkeypatch):
    """Same function as ``nn.GroupNorm`` (values and gradients, float64, either memory layout), state-dict
    compatible, and accurate in float32 on channels-last inputs with a large mean."""
    torch.manual_seed(0)
    native = torch.nn.GroupNorm(4, shape[1]).double()
    with torch.no_grad():
        native.weight.uniform_(0.5, 2.0)
        native.bias.uniform_(-1.0, 1.0)
    centred = _CentredGroupNorm(4, shape[1]).double()
    centred.load_state_dict(native.state_dict())
    channels_last = torch.channels_last_3d if len(shape) == 5 else torch.channels_last
    x = (torch.randn(shape, dtype=torch.float64) * 0.05 + 1.0).requires_grad_(True)
    grad_out = torch.randn(shape, dtype=torch.float64)
    for inputs in (x, x.contiguous(memory_format=channels_last)):
        expected, actual = native(inputs), centred(inputs)
        torch.testing.assert_close(actual, expected, rtol=0, atol=1e-10)  # native channels-last: ~1e-12
        grads = [torch.autograd.grad(y, (x, native.weight if y is expected else centred.weight), grad_out)
                 for y in (expected, actual)]  # fmt: skip
        for g_native, g_centred in zip(*grads):
            torch.testing.assert_close(g_centred, g_native, rtol=0, atol=1e-10)
    with torch.no_grad():
        reference = native(x.detach())
        inputs = x.detach().float().contiguous(memory_format=channels_last)
        output = centred.float()(inputs)
    assert output.is_contiguous(memory_format=channels_last)
    assert (output.double() - reference).abs().max() < 2e-5
    # in place (no autograd): the same values in the input's own memory, squares summed a few slices at a time
    monkeypatch.setattr(sitreg_module, "_SQUARE_CHUNK", 2 * math.prod(shape[3:]))  # parts of one slice
    inplace = _CentredGroupNorm(4, shape[1], inplace=True).float()
    inplace.load_state_dict(native.state_dict())
    with torch.no_grad():
        copy = inputs.clone()
        result = inplace(copy)
    assert result.data_ptr() == copy.data_ptr() and result.is_contiguous(memory_format=channels_last)
    torch.testing.assert_close(result, output, rtol=0, atol=1e-6)
