"""SITReg with ``transformation_downsampling_factor``: deformations composed and inverted on a coarser grid."""

from __future__ import annotations

import pytest
import torch
from monai.data import MetaTensor

import monai_ext.networks.sitreg as sitreg_module
from monai_ext.networks.sitreg import SITReg
from monai_ext.spatial.inversion import AndersonSolver, MaxAbsResidual, RelativeL2Residual
from monai_ext.spatial.sampling import compose

SHAPE = (20, 17, 16)


def _model(**kwargs) -> SITReg:
    tight = {
        "forward_solver": AndersonSolver(MaxAbsResidual(1e-6, 2, 200)),
        "backward_solver": AndersonSolver(RelativeL2Residual(1e-6, 2, 200)),
    }
    config = {
        "features": (4, 8, 8, 8),
        "feature_convolutions": (1, 1, 1, 1),
        "deformation_features": (None, 8, 8, 8),
        "deformation_convolutions": (None, 1, 1, 1),
        "transformation_downsampling_factor": 2,
        **tight,
        **kwargs,
    }
    model = SITReg(3, **config)
    with torch.no_grad():  # voxel-sized deformations from random weights
        for block in model.deformation_blocks.values():
            block.final_conv.conv.weight.mul_(8.0)
            block.final_conv.conv.bias.mul_(8.0)
    return model


def test_coarse_outputs_shape_units_and_upsampling():
    model = _model()
    moving, fixed = torch.rand(1, 1, *SHAPE), torch.rand(1, 1, *SHAPE)
    with torch.no_grad():
        coarse_f, coarse_i = model.forward_and_inverse(moving, fixed, full_resolution=False)
        full_f, full_i = model.forward_and_inverse(moving, fixed)
    assert coarse_f.shape == (1, 3, 10, 9, 8) and full_f.shape == (1, 3, *SHAPE)
    assert float(coarse_f.abs().max()) > 0.3
    assert torch.equal(full_f, model.upsample_ddf(coarse_f, SHAPE))
    assert torch.equal(full_i, model.upsample_ddf(coarse_i, SHAPE))
    # a constant coarse field is a constant full-resolution field in full-resolution voxels
    constant = torch.ones(1, 3, 10, 9, 8) * torch.tensor([0.5, -1.0, 2.0]).view(1, 3, 1, 1, 1)
    upsampled = model.upsample_ddf(constant, SHAPE)
    assert torch.allclose(upsampled, torch.tensor([1.0, -2.0, 4.0]).view(1, 3, 1, 1, 1).expand_as(upsampled))
    # a linear coarse field stays linear: coarse voxel j is centred at full-resolution 2j + 0.5
    ramp = torch.arange(10.0).view(1, 1, 10, 1, 1).expand(1, 3, 10, 9, 8) * 0.1
    up = model.upsample_ddf(ramp, SHAPE)[0, 0, 1:-1, 0, 0]
    expected = 2 * 0.1 * ((torch.arange(1, SHAPE[0] - 1.0) + 0.5) / 2 - 0.5)
    assert torch.allclose(up, expected, atol=1e-6)


def test_swapping_the_images_swaps_the_outputs_exactly():
    model = _model()
    moving, fixed = torch.rand(1, 1, *SHAPE), torch.rand(1, 1, *SHAPE)
    with torch.no_grad():
        forward_ddf, inverse_ddf = model.forward_and_inverse(moving, fixed)
        swapped_forward, swapped_inverse = model.forward_and_inverse(fixed, moving)
    assert torch.equal(forward_ddf, swapped_inverse) and torch.equal(inverse_ddf, swapped_forward)


def test_inverse_consistency_on_the_transformation_grid():
    model = _model()
    moving, fixed = torch.rand(1, 1, *SHAPE), torch.rand(1, 1, *SHAPE)
    with torch.no_grad():
        forward_ddf, inverse_ddf = model.forward_and_inverse(moving, fixed, full_resolution=False)
    scale = float(forward_ddf.abs().max())
    for residual in (compose(forward_ddf, inverse_ddf), compose(inverse_ddf, forward_ddf)):
        # linear resampling of the chains only (the inversions are solved to 1e-6); a wrong order gives ~scale
        assert float(residual.abs().max()) < 0.3 * scale and float(residual.abs().mean()) < 0.03 * scale


def test_gradients_reach_every_deformation_level():
    model = _model(forward_solver=None, backward_solver=None)
    moving, fixed = torch.rand(1, 1, *SHAPE), torch.rand(1, 1, *SHAPE)
    forward_ddf, inverse_ddf = model.forward_and_inverse(moving, fixed, full_resolution=False)
    (forward_ddf.square().mean() + inverse_ddf.abs().mean()).backward()
    for level, block in model.deformation_blocks.items():
        assert float(block.final_conv.conv.weight.grad.abs().sum()) > 0, level
    # the level-1 block evaluates its B-spline at factor 1 on the transformation grid
    assert [model.deformation_blocks[str(k)].upsampling_factor for k in (1, 2, 3)] == [1, 2, 4]


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"transformation_downsampling_factor": 3}, "power of 2"),
        ({"transformation_downsampling_factor": 0}, "power of 2"),
        ({"transformation_downsampling_factor": 4}, "coarser than the finest deformation level 1"),
        ({"predict_affine": True, "input_shape": SHAPE}, "predict_affine needs"),
    ],
)
def test_bad_factors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        _model(**kwargs)


def test_slab_wise_block_accepts_metatensors(monkeypatch):
    """The memory-saving slab path (no autograd, large levels) with MONAI MetaTensor inputs, as a bundle feeds them."""
    block = sitreg_module.SITRegDeformationBlock(3, 4, 8, 2, upsampling_factor=1).eval()
    a, b = torch.rand(1, 4, 23, 10, 12), torch.rand(1, 4, 23, 10, 12)
    with torch.no_grad():
        whole = block(a, b)
        monkeypatch.setattr(sitreg_module, "_SLAB_ELEMENTS", 8 * 10 * 12 * 5)
        slabbed = block(MetaTensor(a), MetaTensor(b))
    assert all(torch.equal(w, torch.as_tensor(s)) for w, s in zip(whole, slabbed))
