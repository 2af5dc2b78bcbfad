"""Memory-saving inference path of the truncated U-Net keypoint backbone and the blocked TPS evaluation.

The slab-wise path (:meth:`TruncatedUNetKeypointNet.heatmap_chunks`, ``low_memory_voxels``) must compute the same
function as the plain forward. Slabs of 2 or 4 rows (odd sizes: an odd last slab) and keypoint chunks of 3
channels are forced so that halos, merged GroupNorm moments, fused pooling and chunked centres of mass are all
exercised on small volumes. In float64 both paths agree to rounding (1e-10); in float32 to 1e-5 (heatmaps relative
to their maximum; float32 DDFs would add the fit's amplification of keypoint rounding, so the registration is
compared in float64).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import monai_ext.networks.keypoints as keypoints
import monai_ext.spatial.tps as tps
from monai_ext.networks.keymorph import KeyMorph
from monai_ext.networks.keypoints import CenterOfMass, KeypointDetector, TruncatedUNetKeypointNet

# (spatial shape, num_levels, num_truncated): cubic, odd and non-cubic, the full U-Net, two dropped levels, 2-D
CASES = [
    ((32, 32, 32), 4, 1),
    ((27, 22, 30), 3, 1),
    ((20, 18, 22), 3, 0),
    ((20, 18, 22), 3, 2),
    ((41, 36), 3, 1),
]


def _network(
    spatial: tuple[int, ...], levels: int, truncated: int, dtype: torch.dtype = torch.float32
) -> TruncatedUNetKeypointNet:
    torch.manual_seed(0)
    net = TruncatedUNetKeypointNet(
        num_keypoints=10, spatial_dims=len(spatial), f_maps=8, num_levels=levels, num_truncated=truncated
    )
    with torch.no_grad():  # non-trivial GroupNorm affine parameters
        for name, parameter in net.named_parameters():
            if "groupnorm" in name:
                parameter.add_(0.2 * torch.randn_like(parameter))
    return net.to(dtype).eval()


def _image(batch: int, spatial: tuple[int, ...], seed: int = 1, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    noise = torch.rand(batch, 1, *spatial, generator=torch.Generator().manual_seed(seed), dtype=dtype)
    pool = nn.functional.avg_pool3d if len(spatial) == 3 else nn.functional.avg_pool2d
    return 3 * pool(noise, 3, 1, 1) + 1  # smooth, with an offset from zero


@pytest.fixture
def small_slabs(request, monkeypatch):
    """Slabs of ``request.param`` rows (default 2) on any volume."""
    monkeypatch.setattr(keypoints, "_slab_rows", lambda *_: getattr(request, "param", 2))


@pytest.mark.parametrize(
    "small_slabs, dtype, tolerance",
    [(2, torch.float32, 1e-5), (4, torch.float64, 1e-10)],
    ids=["rows2-f32", "rows4-f64"],
    indirect=["small_slabs"],
)
@pytest.mark.parametrize("spatial, levels, truncated", CASES)
def test_low_memory_path_equals_the_plain_path(small_slabs, monkeypatch, spatial, levels, truncated, dtype, tolerance):
    net = _network(spatial, levels, truncated, dtype)
    image = _image(2, spatial, dtype=dtype)
    detector = KeypointDetector(net, return_mass=True)
    with torch.no_grad():
        net.low_memory_voxels = None
        heatmaps = net(image)
        points, mass = detector(image)
        monkeypatch.setattr(keypoints, "_SLAB_ELEMENTS", 3 * heatmaps[0, 0].numel())  # chunks of 3 keypoints
        net.low_memory_voxels = 0
        chunks = list(net.heatmap_chunks(image))
        low_points, low_mass = detector(image)
        low_heatmaps = net(image)
    assert [c.shape[1] for c in chunks] == [3, 3, 3, 1]
    assert low_heatmaps.is_contiguous() and low_heatmaps.shape == heatmaps.shape
    scale = heatmaps.abs().max().item()
    torch.testing.assert_close(low_heatmaps, heatmaps, rtol=0, atol=tolerance * scale)
    torch.testing.assert_close(torch.cat(chunks, 1), heatmaps, rtol=0, atol=tolerance * scale)
    assert (mass > 0).all()
    torch.testing.assert_close(low_points, points, rtol=0, atol=tolerance)
    torch.testing.assert_close(low_mass, mass, rtol=tolerance, atol=tolerance * mass.max().item())


@pytest.mark.parametrize("alignment", ["affine", "tps_1"])
def test_low_memory_registration_equals_the_plain_one(small_slabs, monkeypatch, alignment):
    """KeyMorph.register with power weights (float64): keypoints, weights and DDF (voxels) of both paths agree."""
    monkeypatch.setattr(keypoints, "_SLAB_ELEMENTS", 1)  # one keypoint per heatmap chunk
    spatial = (32, 30, 28)
    model = KeyMorph(_network(spatial, 4, 1, torch.float64), alignment, weighted=True).eval()
    moving, fixed = (_image(1, spatial, seed, torch.float64) for seed in (2, 3))
    with torch.no_grad():
        model.backbone.low_memory_voxels = None
        plain = model.register(moving, fixed)[alignment]
        model.backbone.low_memory_voxels = 0
        low = model.register(moving, fixed)[alignment]
    for key in ("points_fixed", "points_moving", "weights", "ddf"):
        torch.testing.assert_close(low[key], plain[key], rtol=0, atol=1e-9, msg=key)


def test_low_memory_path_is_automatic_without_gradients():
    """Taken without gradients from ``low_memory_voxels`` on (hooks of submodules do not fire in it); training with
    gradients and small inputs keep the plain path."""
    net = _network((16, 16, 16), 3, 1)
    calls = []
    net.encoders[0].register_forward_hook(lambda *_: calls.append(1))
    image = _image(1, (16, 16, 16))
    net.low_memory_voxels = 16**3
    net(image).sum().backward()
    assert len(calls) == 1 and net.final_conv.weight.grad is not None
    with torch.no_grad():
        net(image)
        assert len(calls) == 1
        net.low_memory_voxels = 16**3 + 1
        net(image)
        assert len(calls) == 2


def test_group_norm_moments_are_merged_exactly():
    """Slab moments merged into GroupNorm statistics equal nn.GroupNorm (in float64), also for a group split
    between two parts and far from zero (no sum-of-squares cancellation)."""
    torch.manual_seed(0)
    norm = nn.GroupNorm(3, 6)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 2)
        norm.bias.uniform_(-1, 1)
    x = (1000 + torch.randn(2, 6, 9, 5, 4, dtype=torch.float64)).to(torch.float32)
    parts = [keypoints._rows(x[:, :1]), keypoints._rows(x[:, 1:])]  # the first group is split
    scale, shift = keypoints._group_norm_affine(norm, parts, depth=9, rows=2)
    normalised = x * scale[..., None, None, None] + shift[..., None, None, None]
    expected = norm.double()(x.double()).float()
    torch.testing.assert_close(normalised, expected, rtol=0, atol=2e-4)  # float32 rounding of x * scale ~ 1000


@pytest.mark.parametrize("block", [1, 7, 64])
def test_blocked_tps_evaluation_is_unchanged(monkeypatch, block):
    """The kernel blocks of the dense TPS evaluation change nothing but the matrix products' rounding."""
    generator = torch.Generator().manual_seed(4)
    control = torch.rand(2, 16, 3, generator=generator, dtype=torch.float64) * 2 - 1
    target = control + 0.05 * torch.randn(2, 16, 3, generator=generator, dtype=torch.float64)
    theta = tps.fit_tps(control, target, 0.5)
    whole = tps.tps_dense(theta, control, (6, 5, 7))
    monkeypatch.setattr(tps, "_BLOCK_ELEMENTS", block * 2 * 16)
    torch.testing.assert_close(tps.tps_dense(theta, control, (6, 5, 7), chunk_size=100), whole, rtol=0, atol=1e-12)


def test_center_of_mass_from_chunks_equals_forward():
    heatmaps = torch.randn(2, 7, 5, 6, 4)
    heatmaps[0, 2] = -1  # an empty channel
    com = CenterOfMass(return_mass=True)
    points, mass = com(heatmaps)
    chunked_points, chunked_mass = com.from_chunks(heatmaps.split([3, 1, 3], dim=1))
    assert torch.equal(chunked_points, points) and torch.equal(chunked_mass, mass)
    with pytest.raises(ValueError, match="non-finite"):
        com.from_chunks([heatmaps[:, :3], torch.full((2, 1, 5, 6, 4), -torch.inf)])
